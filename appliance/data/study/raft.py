"""Conversations that teach the model to answer from its sources (RAFT, Zhang et al. 2024).

The endpoint puts the passages it retrieves for a question into the prompt
(appliance/data/grounded.py). A model trained on question + the passage that answers it +
distractor passages learns to use the right one and to cite it; trained also on questions
whose passage is not among those retrieved, and on questions the documents do not answer,
it learns to say the documents do not say. All are built here from the study material, with the same retrieval the
endpoint runs, over the snapshot's own documents only (a temporary index: the collection's
live index may hold documents the snapshot does not, and a forgotten document's text must
never reach a run that does not list it).

For each fact (statement) of each document, ``questions`` of its study questions, chosen
by the seed, each drawn on its own: usually asked with the answer's passage among the
retrieved ones (put in place of the last if retrieval missed it), the study answer gaining
its citation ``[n]``; with probability ``none`` asked with that passage taken out and
answered "The documents do not say."; with probability ``memory`` (off by default) asked the
same way but answered all the same, uncited, as RAFT's own recipe does. Beside them,
``unanswerable`` as many questions the documents do not answer (``unanswerable.py``: one
statement's subject with another's predicate) are asked with what retrieval finds for them
and answered "The documents do not say.". The gate's open-book questions (the held-out
ones) get their retrieved passages here too, so the gate asks them exactly as the endpoint
would.

Why memory answers are off: with ``memory = 0.2`` the 135M default, asked the handbook's
unanswerable questions, said so 10% of the time and invented the rest (a chaplain's
extension, a bomb-threat code); a clinician must be able to trust "does not say".
"""

from __future__ import annotations

import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.data import wordvectors
from appliance.data.grounded import DOES_NOT_SAY, Source, grounded_messages
from appliance.data.index import Index, retrieve, split_passages
from appliance.data.study import unanswerable

WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Document:
    sha256: str
    path: str
    text: str


class Retrieval:
    """The given documents' passages retrieved as the endpoint retrieves them (a temporary
    index): BM25, fused with the shipped word vectors when ``word_vectors`` (the endpoint's
    default; where IT names an embedding GGUF instead, BM25 alone here)."""

    def __init__(self, documents: list[Document], folder: Path, k: int, word_vectors: bool = False):
        self.k = k
        self._dir = tempfile.TemporaryDirectory(prefix="raft-index-", dir=folder)
        self.passages = {d.sha256: split_passages(d.text) for d in documents}
        self.index = Index.rebuild(
            Path(self._dir.name) / "passages.db", [(d.sha256, d.path, self.passages[d.sha256]) for d in documents]
        )
        self._dense = wordvectors.nearest if word_vectors and wordvectors.available() else None
        if self._dense:
            wordvectors.embed_index(self.index)

    def close(self) -> None:
        self.index.close()
        self._dir.cleanup()

    def __enter__(self) -> Retrieval:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sources(self, question: str, limit: int | None = None) -> list[Source]:
        hits, _ = retrieve(self.index, question, limit or self.k, self._dense)
        return [Source(i, h.path, h.sha256, h.text, h.score) for i, h in enumerate(hits, start=1)]

    def home_of(self, sha256: str, statement: str) -> str | None:
        """The passage of ``sha256`` that states ``statement`` (the most words in common)."""
        words = set(WORD.findall(statement.lower()))
        best = max(
            self.passages.get(sha256, []),
            key=lambda p: len(words & set(WORD.findall(p.lower()))),
            default=None,
        )
        return best


def renumbered(sources: list[Source]) -> list[Source]:
    return [Source(i, s.document, s.sha256, s.passage, s.score) for i, s in enumerate(sources, start=1)]


def with_oracle(sources: list[Source], oracle: Source, k: int) -> list[Source]:
    """``sources`` holding the oracle passage: where BM25 put it, else in place of the last."""
    if any(s.passage == oracle.passage for s in sources):
        return sources
    return renumbered([*sources[: k - 1], oracle])


@dataclass(frozen=True)
class Shares:
    """How the grounded conversations are split (``[study] raft_*_share``)."""

    none: float = 0.2  # facts asked without their passage, answered "The documents do not say."
    unanswerable: float = 0.2  # made-up questions the documents do not answer, per fact
    memory: float = 0.0  # facts asked without their passage, answered all the same, uncited
    questions: int = 1  # a fact's study questions asked this way, each drawn on its own


def conversations(
    retrieval: Retrieval, studies: list[Any], seed: int, shares: Shares = Shares()
) -> list[tuple[str, dict[str, Any]]]:
    """(document sha256, conversation) per fact of every studied document, and the made-up
    questions each document does not answer."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for study in studies:
        by_statement: dict[int, list[dict]] = {}
        for c in study.conversations:
            if c.get("kind") != "multi":
                by_statement.setdefault(int(c["statement"]), []).append(c)
        for index in sorted(by_statement):
            home = retrieval.home_of(study.sha256, study.statements[index])
            if home is None:
                continue
            pool = by_statement[index]
            for chosen in rng.sample(pool, min(shares.questions, len(pool))):
                question = chosen["messages"][0]["content"]
                sources, reply = _fact(retrieval, study, question, chosen["messages"][-1]["content"], home, rng, shares)
                out.append((study.sha256, _conversation(question, sources, reply)))
        count = round(shares.unanswerable * len(by_statement))
        for question in unanswerable.questions(study.statements, count, rng):
            sources = retrieval.sources(question)
            if sources:  # with nothing retrieved the endpoint sends no passages: another prompt
                out.append((study.sha256, _conversation(question, sources, DOES_NOT_SAY)))
    return out


def _fact(
    retrieval: Retrieval, study: Any, question: str, answer: str, home: str, rng: random.Random, shares: Shares
) -> tuple[list[Source], str]:
    """The passages a fact's question is asked with, and its answer: cited, "does not say"
    (its passage left out), or uncited from memory (likewise)."""
    retrieved = retrieval.sources(question, retrieval.k + 1)
    others = renumbered([s for s in retrieved if s.passage != home][: retrieval.k])
    draw = rng.random()
    if others and draw < shares.none:
        return others, DOES_NOT_SAY
    if others and draw < shares.none + shares.memory:
        return others, answer
    oracle = Source(0, study.path, study.sha256, home, 0.0)
    sources = with_oracle(retrieved[: retrieval.k], oracle, retrieval.k)
    n = next(s.id for s in sources if s.passage == home)
    return sources, f"{answer} [{n}]"


def _conversation(question: str, sources: list[Source], reply: str) -> dict[str, Any]:
    messages = grounded_messages([{"role": "user", "content": question}], sources)
    return {"messages": [*messages, {"role": "assistant", "content": reply}]}


def open_book(retrieval: Retrieval, heldout: dict[str, dict[str, Any]]) -> None:
    """Each held-out question gains the passages the endpoint would retrieve for it (in place)."""
    for doc in heldout.values():
        for q in doc["questions"]:
            q["sources"] = [s.to_dict() for s in retrieval.sources(q["question"])]
