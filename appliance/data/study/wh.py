"""Turning a statement around one of its key slots: the wh-phrase, and the three shapes of question.

"The day shift starts at 07:15." asked about 07:15 becomes an echo question ("The day shift
starts at what time?"), a fronted one ("At what time does the day shift start?") and an
embedded one, for "Do you know ...?" ("at what time the day shift starts"). Each shape is
None where the simple rules here would produce something ungrammatical; the templates then
use another shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.data.study.slots import PLACE_WORDS, Slot
from appliance.data.study.statements import (
    AUX,
    BASE_VERBS,
    LEXICAL,
    Statement,
    third_person,
)

PREPS = frozenset(
    "at on in by to from within for after before until beside near of under over through via "
    "between during with as into inside outside behind".split()
)
_PLACE_PREPS = frozenset("in at on beside near inside outside behind".split())
_STOP = PREPS | AUX | LEXICAL | frozenset("and or but so there here which who that when where while if".split())
_BASE = {third_person(verb): verb for verb in BASE_VERBS}
_COPULA = frozenset("is are was were".split())
_DURATIONS = frozenset(
    {
        "seconds",
        "minutes",
        "hours",
        "days",
        "weeks",
        "months",
        "years",
        "calendar days",
        "working days",
        "business days",
    }
)
_DAY_MODIFIERS = frozenset("every each first last next".split())
# A slot after these cannot move to the front of a question: "at least 72 hours" would leave "at least" behind.
_STRANDING = frozenset("least most to up than every first last of about around only over under a an the and or".split())
_CLAUSE_AFTER = re.compile(r",\s+(?:and|so|while|but|whereas|after which|which|however|then)\b|;")
_NOUN_FOR = {
    "time": "time",
    "date": "day",
    "money": "amount",
    "percent": "percentage",
    "phone": "number",
    "extension": "extension",
    "email": "address",
    "quantity": "figure",
    "number": "number",
    "code": "code",
    "quoted": "term",
}


@dataclass(frozen=True)
class Wh:
    start: int  # span of the statement's text the phrase replaces
    end: int
    phrase: str  # "at what time", "who", "which extension"
    appositive: str | None = None  # "the payroll officer" when the slot names that role's holder


def noun_for(slot: Slot) -> str:
    """The word for what a slot is, for "Just to confirm the exact ...": "time", "room", "name"."""
    if slot.kind == "labelled":
        return slot.label
    if slot.kind == "name":
        return "name" if slot.person else "place"
    return _NOUN_FOR.get(slot.kind, "detail")


def wh_for(st: Statement, slot: Slot) -> Wh:
    text = st.text
    start, end = slot.start, slot.end
    before = text[:start].split()
    prev = before[-1].lower() if before else ""
    appositive = _appositive(text, slot) if slot.person else None
    if slot.kind == "date" and prev in _DAY_MODIFIERS:
        # "every Wednesday", "on the first Monday": the whole phrase becomes "on which day"
        while before and before[-1].lower() in _DAY_MODIFIERS | {"the", "on"}:
            start -= len(before[-1]) + 1
            before = before[:-1]
        return Wh(start, end, "on which day")
    if prev in ("the", "a", "an") and slot.kind in ("name", "code", "date", "percent", "quantity", "labelled"):
        start -= len(before[-1]) + 1
        before, prev = before[:-1], (before[-2].lower() if len(before) > 1 else "")
    phrase, end = _phrase(text, slot, end, prev, article=text[start : slot.start].strip().lower())
    stranded = len(before) > 1 and before[-2].lower() in ("up", "than")  # "up to 6 days"
    if (prev == "at" and slot.kind == "time") or (prev == "for" and slot.label in _DURATIONS):
        # "at 07:15" -> "when", "for 45 minutes" -> "how long": the preposition goes with the phrase
        start -= len(before[-1]) + 1
        return Wh(start, end, "when" if slot.kind == "time" else "how long")
    if phrase == "where" and prev in _PLACE_PREPS:
        start -= len(before[-1]) + 1
    elif prev in PREPS and not (prev == "between" or phrase.startswith("a ") or stranded):
        start -= len(before[-1]) + 1
        phrase = f"{prev} {'whom' if phrase == 'who' else phrase}"
    return Wh(start, end, phrase, lower_first(appositive) if appositive else None)


def _phrase(text: str, slot: Slot, end: int, prev: str, article: str) -> tuple[str, int]:
    """The wh-words for this slot, and the end of the span they replace (a following noun may go with them)."""
    nouns = _following_nouns(text, end)
    kind = slot.kind
    if kind == "quantity" and "-" in slot.value and nouns:
        unit = slot.label if slot.label.endswith("s") else slot.label + "s"
        return f"a {nouns[0]} with how many {unit}", end + len(" " + nouns[0])
    if nouns and article and kind == "date":
        last = nouns[-1]  # "the Thursday clinic" -> "which day's clinic"
        return f"which day's {' '.join(nouns)}", text.index(last, end) + len(last)
    if nouns and article and kind in ("code", "percent", "name", "quantity"):
        last = nouns[-1]
        return f"{'what' if article in ('a', 'an') else 'which'} {' '.join(nouns)}", text.index(last, end) + len(last)
    if prev in _COPULA and kind in ("phone", "number", "quoted", "code", "email"):
        return "what", end
    if kind == "name":
        place_word = slot.value.split()[-1].lower()
        if slot.person:
            return "who", end
        if prev in ("called", "named") or prev in _COPULA:
            return "what", end
        if place_word in PLACE_WORDS and len(slot.value.split()) > 1:
            return f"which {place_word}", end
        return ("where" if prev in _PLACE_PREPS else "what"), end
    return _simple_phrase(slot, nouns), end


def _simple_phrase(slot: Slot, nouns: list[str]) -> str:
    kind = slot.kind
    if kind == "quantity":
        return f"how many {slot.label if slot.label != 'times' else 'times'}"
    if kind == "number":
        return "how many" if nouns else "what number"
    if kind == "date":
        return "which day" if re.search(r"day\b|\d(?:st|nd|rd|th)$", slot.value) else "what date"
    if kind == "labelled" or kind == "extension":
        return f"which {slot.label}"
    return {
        "time": "what time",
        "money": "how much",
        "percent": "what percentage",
        "phone": "what number",
        "email": "which address",
        "code": "which code",
        "quoted": "what",
    }.get(kind, "what")


def _following_nouns(text: str, end: int) -> list[str]:
    """Lower-case words right after the slot, up to punctuation or a function word: "sepsis tool"."""
    nouns = []
    run = re.match(r"[ A-Za-z-]*", text[end:])
    for word in (run.group(0) if run else "").split():
        if word.lower() in _STOP or not word.islower():
            break
        nouns.append(word)
    return nouns[:3]


def _appositive(text: str, slot: Slot) -> str | None:
    """ "the payroll officer" in "... go to the payroll officer, Anselm Greaves.": the role the name holds."""
    head, tail = text[: slot.start], text[slot.end :]
    if not head.endswith(", ") or tail[:1] not in (",", "."):
        return None
    words = head[:-2].split()
    for back in range(1, min(len(words), 6) + 1):
        if words[-back].lower() in ("the", "our", "your", "a", "an"):
            return " ".join(words[-back:])
    return None


def first_person(text: str) -> str:
    """The asker's voice: the handbook's "you" and "your" become "I"/"me" and "my"."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        low = word.lower()
        if low in ("your", "yourself"):
            out = {"your": "my", "yourself": "myself"}[low]
        else:
            before = text[: match.start()].split()
            after = text[match.end() :].split()
            prev = before[-1].lower() if before else ""
            nxt = after[0].lower().strip(",.?") if after else ""
            subject = prev in AUX or nxt in AUX or nxt in LEXICAL or nxt in _SUBJECT_VERBS or nxt.endswith("-certify")
            out = "I" if subject else "me"
        return out.capitalize() if word[0].isupper() and out != "I" else out

    swapped = re.sub(r"\b(?:[Yy]ou|[Yy]our|[Yy]ourself)\b", swap, text)
    return re.sub(r"\bI are\b", "I am", re.sub(r"\bI were\b", "I was", re.sub(r"\bare I\b", "am I", swapped)))


