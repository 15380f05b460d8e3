"""Key slots of a sentence: the values a reader must get exactly right to know the fact.

Numbers with units, times, dates, money, percentages, phone numbers and extensions,
codes and identifiers, labelled places ("Room G14", "Code Ember"), quoted terms, e-mail
addresses and proper names. Patterns run in a fixed order and a span claimed by an
earlier one is not claimed again, so "extension 5150" is one slot, not a number as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_UNITS = (
    r"(?:(?:calendar|working|business|clear|consecutive|full)\s)?(?:seconds?|minutes?|mins|hours?|hrs|days?"
    r"|weeks?|months?|years?|beds?|characters?|times|miles?|km|kilometres?|metres?|meters?|kg|grams?|mg"
    r"|ml|litres?|degrees?|pence|cents?|dollars?|pounds?|euros?|people|patients?|nurses?|shifts?|points?"
    r"|pages?|signatures?|copies|visitors?|words?|digits?|floors?|rooms?|members?|staff|units?|doses?)"
)
_NUMBER_WORDS = "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty|hundred"
LABELS = (
    "room",
    "ward",
    "gate",
    "level",
    "floor",
    "bay",
    "building",
    "block",
    "wing",
    "lot",
    "suite",
    "bed",
    "code",
    "form",
    "unit",
    "theatre",
    "clinic",
    "door",
    "entrance",
    "zone",
    "desk",
    "locker",
    "platform",
)
_LABEL = "|".join(label.capitalize() + "|" + label for label in LABELS)
# A capitalised word, not a title ("Dr." starts a name, it is not one) and not part of "QLoRA".
_NAME_WORD = r"\b(?!(?:Dr|Mr|Mrs|Ms|Mx|Prof)\.)[A-Z][a-z]+(?:['\u2019][a-z]+)?(?:-[A-Z][a-z]+)?\b"
_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"  # "4,417" and "2.5", but not the comma after "$1,250,"
_TITLE = r"(?:(?:Dr|Mr|Mrs|Ms|Mx|Prof|Sister|Nurse)\.?\s)"

# Short all-capital words (IT, HR, ID, CEO) are acronyms, not codes: an identifier has a
# digit or a hyphen, or four capitals or more.
# (kind, pattern): order matters, earlier kinds claim their span first.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("quoted", re.compile(r"\"[^\"]{1,60}\"|\u201c[^\u201d]{1,60}\u201d")),
    (
        "time",
        re.compile(
            r"(?<![\w.:])\d{1,2}:\d{2}(?![\d:])(?:\s?[ap]\.?m\b\.?)?"  # not in "127.0.0.1:8088"
            r"|\b\d{1,2}\s?[ap]\.m\.|\b\d{1,2}\s?[ap]m\b"
        ),
    ),
    ("money", re.compile(rf"[$\u00a3\u20ac]\s?{_NUM}(?:\s?(?:million|billion|thousand)\b)?")),
    ("percent", re.compile(rf"\b{_NUM}\s?(?:%|percent\b|per cent\b)")),
    ("phone", re.compile(r"(?<![\w.:-])\+?\d{3,5}(?:[ -]\d{3,4}){1,3}\b")),
    ("extension", re.compile(r"\b(?:[Ee]xtension|[Ee]xt\.?|[Xx])\s?\d{2,6}\b")),
    (
        "labelled",
        re.compile(
            rf"\b(?:{_LABEL})\s+"
            r"(?:[A-Z]?\d+[A-Za-z]?(?:[.-]\d+)?|[A-Z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*)\b"
        ),
    ),
    (
        "date",
        re.compile(
            rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b(?:{_MONTHS})\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?"
            rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})(?:\s+\d{{4}})?|\b\d{{1,2}}(?:st|nd|rd|th)\b"
            rf"|\b(?:{_DAYS})s?\b|\b(?:{_MONTHS})\b"
        ),
    ),
    (
        "code",
        re.compile(
            r"\b(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Z])[A-Z0-9][A-Za-z0-9]*(?:-[A-Za-z0-9]+)+\b"
            r"|\b[A-Z]{1,4}\d+[A-Z0-9]*\b|\b[A-Z]{2,}(?:-[A-Za-z]+)+\b|\b[A-Z]{4,}\b"
        ),
    ),
    ("quantity", re.compile(rf"\b(?:{_NUM}|{_NUMBER_WORDS})(?:\s?-\s?|\s){_UNITS}\b", re.I)),
    ("number", re.compile(rf"(?<![\w.]){_NUM}\b")),
    ("name", re.compile(rf"{_TITLE}?{_NAME_WORD}(?:\s(?:(?:of|the|de|van|von|and|for)\s)?{_NAME_WORD})*")),
]
# Capitalised only because they open a sentence: never a name on their own.
_STARTERS = frozenset(
    "the a an our your their its this that these those every each all any some if when while "
    "after before during for in on at to by from with please no one staff patients".split()
)
PLACE_WORDS = frozenset(
    "room hall auditorium office lawn cafe café centre center hospital valley street road "
    "building wing park clinic unit ward lounge library garden gardens court house suite "
    "theatre station square lane avenue campus site block annex".split()
)
_NOT_NAMES = frozenset({"I", "I'm", "I've", "OK"})


@dataclass(frozen=True)
class Slot:
    value: str
    kind: str
    start: int
    end: int

    @property
    def label(self) -> str:
        """The noun a question asks for: "room" for "Room G14", "days" for "21 days", "" when none."""
        if self.kind == "labelled":
            return self.value.split()[0].lower()
        if self.kind == "extension":
            return "extension"
        if self.kind == "quantity":
            return re.split(r"\s?-\s?|\s", self.value, maxsplit=1)[1].lower()
        return ""

    @property
    def key(self) -> str:
        """The short phrase an answer must contain: the identifier without its label, a name as written."""
        if self.kind in ("labelled", "extension") and " " in self.value:
            return self.value.split(None, 1)[1]
        return self.value.strip('"\u201c\u201d')

    @property
    def person(self) -> bool:
        return self.kind == "name" and (
            bool(re.match(_TITLE, self.value))
            or self.value.split()[-1].lower() not in PLACE_WORDS
            and 2 <= len(self.value.split()) <= 4
            and not re.search(r"\s(?:of|the|and|for)\s", self.value)
        )


def find_slots(sentence: str, skip: tuple[str, ...] = ()) -> list[Slot]:
    """Key slots in order of position; values listed in skip (the organisation's name) are context, not slots."""
    taken = [False] * len(sentence)
    slots: list[Slot] = []
    for kind, pattern in PATTERNS:
        for match in pattern.finditer(sentence):
            start, end = _trim(kind, sentence, match.start(), match.end())
            if start >= end or any(taken[start:end]):
                continue
            value = sentence[start:end]
            if value in _NOT_NAMES or any(value.lower() == other.lower() for other in skip):
                continue
            slots.append(Slot(value, kind, start, end))
            taken[start:end] = [True] * (end - start)
    return sorted(slots, key=lambda slot: slot.start)


def _trim(kind: str, sentence: str, start: int, end: int) -> tuple[int, int]:
    """A name that opens the sentence loses a capitalised ordinary word; a lone one is no name at all."""
    if kind != "name" or sentence[:start].strip():
        return start, end
    words = sentence[start:end].split()
    if re.match(_TITLE, sentence[start:end]):
        return start, end
    if len(words) == 1:
        return start, start
    if words[0].lower() in _STARTERS:
        return sentence.index(words[1], start + len(words[0])), end
    return start, end
