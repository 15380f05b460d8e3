"""A teacher model writes more questions per fact, on top of the model-free generators.

The model-free generators (questions.py, slots.py, wh.py) are the floor: they always run,
and a 135M model could not beat them. A teacher adds what templates cannot: the ways a
person would really ask. It runs locally through llama.cpp in a child process
(``runtime/llamacpp_child.py``: a crash or a bad file is a failed call, never a dead
worker): ``[study] teacher = "auto"`` is the home's current merged model, else the base,
when its file is at least ``teacher_min_gb`` (the 135M default is not: asked about 12
handbook facts it wrote 35 questions, 13 passed the checks below, and most of those were
not answered by their fact, e.g. "What's the new staff member's name?" for the
orientation time);
a path names a larger local instruct GGUF (an 8B on the workstation's GPU); ``"off"``
writes none.

A teacher's question is kept only when it reads as a question about its fact: it ends
with "?", has a sensible length, shares a content word with the fact, is not one the
generators already wrote, and is not a held-out question (those must stay unseen). Its
answer is the generators' own full-sentence answer for the fact, so every answer is
supported by the passage whatever the teacher writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from appliance.data.study.heldout import leaks
from appliance.home import registry
from appliance.home.paths import Home
from appliance.runtime import llamacpp_child

PROMPT = (
    "Here is a fact from a staff handbook:\n\n{fact}\n\nWrite {n} different questions that a new member "
    "of staff might ask, each answered by this fact. Write one question per line and nothing else."
)
REPLY_TOKENS = 96
MIN_WORDS, MAX_WORDS = 4, 30
WORD = re.compile(r"[a-z0-9]+")
STOP = frozenset(
    "a an and are as at be by can do does for from how i in is it my of on or our the to we what when where "
    "which who why will with you your".split()
)


@dataclass
class Taught:
    """What the teacher wrote: accepted questions per statement index, and the counts."""

    questions: dict[int, list[str]] = field(default_factory=dict)
    written: int = 0
    accepted: int = 0
    error: str | None = None  # the one line naming the file and the problem (the floor goes on alone)


def teacher_model(home: Home, setting: str, min_gb: float = 0.0) -> Path | None:
    """The GGUF ``[study] teacher`` names (None for "off", and for "auto" when the home's model
    is smaller than ``min_gb``: a tiny model's questions would teach wrong associations)."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    top = home.top
    current = registry.current(top)
    for version in (current, "base"):
        if version and top.version_json(version).exists() and registry.get(top, version).get("kind") != "adapter":
            model = registry.gguf_path(top, version)
            return model if model.is_file() and model.stat().st_size >= min_gb * 1e9 else None
    return None


def teach(
    gguf: Path, statements: list[str], per_fact: int, known: set[str], heldout: list[str], threads: int | None = None
) -> Taught:
    """Ask ``gguf`` for ``per_fact`` questions about each statement; keep the good ones."""
    if not statements or per_fact <= 0:
        return Taught()
    prompts = [([{"role": "user", "content": PROMPT.format(fact=s, n=per_fact)}], REPLY_TOKENS) for s in statements]
    result = llamacpp_child.run(gguf, reply=prompts, threads=threads, timeout=3600)
    if not result.ok:
        return Taught(error=f"study teacher {gguf}: {result.error}; the model-free questions are used alone")
    taught = Taught()
    seen = {_norm(q) for q in known}
    for index, (statement, text) in enumerate(zip(statements, result.replies)):
        lines = [_clean(line) for line in text.splitlines()]
        candidates = [q for q in lines if q][:per_fact]
        taught.written += len(candidates)
        for question in candidates:
            if acceptable(question, statement) and _norm(question) not in seen and not leaks(heldout, [question]):
                seen.add(_norm(question))
                taught.questions.setdefault(index, []).append(question)
                taught.accepted += 1
    return taught


def acceptable(question: str, statement: str) -> bool:
    """A question about this fact: ends with '?', 4-30 words, a content word of the fact in it."""
    words = WORD.findall(question.lower())
    if not question.endswith("?") or not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    content = {w for w in WORD.findall(statement.lower()) if w not in STOP}
    return bool(content & set(words))


def _clean(line: str) -> str:
    """A reply line without list numbering or bullets."""
    return re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", line).strip().strip('"')


def _norm(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))