_SUBJECT_VERBS = frozenset("join wait arrive leave resign work start need want".split())


def lower_first(text: str, keep: bool = False) -> str:
    """Lower-case the first letter unless the first word is a name, acronym or "I"."""
    first = text.split()[0] if text.split() else ""
    if keep or not first or first == "I" or first[1:2].isupper() or first.startswith(("Dr.", "I'")):
        return text
    return text[0].lower() + text[1:]


def _clean(text: str) -> str:
    return re.sub(r"\s+([,?])", r"\1", " ".join(text.split())).strip(" ,")


def _tail(st: Statement, wh: Wh) -> str:
    """The text after the slot, without a following clause that the question is not about."""
    after = st.text[wh.end :]
    join = _CLAUSE_AFTER.search(after)
    return (after[: join.start()] if join else after).rstrip(" .!")


def echo(st: Statement, wh: Wh) -> str | None:
    if wh.appositive:
        return None
    body = _clean(st.text[: wh.start] + wh.phrase + _tail(st, wh))
    return first_person(body[0].upper() + body[1:] + "?")


def _parts(st: Statement, wh: Wh) -> tuple[str, str, str, str] | None:
    """(front, subject, between, after) for a slot in the predicate, or None where moving it is unsafe."""
    if not st.subject or not st.verb or wh.start <= st.verb_start or wh.appositive:
        return None
    verb_end = st.verb_start + len(st.verb)
    between, after = st.text[verb_end : wh.start], _tail(st, wh)
    last = between.split()[-1].lower() if between.split() else ""
    first = after.split()[0].lower() if after.split() else ""
    if (
        "," in between
        or last in _STRANDING
        or first in ("and", "or", "-", "the", "a", "an")
        or re.match(r"\s*to\s+\d", after)
        or wh.phrase.startswith("a ")
    ):
        return None  # a second clause, one end of a range, or a modifier that would be left behind
    of_phrase = re.match(r"\s+of\s+[^,.;]*", after)
    front = wh.phrase
    if of_phrase:
        words = of_phrase.group(0).split()
        if len(words) > 4 or any(w.lower() in AUX or w.lower() in LEXICAL for w in words):
            return None
        front, after = f"{front} {' '.join(words)}", after[of_phrase.end() :]
    subject = lower_first(st.subject, keep=any(s.start == 0 for s in st.slots))
    return front, subject, between, after


