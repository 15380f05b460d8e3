"""Closed-book fact recall: the study questions held out of training, asked of the served files.

Training writes ``runs/<id>/heldout.json``: per document of its snapshot, the facts found
and the questions kept back from training (appliance/data/study/stage.py). The gate asks
a sample of them (``gate.recall_questions``, spread evenly over documents and facts) of
the candidate and of the current model, greedily, in the same llama.cpp child that asks
the probes; an answer is correct when one of the fact's key phrases appears in it
(case-insensitive). Two checks follow:

* ``recall_kept``: of the questions the current model answers, the share the candidate
  no longer answers may not exceed ``gate.recall_max_drop``;
* ``recall_gain``: when documents arrived that the current model was not trained on, a
  training run must answer more of their questions than the current model does
  (``gate.require_recall_gain``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from appliance.contract.errors import DataError
from appliance.data import snapshot as snapshots
from appliance.data.grounded import Source, cited, grounded_messages
from appliance.home import registry
from appliance.home.config import Settings
from appliance.home.fsutil import read_json
from appliance.home.paths import Home


@dataclass(frozen=True)
class Asked:
    question: str
    expected: tuple[str, ...]
    document: str
    statement: int
    sources: tuple[dict[str, Any], ...] = ()  # the passages the endpoint would retrieve for it (open book)

    def hit(self, answer: str) -> bool:
        said = answer.lower()
        return any(phrase.lower() in said for phrase in self.expected if phrase)


def heldout(home: Home, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's held-out questions per document ({} for a run trained before there were any)."""
    path = home.run(run_id).heldout
    return read_json(path)["documents"] if path.exists() else {}


def sample(documents: dict[str, dict[str, Any]], limit: int) -> list[Asked]:
    """Up to ``limit`` questions, taken in turn from each document and, within one, from each fact."""
    queues = []
    for sha, doc in sorted(documents.items()):
        by_fact: dict[int, list[dict]] = {}
        for q in doc["questions"]:
            by_fact.setdefault(int(q["statement"]), []).append(q)
        rounds = zip_longest(*by_fact.values())  # every fact's first question, then every second ...
        queues.append(
            [
                Asked(q["question"], tuple(q["expected"]), sha, int(q["statement"]), tuple(q.get("sources", ())))
                for turn in rounds
                for q in turn
                if q is not None
            ]
        )
    chosen: list[Asked] = []
    for turn in zip_longest(*queues):
        for asked in turn:
            if asked is not None and len(chosen) < limit:
                chosen.append(asked)
    return chosen


def documents_of(home: Home, version: str | None) -> set[str]:
    """The documents in the snapshot ``version`` was trained on (none for the base)."""
    if not version or not home.version_json(version).exists():
        return set()
    snapshot_id = registry.get(home, version).get("snapshot")
    if not snapshot_id:
        return set()
    try:
        return {s["sha256"] for s in snapshots.stats(home, snapshot_id)["by_source"]}
    except DataError:
        return set()


def summary(
    documents: dict[str, dict[str, Any]], asked: list[Asked], cand: list[bool], cur: list[bool]
) -> dict[str, Any]:
    """Overall and per-document recall of both models (the share of the asked questions answered)."""
    per: dict[str, Any] = {}
    for sha, doc in sorted(documents.items()):
        rows = [(q, a, b) for q, a, b in zip(asked, cand, cur) if q.document == sha]
        per[sha] = {
            "path": doc["path"],
            "facts": doc["facts"],
            "questions": len(rows),
            "candidate": _share([a for _, a, _ in rows]),
            "current": _share([b for _, _, b in rows]),
            "candidate_correct": sum(a for _, a, _ in rows),
            "current_correct": sum(b for _, _, b in rows),
            # facts asked about, and those with a held-out question answered ("knows 27 of 30 facts")
            "facts_asked": len({q.statement for q, _, _ in rows}),
            "facts_known": {
                "candidate": len({q.statement for q, a, _ in rows if a}),
                "current": len({q.statement for q, _, b in rows if b}),
            },
        }
    return {
        "questions": len(asked),
        "candidate": _share(cand),
        "current": _share(cur),
        "candidate_correct": sum(cand),
        "current_correct": sum(cur),
        "documents": per,
        "facts_asked": sum(d["facts_asked"] for d in per.values()),
        "facts_known": {side: sum(d["facts_known"][side] for d in per.values()) for side in ("candidate", "current")},
    }


