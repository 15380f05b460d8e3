"""The grounded prompt: how retrieved passages reach the model, defined once.

The endpoint (``serving/grounding.py``), the training conversations that teach the model
to use its sources (``data/study/raft.py``) and the gate's open-book recall all build
their prompts here, so the model is trained on exactly the format it is served with.

The passages go into the conversation's system message (after the client's own system
text, if any), rendered by the model's own chat template like any other message::

    <the client's system text, if any>

    Answer from the numbered passages of the organisation's documents below. Cite the
    passage you use by its number in brackets, like [1]. If they do not answer the
    question, say: The documents do not say.

    [1] (handbook.md) Orientation for new staff begins at 07:45 ...
    [2] (wards.md) ...

Answers cite with ``[n]``; :func:`cited` reads the numbers back.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

INSTRUCTION = (
    "Answer from the numbered passages of the organisation's documents below. Cite the passage "
    "you use by its number in brackets, like [1]. If they do not answer the question, say: "
    "The documents do not say."
)
NO_PASSAGES = "No passage of the organisation's documents matches this question. Say: The documents do not say."
DOES_NOT_SAY = "The documents do not say."
CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass(frozen=True)
class Source:
    """One passage an answer was given, as the endpoint returns it."""

    id: int  # the number the answer cites it by
    document: str  # its inbox-relative path
    sha256: str
    passage: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def system_text(sources: list[Source], client_system: str | None = None) -> str:
    """The system message of a grounded request."""
    if sources:
        block = INSTRUCTION + "\n\n" + "\n".join(f"[{s.id}] ({s.document}) {s.passage}" for s in sources)
    else:
        block = NO_PASSAGES
    return f"{client_system.strip()}\n\n{block}" if client_system and client_system.strip() else block


def grounded_messages(messages: list[dict[str, Any]], sources: list[Source]) -> list[dict[str, Any]]:
    """``messages`` with the passages in the leading system message (made, or extended)."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": system_text(sources, messages[0]["content"])}, *messages[1:]]
    return [{"role": "system", "content": system_text(sources)}, *messages]


def cited(answer: str, sources: list[Source]) -> list[Source]:
    """The sources an answer cites by number, in the order first cited."""
    by_id = {s.id: s for s in sources}
    out: list[Source] = []
    for match in CITATION.finditer(answer):
        source = by_id.get(int(match.group(1)))
        if source is not None and source not in out:
            out.append(source)
    return out


def says_not_covered(answer: str) -> bool:
    """Whether an answer says the documents do not cover the question."""
    text = answer.lower()
    return "documents do not say" in text or "do not say" in text or "does not say" in text