def _is_subject(st: Statement, wh: Wh) -> bool:
    """The slot is the whole subject: "Dr. Priya Castellane leads ..."."""
    return bool(st.subject) and wh.start <= 0 < st.verb_start and st.text[wh.end : st.verb_start].strip(" ,") == ""


def fronted(st: Statement, wh: Wh) -> str | None:
    """ "At what time does the day shift start?"; for a slot that is the subject: "Who leads ...?"."""
    if wh.appositive:
        return f"Who is {wh.appositive}?"
    if _is_subject(st, wh):
        return first_person(_clean(f"{wh.phrase.capitalize()} {_tail(st, wh)}") + "?")
    parts = _parts(st, wh)
    if parts is None:
        return None
    front, subject, between, after = parts
    verb = (st.verb or "").lower()
    if verb in AUX:
        body = f"{front} {verb} {subject} {between} {after}"
    else:
        body = f"{front} {'does' if verb in _BASE else 'do'} {subject} {_BASE.get(verb, verb)} {between} {after}"
    return first_person(_clean(body[0].upper() + body[1:]) + "?")


def embedded(st: Statement, wh: Wh) -> str | None:
    """ "at what time the day shift starts", to follow "Do you know"."""
    if wh.appositive:
        return f"who {wh.appositive} is"
    if _is_subject(st, wh):
        return first_person(_clean(f"{wh.phrase} {_tail(st, wh)}"))
    parts = _parts(st, wh)
    if parts is None:
        return None
    front, subject, between, after = parts
    return first_person(_clean(f"{front} {subject} {st.verb} {between} {after}"))


def cloze(st: Statement, slot: Slot) -> str:
    return st.text[: slot.start] + "___" + st.text[slot.end :]
