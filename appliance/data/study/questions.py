"""Deterministic training questions for each statement, and restatements of each passage.

A fact is learnt when it is seen many times, phrased many ways, in the question-and-answer
form it will be asked in. So every key slot of a statement gets questions from several
templates (direct, echo, "Do you know ...", a new employee's, an expert's, with and without
the organisation's name), and every answer restates the whole statement in a sentence, so
it carries every key slot. Randomness (which answer framing, which statements are paired)
comes from a Random seeded by the passage's text, so the output is the same on every run.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.data.study import wh as W
from appliance.data.study.passages import Passage
from appliance.data.study.slots import Slot
from appliance.data.study.statements import Statement


@dataclass(frozen=True)
class Question:
    text: str
    template: str
    statement: int
    passage: int
    expected: tuple[str, ...]  # the key phrases a correct answer contains
    shape: str = "other"  # "fronted", "echo", "embedded" or "other": what heldout.py holds back


@dataclass
class Setting:
    """What the templates may mention: the organisation and what to call the document."""

    org: str | None = None
    source: str = "the documents"
    rng: random.Random = field(default_factory=random.Random)


Template = Callable[[Statement, Slot, W.Wh, Setting], "str | None"]


def _direct(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    return W.fronted(st, wh) or W.echo(st, wh)


def _echo(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    return W.echo(st, wh)


def _indirect(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    inner = W.embedded(st, wh)
    return f"Do you know {inner}?" if inner else None


def _could_you(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    inner = W.embedded(st, wh)
    return f"Could you tell me {inner}?" if inner else None


def _new_employee(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    question = _direct(st, slot, wh, s)
    return f"I'm new here \u2014 {W.lower_first(question)}" if question else None


def _org(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    question = _direct(st, slot, wh, s)
    return f"At {s.org}, {W.lower_first(question)}" if question and s.org else None


def _org_indirect(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    inner = W.embedded(st, wh)
    return f"Does anyone know {inner} here at {s.org}?" if inner and s.org else None


def _expert(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    question = _direct(st, slot, wh, s)
    return f"Just to confirm the exact {W.noun_for(slot)}: {W.lower_first(question)}" if question else None


def _context(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    question = W.echo(st, wh) or _direct(st, slot, wh, s)
    return f"A question about {st.context.lower()}: {W.lower_first(question)}" if question and st.context else None


def _cloze(st: Statement, slot: Slot, wh: W.Wh, s: Setting) -> str | None:
    return f'Fill in the blank from {s.source}: "{W.cloze(st, slot)}"'


# Order is the order questions are written in; heldout.py rotates which template a statement keeps back.
TEMPLATES: dict[str, Template] = {
    "direct": _direct,
    "echo": _echo,
    "indirect": _indirect,
    "could_you": _could_you,
    "new_employee": _new_employee,
    "org": _org,
    "org_indirect": _org_indirect,
    "expert": _expert,
    "context": _context,
    "cloze": _cloze,
}


def rng_for(passage: Passage, seed: int) -> random.Random:
    """One Random per passage, seeded by its text: the same document and seed give the same output."""
    digest = hashlib.sha256(f"{seed}\0{passage.heading}\0{passage.text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def slot_questions(st: Statement, setting: Setting) -> list[Question]:
    """Every template's question for every key slot, without duplicates."""
    out: list[Question] = []
    seen: set[str] = set()
    for slot in st.slots:
        wh = W.wh_for(st, slot)
        cores = [
            (shape, core(st, wh))
            for shape, core in (("fronted", W.fronted), ("embedded", W.embedded), ("echo", W.echo))
        ]
        for name, template in TEMPLATES.items():
            text = template(st, slot, wh, setting)
            if text and text.lower() not in seen:
                seen.add(text.lower())
                out.append(Question(text, name, st.index, st.passage, expected_for(slot), _shape(text, cores)))
    return out


