"""The study stage's model-free core: a document becomes training conversations covering every fact it states.

Raw text trained with next-token loss teaches a model the style of a document, not its
facts; a fact is learnt when it is seen many times, phrased many ways, as the question it
will be asked. ``study_document`` cuts the text into passages, the passages into atomic
statements with key slots, and writes for each statement several differently phrased
questions answered by the statement in full, plus a few two-fact questions and re-told
passages for continued pretraining. Answers whose key tokens are not in their passage are
dropped and counted; one phrasing per statement is held out for testing. No model, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise

from appliance.data.study import heldout as H
from appliance.data.study import questions as Q
from appliance.data.study.passages import CountTokens, Passage
from appliance.data.study.passages import passages as cut_passages
from appliance.data.study.statements import Statement
from appliance.data.study.statements import statements as extract
from appliance.data.study.support import unsupported_reason

_SOURCE_WORDS = (
    "handbook",
    "policy",
    "policies",
    "protocol",
    "guide",
    "guidelines",
    "manual",
    "procedure",
    "procedures",
    "handout",
    "leaflet",
    "rules",
)


@dataclass
class StudyMaterial:
    document: str
    passages: list[Passage] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)  # OpenAI messages plus statement/passage/document
    paraphrases: list[dict] = field(default_factory=list)  # {"text", "passage", "document"}
    heldout: list[dict] = field(default_factory=list)  # {"question", "expected", "statement", ...}
    counts: dict[str, int] = field(default_factory=dict)
    reason: str | None = None  # why there are no conversations, in one sentence


def source_name(text: str) -> str:
    """ "the handbook" when the document's first heading says what it is; "the documents" otherwise."""
    first = next((line.strip("# ").lower() for line in text.splitlines() if line.strip()), "")
    for word in _SOURCE_WORDS:
        if re.search(rf"\b{word}\b", first):
            return f"the {word}"
    return "the documents"


def study_document(
    text: str,
    doc_sha256: str,
    org_name: str | None = None,
    count_tokens: CountTokens | None = None,
    seed: int = 0,
    max_tokens: int = 256,
) -> StudyMaterial:
    material = StudyMaterial(document=doc_sha256)
    material.passages = cut_passages(text or "", max_tokens=max_tokens, count_tokens=count_tokens)
    skip = (org_name,) if org_name else ()
    for passage in material.passages:
        material.statements.extend(extract(passage, len(material.statements), skip))
    counts = {
        "passages": len(material.passages),
        "statements": len(material.statements),
        "questions": 0,
        "unsupported": 0,
        "heldout": 0,
        "multi": 0,
        "paraphrases": 0,
    }
    shared = _shared_subjects(material.statements)
    source = source_name(text or "")
    for passage in material.passages:
        sts = [st for st in material.statements if st.passage == passage.index]
        setting = Q.Setting(org=org_name, source=source, rng=Q.rng_for(passage, seed))
        _study_passage(material, passage, sts, setting, shared, seed, counts)
    _drop_leaks(material, counts)
    material.counts = counts
    if not material.conversations:
        material.reason = _reason(text or "", material)
    return material


def _study_passage(
    material: StudyMaterial,
    passage: Passage,
    sts: list[Statement],
    setting: Q.Setting,
    shared: set[str],
    seed: int,
    counts: dict[str, int],
) -> None:
    allowed = (setting.org,) if setting.org else ()
    firsts: list[tuple[Statement, Q.Question]] = []
    for st in sts:
        training, held = H.split(Q.slot_questions(st, setting), seed)
        training += Q.topic_questions(st, setting, shared)
        for question in training:
            reply = Q.answer(st, question, setting)
            counts["questions"] += 1
            if unsupported_reason(reply, passage, allowed):
                counts["unsupported"] += 1
                continue
            material.conversations.append(Q.conversation(question, reply, material.document))
        material.heldout.extend(_heldout_item(q, material.document) for q in held)
        plain = [q for q in training if q.template in ("direct", "echo")]
        firsts.extend((st, q) for q in plain[:1])  # a plain question reads well inside "Two things: ..."
    pairs = [(a, qa, b, qb) for (a, qa), (b, qb) in pairwise(firsts)]
    for question, reply in Q.multi_fact(pairs, setting):
        counts["questions"] += 1
        if unsupported_reason(reply, passage, allowed):
            counts["unsupported"] += 1
            continue
        counts["multi"] += 1
        material.conversations.append(Q.conversation(question, reply, material.document, kind="multi"))
    for text in Q.paraphrases(passage, sts, setting):
        counts["paraphrases"] += 1
        material.paraphrases.append({"text": text, "passage": passage.index, "document": material.document})


def _heldout_item(question: Q.Question, document: str) -> dict:
    return {
        "question": question.text,
        "expected": list(question.expected),
        "statement": question.statement,
        "passage": question.passage,
        "template": question.template,
        "shape": question.shape,
        "document": document,
    }


def _shared_subjects(sts: list[Statement]) -> set[str]:
    """Subjects of more than one statement: "What does the handbook say about passwords?" has no one answer."""
    seen: set[str] = set()
    shared: set[str] = set()
    for st in sts:
        key = (st.subject or "").lower()
        (shared if key in seen else seen).add(key)
    return shared


def _drop_leaks(material: StudyMaterial, counts: dict[str, int]) -> None:
    """A held-out question that another statement's training happens to contain is no longer held out."""
    texts = [m["content"] for c in material.conversations for m in c["messages"]]
    leaked = set(H.leaks([item["question"] for item in material.heldout], texts))
    material.heldout = [item for item in material.heldout if item["question"] not in leaked]
    counts["heldout"] = len(material.heldout)


def _reason(text: str, material: StudyMaterial) -> str:
    if not text.strip():
        return "the document holds no text"
    if not material.statements:
        return "no statements found: the document has no sentences of prose (only headings, numbers or table rows)"
    return "no questions could be written: none of the statements names a number, time, code, name or other key fact"
