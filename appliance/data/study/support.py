"""Is a generated answer supported by its passage? Every key token it states must occur there.

Key tokens are what a wrong answer would get wrong: every number, and the slots
(codes, names, times, amounts) found in each of its sentences. Comparison is on a
normalised form (case, punctuation, "4,417" = "4417", "07:45" = "7:45") and on whole
tokens, so "4417" is not supported by "44170". Framing words ("According to the
handbook") carry no key tokens; the organisation's name is passed as allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from appliance.data.study.passages import Passage, split_sentences
from appliance.data.study.slots import find_slots


def normalise(text: str) -> str:
    """Lower case, digit grouping and leading zeros gone, one space between word tokens."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    # Letters and digits only, so a key is compared whole-token to whole-token ("2" is not "2.0"'s
    # prefix: both are split the same way); leading zeros go, so "07:45" is "7:45".
    return " ".join(token.lstrip("0") or "0" if token.isdigit() else token for token in re.findall(r"[a-z0-9]+", text))


def key_tokens(answer: str, skip: Iterable[str] = ()) -> list[str]:
    """The slot values of each sentence of the answer, and every token holding a digit."""
    keys: list[str] = []
    for sentence in split_sentences(answer):
        keys.extend(slot.value for slot in find_slots(sentence, tuple(skip)))
    keys.extend(re.findall(r"\S*\d\S*", answer))
    seen: set[str] = set()
    out = []
    for key in keys:
        norm = normalise(key)
        if norm and norm not in seen:
            seen.add(norm)
            out.append(key)
    return out


def unsupported_reason(answer: str, passage: Passage | str, allowed: Iterable[str] = ()) -> str | None:
    """None when supported; otherwise one sentence naming the first key token the passage lacks."""
    allowed = tuple(a for a in allowed if a)
    source = passage if isinstance(passage, str) else f"{passage.heading or ''}. {passage.text}"
    haystack = f" {normalise(source + ' ' + ' '.join(allowed))} "
    for key in key_tokens(answer, allowed):
        if f" {normalise(key)} " not in haystack:
            return f"'{key}' in the answer does not occur in the passage"
    return None


def supported(answer: str, passage: Passage | str, allowed: Iterable[str] = ()) -> bool:
    return unsupported_reason(answer, passage, allowed) is None