def _shape(text: str, cores: list[tuple[str, str | None]]) -> str:
    """Which sentence shape a question is built on, whatever its framing ("I'm new here — ...")."""
    low = text.lower()
    for shape, core in cores:
        if core and core.rstrip("?").lower() in low:
            return shape
    return "other"


def topic_questions(st: Statement, setting: Setting, shared_subjects: set[str]) -> list[Question]:
    """ "What does the handbook say about my preceptor?" for a statement with a subject of its own."""
    if not st.subject or st.subject.lower() in shared_subjects or st.subject.split()[0].lower() in ("we", "you", "i"):
        return []
    subject = W.first_person(W.lower_first(st.subject))
    expected = tuple(key for slot in st.slots for key in expected_for(slot)[:1])
    texts = [(f"What does {setting.source} say about {subject}?", "topic")]
    if st.verb and st.verb.lower() in ("must", "should", "may") and not any(s.person for s in st.slots):
        texts.append((f"What is the rule on {subject}?", "topic_rule"))
    return [Question(text, name, st.index, st.passage, expected) for text, name in texts]


def expected_for(slot: Slot) -> tuple[str, ...]:
    """Key phrases for a slot: the identifier itself, and a person's surname as an alternative."""
    key = slot.key
    if slot.person:
        surname = key.split()[-1]
        return (key, surname) if surname != key else (key,)
    return (key,)


def answer(st: Statement, question: Question, setting: Setting) -> str:
    """The statement restated in full (so every key slot is in it), in one of a few framings."""
    text = st.text
    keep_case = any(slot.start == 0 for slot in st.slots)
    framings = [text, f"According to {setting.source}, {W.lower_first(text, keep_case)}"]
    if setting.org and not text.startswith(("At ", "If ", "On ", "For ", "To ")):
        framings.append(f"At {setting.org}, {W.lower_first(text, keep_case)}")
    if question.template in ("indirect", "could_you", "org_indirect"):
        framings.append(f"Yes. {text}")
    return setting.rng.choice(framings)


def conversation(question: Question, reply: str, document: str, kind: str = "slot") -> dict:
    return {
        "messages": [{"role": "user", "content": question.text}, {"role": "assistant", "content": reply}],
        "statement": question.statement,
        "passage": question.passage,
        "document": document,
        "kind": kind,
        "template": question.template,
        "shape": question.shape,
    }


def multi_fact(
    pairs: list[tuple[Statement, Question, Statement, Question]], setting: Setting, limit: int = 3
) -> list[tuple[Question, str]]:
    """Two facts of one passage asked together, answered with both statements."""
    chosen = setting.rng.sample(pairs, min(limit, len(pairs)))
    out = []
    for first, q1, second, q2 in chosen:
        text = f"Two things: {q1.text} And {W.lower_first(q2.text)}"
        question = Question(text, "multi", first.index, first.passage, q1.expected + q2.expected, "multi")
        out.append((question, f"{first.text} {second.text}"))
    return out


def paraphrases(passage: Passage, sts: list[Statement], setting: Setting) -> list[str]:
    """The passage's statements re-told: reordered, framed by the source, as key points; extra pretraining text."""
    texts = [st.text for st in sts]
    if not texts:
        return []
    keep = any(slot.start == 0 for slot in sts[0].slots)
    out = [f"According to {setting.source}, {W.lower_first(texts[0], keep)} " + " ".join(texts[1:])]
    shuffled = texts[:]
    setting.rng.shuffle(shuffled)
    says = "say" if setting.source.endswith("s") else "says"
    where = f'In the section "{passage.heading}", ' if passage.heading else ""
    out.append(f"{where}{setting.source} {says}: " + " ".join(shuffled))
    out.append(
        "Key points"
        + (f" on {passage.heading.lower()}" if passage.heading else "")
        + ":\n"
        + "\n".join(f"- {text}" for text in texts)
    )
    if setting.org:
        out.append(f"Staff at {setting.org} should know the following. " + " ".join(reversed(texts)))
    return [text[0].upper() + text[1:] for text in out]