def open_book_chats(asked: list[Asked], limit: int) -> tuple[list[Asked], list[list[dict[str, Any]]]]:
    """Up to ``limit`` of the asked questions that have retrieved passages, as the endpoint
    would send them (data/grounded.py)."""
    chosen = [a for a in asked if a.sources][:limit]
    chats = [
        grounded_messages([{"role": "user", "content": a.question}], [Source(**s) for s in a.sources]) for a in chosen
    ]
    return chosen, chats


def open_book_summary(asked: list[Asked], cand: list[str], cur: list[str]) -> dict[str, Any]:
    """Open-book recall (the fact's key phrase in the answer) and citation accuracy (of the
    answers that cite a passage, the share whose first cited passage holds the fact)."""

    def side(answers: list[str]) -> dict[str, Any]:
        right = [a.hit(text) for a, text in zip(asked, answers)]
        citing = []
        for a, text in zip(asked, answers):
            sources = [Source(**s) for s in a.sources]
            first = next(iter(cited(text, sources)), None)
            if first is not None:
                citing.append(a.hit(first.passage))  # the cited passage holds the fact's key phrase
        return {
            "recall": _share(right),
            "correct": sum(right),
            "citing": len(citing),
            "citation_accuracy": _share(citing),
        }

    return {"questions": len(asked), "candidate": side(cand), "current": side(cur)}


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _check(
    name: str, passed: bool | None, value: Any = None, threshold: Any = None, detail: str = ""
) -> dict[str, Any]:
    """A check as the fields of the gate's ``Check`` (the gate builds its record from them)."""
    return {"name": name, "passed": passed, "value": value, "threshold": threshold, "detail": detail}


def checks(
    asked: list[Asked], cand: list[bool], cur: list[bool], new_docs: set[str], settings: Settings, kind: str
) -> list[dict[str, Any]]:
    g = settings.gate
    if not asked:
        return [
            _check(
                "recall_kept",
                None,
                detail="no held-out study questions (the run's data has no documents with facts to ask about)",
            )
        ]
    known = [a for a, b in zip(cand, cur) if b]
    if not known:
        kept = _check(
            "recall_kept",
            None,
            {"questions": len(asked), "current_correct": 0},
            detail=f"the current model answers none of the {len(asked)} held-out study questions",
        )
    else:
        lost = 1 - sum(known) / len(known)
        ok = lost <= g.recall_max_drop
        kept = _check(
            "recall_kept",
            ok,
            {"lost": lost, "known_by_current": len(known), "still_known": sum(known), "questions": len(asked)},
            {"max_drop": g.recall_max_drop},
            f"of {len(known)} held-out facts the current model answers, the candidate answers "
            f"{sum(known)}" + ("" if ok else f": it forgot {lost:.0%}, more than {g.recall_max_drop:.0%}"),
        )
    return [kept, _gain(asked, cand, cur, new_docs, settings, kind)]


def _gain(
    asked: list[Asked], cand: list[bool], cur: list[bool], new_docs: set[str], settings: Settings, kind: str
) -> dict[str, Any]:
    if kind != "train" or not settings.gate.require_recall_gain:
        return _check(
            "recall_gain",
            None,
            detail=f"not required for a {kind} run"
            if kind != "train"
            else "not required (gate.require_recall_gain = false)",
        )
    rows = [(a, b) for q, a, b in zip(asked, cand, cur) if q.document in new_docs]
    if not rows:
        return _check("recall_gain", None, detail="no held-out questions from documents new to the current model")
    a, b = sum(x for x, _ in rows), sum(y for _, y in rows)
    ok = a > b
    return _check(
        "recall_gain",
        ok,
        {"candidate": a / len(rows), "current": b / len(rows), "questions": len(rows)},
        {"more_than_current": True},
        f"on {len(rows)} held-out questions about new documents the candidate answers {a}, the current "
        f"model {b}" + ("" if ok else ": the candidate has not learnt the new documents' facts"),
    )
