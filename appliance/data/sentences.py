"""Prose cut into sentences, for the study stage (statements) and the passage index alike.

Written by hand: NLTK's and spaCy's splitters need model data that an offline machine does
not have, and staff documents need only a few rules (abbreviations, initials, decimals and
times do not end a sentence).
"""

from __future__ import annotations

import re

# A period after these never ends a sentence ("Dr. Wren", "e.g. a badge", "No. 4").
ABBREVIATIONS = frozenset(
    {
        "dr",
        "mr",
        "mrs",
        "ms",
        "mx",
        "prof",
        "st",
        "sr",
        "jr",
        "no",
        "nos",
        "vs",
        "cf",
        "approx",
        "dept",
        "ext",
        "fig",
        "tel",
        "mt",
        "rev",
        "gen",
        "col",
        "sgt",
        "capt",
        "lt",
        "e.g",
        "i.e",
        "eg",
        "ie",
        "incl",
    }
)
_BOUNDARY = re.compile(r"([.!?]+)([\"'\u201d\u2019)\]]*)\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph; abbreviations, initials, decimals and times do not end one."""
    text = " ".join(text.split())
    out: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if not _ends_sentence(text, match):
            continue
        out.append(text[start : match.end()].strip())
        start = match.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _ends_sentence(text: str, match: re.Match[str]) -> bool:
    following = text[match.end() : match.end() + 1]
    if not following or not (following.isupper() or following.isdigit() or following in "\"'(\u201c["):
        return False  # "e.g. the", "approx. 4": a lower-case word goes on the same sentence
    if match.group(1) != ".":
        return True
    before = text[: match.start()].split()
    word = before[-1].lstrip("([\"'").lower() if before else ""
    if word in ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):
        return False
    return not re.fullmatch(r"[A-Za-z]", word)  # an initial: "J. Smith"
