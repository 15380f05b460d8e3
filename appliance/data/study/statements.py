"""Atomic statements of a passage: one per sentence, or one per clause where a sentence joins two facts.

Each statement keeps its key slots, the heading it sits under (its subject context), and,
when a simple parse finds them, its grammatical subject and main verb, which the question
templates need to turn the statement around. A leading "It"/"They" is resolved to the
subject of the statement before it, so a statement still makes sense on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from appliance.data.study.passages import Passage
from appliance.data.study.slots import Slot, find_slots

AUX = frozenset("is are was were be must should shall may might can could will would has have had does do did".split())
BASE_VERBS = (
    "begin start end open close run meet last take cost pay lead answer get give receive use connect "
    "gather arrange assign offer expect need require cover serve hold keep go happen apply allow include "
    "report call work sit stay lock test sign return reach manage chair approve check carry issue provide "
    "record log visit support handle own print publish review send bring read save dial phone screen ask "
    "tell wear wash follow contact complete submit remember make write escalate inform"
).split()


def third_person(verb: str) -> str:
    """ "go" -> "goes", "carry" -> "carries", "start" -> "starts"."""
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


LEXICAL = frozenset(BASE_VERBS) | frozenset(third_person(verb) for verb in BASE_VERBS)
_BASE_FORMS = frozenset(BASE_VERBS)
MAX_SUBJECT_WORDS = 8
# A subject never starts with these: the sentence opens with a clause or an adverbial instead.
_NOT_SUBJECT = frozenset(
    "if when while because although though before after during on in at for to from by with "
    "without unless until once as so".split()
)
_SUBJECT_OPENERS = frozenset("the a an our your their each every all no this these those".split())
_PRONOUNS = frozenset("it they he she".split())
_NAMED_SUBJECT = re.compile(r"(?:Dr|Mr|Mrs|Ms|Prof)\.|[A-Z][a-z]+ [A-Z]")  # "Dr. Wren is ...", "Ines Marlowe ..."
_JOINS = re.compile(r",\s+(?:and|while|but|whereas)\s+|;\s+")
MIN_WORDS = 3


@dataclass
class Statement:
    index: int
    passage: int
    text: str
    slots: list[Slot] = field(default_factory=list)
    context: str | None = None  # the heading the statement sits under
    subject: str | None = None  # "The day shift" in "The day shift starts at 07:15."
    verb: str | None = None  # "starts"
    verb_start: int = -1  # offset of the verb in text


def is_fact_like(text: str) -> bool:
    """Prose with words, not a bare row of numbers, a heading or a question."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", text)
    return len(words) >= MIN_WORDS and not text.rstrip().endswith("?")


def split_clauses(sentence: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Split "X is A, and Y is B" at the join only when both sides hold a key slot and the right one has
    its own subject; anything less certain stays one statement, which is never wrong, only bigger."""
    for match in _JOINS.finditer(sentence):
        left, right = sentence[: match.start()].strip(), sentence[match.end() :].strip()
        first = right.split()[0] if right.split() else ""
        own_subject = first.lower() in _SUBJECT_OPENERS or bool(_NAMED_SUBJECT.match(right))
        if (
            own_subject
            and len(left.split()) >= MIN_WORDS
            and len(right.split()) >= MIN_WORDS
            and find_slots(left, skip)
            and find_slots(right, skip)
            and parse_clause(right)[1]
        ):
            return [_sentence_case(left)] + split_clauses(_sentence_case(right), skip)
    return [sentence]


def _sentence_case(text: str) -> str:
    text = text.strip().rstrip(",;")
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def parse_clause(text: str) -> tuple[str | None, str | None, int]:
    """(subject, verb, verb offset): the words before the first known verb, when they can be a subject."""
    words = list(re.finditer(r"[A-Za-z'-]+", text))
    for number, match in enumerate(words):
        word = match.group(0).lower()
        if number == 0:
            if word in LEXICAL and word not in AUX:
                return None, None, -1  # an instruction: "Screen every adult..."
            continue
        if not _is_verb(words, number):
            continue
        subject = text[: match.start()].strip().strip(",")
        if subject.split()[0].lower() in _NOT_SUBJECT or len(subject.split()) > MAX_SUBJECT_WORDS:
            return None, None, -1
        return subject, match.group(0), match.start()
    return None, None, -1


def _is_verb(words: list[re.Match[str]], number: int) -> bool:
    """A listed verb, except a base form that is really a noun ("an incident report must") or sits in a
    relative clause ("patients who need isolation are")."""
    word = words[number].group(0).lower()
    if word in AUX:
        return True
    if word not in LEXICAL:
        return False
    before = words[number - 1].group(0).lower()
    after = words[number + 1].group(0).lower() if number + 1 < len(words) else ""
    if before in ("who", "that", "which", "to"):
        return False
    if words[number].string[words[number].end() :].startswith(","):
        return False  # "the practice development lead, Hollis Bramwell, arranges": a noun before an apposition
    return not (word in _BASE_FORMS and (after in AUX or (after in LEXICAL and after not in _BASE_FORMS)))


def _resolve_pronoun(text: str, previous: Statement | None) -> str:
    """ "It is on Level 3." after "The staff restaurant is called ..." reads "The staff restaurant is on Level 3."."""
    first = text.split()[0] if text.split() else ""
    if first.lower() not in _PRONOUNS or previous is None or not previous.subject:
        return text
    if parse_clause(text)[0] != first:
        return text  # "It" is not the whole subject here
    if previous.subject.split()[0].lower() in _PRONOUNS:
        return text
    subject = previous.subject[0].upper() + previous.subject[1:]
    return subject + text[len(first) :]


def statements(passage: Passage, start_index: int = 0, skip: tuple[str, ...] = ()) -> list[Statement]:
    """The passage's statements, numbered from start_index; table rows and non-prose lines are left out."""
    out: list[Statement] = []
    for sentence in passage.sentences:
        if sentence.kind == "row" or not is_fact_like(sentence.text):
            continue
        for clause in split_clauses(sentence.text, skip):
            text = _resolve_pronoun(clause, out[-1] if out else None)
            subject, verb, verb_start = parse_clause(text)
            out.append(
                Statement(
                    index=start_index + len(out),
                    passage=passage.index,
                    text=text,
                    slots=find_slots(text, skip),
                    context=passage.heading,
                    subject=subject,
                    verb=verb,
                    verb_start=verb_start,
                )
            )
    return out
