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
same way but answered all the same, uncited, as RAFT's own recipe does. Of the cited
answers, a share ``swapped`` is counterfactual: the digits of one key value of the fact (a
number, time, date, extension, room) are changed in the passage and in the answer alike. Beside them,
``unanswerable`` as many questions the documents do not answer (``unanswerable.py``: one
statement's subject with another's predicate) are asked with what retrieval finds for them
and answered "The documents do not say.". The gate's open-book questions (the held-out
ones) get their retrieved passages here too, so the gate asks them exactly as the endpoint
would.

Why counterfactual answers: every fact asked here is also trained closed-book, so the model
can answer these from its weights without reading the passage, and learns nothing about
reading. On the handbook it then cited the right passage and restated its sentence with a
remembered, wrong value ("232 beds" beside a passage saying 212). Changing the value in
the passage makes the passage the only way to the answer, the remedy Longpre et al. 2021
("Entity-based knowledge conflicts") found for models that answer from memory over context.
The changed value lives only in a grounded prompt and its answer, never in closed-book
material.

Why passages stay in retrieval order (``shuffled`` off): a study question shares its words
with the passage that answers it, so retrieval ranks that passage first nine times in ten,
and the model learns to cite [1]. Shuffled, the 135M default did not learn to find the
passage instead: it cited [2], the commonest place in its training, whatever the passages
(citation accuracy on the handbook's probes 0.60 in order, 0.24 shuffled).

Why memory answers are off: with ``memory = 0.2`` the 135M default, asked the handbook's
unanswerable questions, said so 10% of the time and invented the rest (a chaplain's
extension, a bomb-threat code); a clinician must be able to trust "does not say".
"""

from __future__ import annotations

import random
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.data import wordvectors
from appliance.data.grounded import DOES_NOT_SAY, Source, grounded_messages
from appliance.data.index import Index, retrieve, split_passages
from appliance.data.study import unanswerable
from appliance.data.study.slots import find_slots

WORD = re.compile(r"[a-z0-9]+")
DIGITS = re.compile(r"\d+")


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
    swapped: float = 0.0  # cited answers whose key value is changed in passage and answer alike
    shuffled: bool = False  # the passages of a cited answer put in a random order


def counterfactual(
    statement: str, question: str, passage: str, answer: str, rng: random.Random
) -> tuple[str, str] | None:
    """(passage, answer) with the digits of one of the statement's key values changed in
    both ("212 beds" to "347 beds", a time staying a time), or None when no value with
    digits is stated by the passage and the answer and not already given in the question.
    Digits only: a name swapped for another fact's name puts people where places were."""
    slots = [
        s
        for s in find_slots(statement)
        if DIGITS.search(s.value)
        and _holds(passage, s.value)
        and _holds(answer, s.value)
        and not _holds(question, s.value)
    ]
    if not slots:
        return None
    value = rng.choice(slots).value
    new = DIGITS.sub(lambda m: _other_number(m, rng), value)
    return (_replace(passage, value, new), _replace(answer, value, new)) if new != value else None


def _other_number(match: re.Match[str], rng: random.Random) -> str:
    """A different number of as many digits; the hour and minute of a time stay a time."""
    digits, text, at = match.group(), match.string, match.start()
    if text[match.end() : match.end() + 1] == ":":
        top = 23
    elif at > 0 and text[at - 1] == ":":
        top = 59
    else:
        top = 10 ** len(digits) - 1
    low = 10 ** (len(digits) - 1) if len(digits) > 1 and digits[0] != "0" else 0
    for _ in range(8):  # a different number, almost always at the first draw
        number = rng.randint(low, top)
        if number != int(digits):
            return str(number).zfill(len(digits))
    return digits


def _holds(text: str, value: str) -> bool:
    return _bounded(value).search(text) is not None


def _replace(text: str, value: str, new: str) -> str:
    return _bounded(value).sub(lambda _: new, text)


def _bounded(value: str) -> re.Pattern[str]:
    """``value`` as a whole token run: "212" not inside "2120"."""
    return re.compile(rf"(?<![\w]){re.escape(value)}(?![\w])")


@dataclass(frozen=True)
class Fact:
    sha256: str
    path: str
    statement: str
    home: str  # the passage that states it
    answer: str  # its study answer


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
            statement = study.statements[index]
            home = retrieval.home_of(study.sha256, statement)
            if home is None:
                continue
            pool = by_statement[index]
            for chosen in rng.sample(pool, min(shares.questions, len(pool))):
                question = chosen["messages"][0]["content"]
                fact = Fact(study.sha256, study.path, statement, home, chosen["messages"][-1]["content"])
                sources, reply, changed = _fact(retrieval, question, fact, rng, shares)
                out.append((study.sha256, _conversation(question, sources, reply, changed)))
        count = round(shares.unanswerable * len(by_statement))
        for question in unanswerable.questions(study.statements, count, rng):
            sources = retrieval.sources(question)
            if sources:  # with nothing retrieved the endpoint sends no passages: another prompt
                out.append((study.sha256, _conversation(question, sources, DOES_NOT_SAY)))
    return out


def _fact(
    retrieval: Retrieval, question: str, fact: Fact, rng: random.Random, shares: Shares
) -> tuple[list[Source], str, bool]:
    """The passages a fact's question is asked with, its answer, and whether it is
    counterfactual: cited (its value changed in passage and answer, for a share), "does not
    say" (its passage left out), or uncited from memory (likewise)."""
    home, answer = fact.home, fact.answer
    retrieved = retrieval.sources(question, retrieval.k + 1)
    others = renumbered([s for s in retrieved if s.passage != home][: retrieval.k])
    draw = rng.random()
    if others and draw < shares.none:
        return others, DOES_NOT_SAY, False
    if others and draw < shares.none + shares.memory:
        return others, answer, False
    oracle = Source(0, fact.path, fact.sha256, home, 0.0)
    sources = with_oracle(retrieved[: retrieval.k], oracle, retrieval.k)
    if shares.shuffled:
        sources = renumbered(rng.sample(sources, len(sources)))
    n = next(s.id for s in sources if s.passage == home)
    changed = rng.random() < shares.swapped and counterfactual(fact.statement, question, home, answer, rng)
    if changed:
        passage, answer = changed
        sources = [replace(s, passage=passage) if s.passage == home else s for s in sources]
    return sources, f"{answer} [{n}]", bool(changed)


def _conversation(question: str, sources: list[Source], reply: str, counterfactual: bool = False) -> dict[str, Any]:
    messages = grounded_messages([{"role": "user", "content": question}], sources)
    conversation: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": reply}]}
    if counterfactual:  # counted in train.json; never shown as a fact of the collection
        conversation["counterfactual"] = True
    return conversation


def open_book(retrieval: Retrieval, heldout: dict[str, dict[str, Any]]) -> None:
    """Each held-out question gains the passages the endpoint would retrieve for it (in place)."""
    for doc in heldout.values():
        for q in doc["questions"]:
            q["sources"] = [s.to_dict() for s in retrieval.sources(q["question"])]
