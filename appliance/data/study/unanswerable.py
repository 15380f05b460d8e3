"""Questions a document does not answer, made from its own words, for "The documents do not say".

A model trained to answer from its sources must also learn when they hold nothing: the
question sounds like the organisation's own ("When does the main pharmacy close?") but no
document states it. Such questions are made here by crossing one statement's subject with
another statement's predicate where the document never pairs them: from "The day shift
starts at 07:15." and "Dr. Priya Castellane leads infection prevention." nothing is made
(a person and a thing); from "The main pharmacy closes at 19:45." and "The staff restaurant
is called the Birch Cafe." comes "At what time does the staff restaurant close?", which the
document does not answer. A pair is refused when any statement already has that subject
with that verb ("The night shift starts at 19:15." rules out "When does the night shift
start?"), or when the subject's head word already occurs in the predicate's statement.

Written by hand: no library makes negative questions for RAFT; the question shapes are the
study stage's own (``wh.py``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from appliance.data.study import wh as W
from appliance.data.study.slots import Slot, find_slots
from appliance.data.study.statements import AUX, Statement, parse_clause

MAX_SUBJECT_WORDS = 6  # longer subjects carry a clause of their own and read badly in another sentence
# Definite subjects name one thing of the organisation (a place, a service, a role), so another
# statement's predicate about them reads as a real question; "incidents" or "lockers" do not.
_DEFINITE = frozenset("the our".split())
_CLAUSE_WORDS = frozenset("who that which whose where when".split())
_SINGULAR_AUX = frozenset("is was has does".split())
_PLURAL_AUX = frozenset("are were have do".split())
WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Parsed:
    text: str
    subject: str
    verb: str
    verb_start: int
    person: bool  # the subject names a person
    plural: bool | None  # the verb's number; None after a modal ("must", "can")

    @property
    def predicate(self) -> str:
        return self.text[self.verb_start :]


def parse(text: str, skip: tuple[str, ...] = ()) -> Parsed | None:
    """A statement with a subject of its own (not a pronoun, not the reader) and a verb."""
    subject, verb, start = parse_clause(text)
    if not subject or not verb or start <= 0:
        return None
    words = subject.lower().split()
    person = any(s.person for s in find_slots(subject, skip))
    if len(words) > MAX_SUBJECT_WORDS or _CLAUSE_WORDS & set(words) or not (person or words[0] in _DEFINITE):
        return None
    return Parsed(text, subject, verb, start, person, _plural(verb))


def _plural(verb: str) -> bool | None:
    low = verb.lower()
    if low in _SINGULAR_AUX:
        return False
    if low in _PLURAL_AUX:
        return True
    if low in AUX:
        return None
    return not low.endswith("s")


def _pairs_already(parsed: list[Parsed]) -> set[tuple[str, str]]:
    return {(p.subject.lower(), p.verb.lower()) for p in parsed}


def _question(subject_of: Parsed, predicate_of: Parsed, skip: tuple[str, ...]) -> str | None:
    """The predicate's statement retold about the other subject, asked about one of its key slots."""
    subject = subject_of.subject
    text = f"{subject[0].upper()}{subject[1:]} {predicate_of.predicate}"
    verb_start = len(subject) + 1
    found = find_slots(text, skip)
    slots = [s for s in found if s.start > verb_start]
    if not slots:
        return None
    st = Statement(0, 0, text, found, subject=subject, verb=predicate_of.verb, verb_start=verb_start)
    slot: Slot = slots[0]
    return W.fronted(st, W.wh_for(st, slot))


def questions(statements: list[str], count: int, rng: random.Random, skip: tuple[str, ...] = ()) -> list[str]:
    """Up to ``count`` questions the statements do not answer, chosen by ``rng``."""
    parsed = [p for p in (parse(text, skip) for text in statements) if p]
    stated = _pairs_already(parsed)
    candidates: list[str] = []
    seen: set[str] = set()
    for predicate_of in parsed:
        words = set(WORD.findall(predicate_of.text.lower()))
        for subject_of in parsed:
            if subject_of.person != predicate_of.person or subject_of.plural != predicate_of.plural:
                continue
            if subject_of.subject.lower() == predicate_of.subject.lower():
                continue
            if (subject_of.subject.lower(), predicate_of.verb.lower()) in stated:
                continue
            head = WORD.findall(subject_of.subject.lower())
            if not head or head[-1] in words:
                continue
            question = _question(subject_of, predicate_of, skip)
            if question and question.lower() not in seen:
                seen.add(question.lower())
                candidates.append(question)
    rng.shuffle(candidates)
    return candidates[:count]
