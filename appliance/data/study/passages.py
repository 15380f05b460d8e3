"""A document's text cut into sentences, and sentences grouped into passages of bounded size.

Documents reach us as Markdown, or as the flattened text of a Word file or a PDF (where
headings are plain short lines and a PDF's lines are wrapped with no blank line between
paragraphs), so headings are recognised both by '#' and by shape. A passage never crosses
a heading: the heading is the subject context of every sentence under it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from appliance.data.sentences import split_sentences

CountTokens = Callable[[str], int]

_HEADING_MD = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022\u2013]|\d{1,3}[.)]|[a-z][.)])\s+(.*)$")
_TERMINAL = (".", "!", "?", ":", ";", ",")


def default_count_tokens(text: str) -> int:
    """Whitespace words x 1.3: close to a BPE tokenizer on English prose, with no model at hand."""
    return math.ceil(len(text.split()) * 1.3)


@dataclass(frozen=True)
class Sentence:
    text: str
    heading: str | None
    kind: str = "prose"  # "prose", "item" (a list item) or "row" (a table row)


@dataclass
class Passage:
    index: int
    heading: str | None
    sentences: list[Sentence] = field(default_factory=list)
    tokens: int = 0

    @property
    def text(self) -> str:
        return " ".join(sentence.text for sentence in self.sentences)


def blocks(text: str) -> Iterator[tuple[str, str]]:
    """("heading" | "para" | "item" | "row", text) in document order."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    para: list[str] = []
    fenced = False
    for number, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced  # code in a Markdown fence is not prose: no statements come from it
            continue
        if fenced:
            continue
        kind, body = _line_kind(lines, number)
        if kind == "blank" and para and _continues(para[-1], lines[number + 1 :]):
            continue  # a PDF page break in mid-sentence: the paragraph goes on
        if kind == "para":
            para.append(body)
            continue
        if para:
            yield "para", " ".join(para)
            para = []
        if kind != "blank":
            yield kind, body
    if para:
        yield "para", " ".join(para)


def _continues(last: str, rest: list[str]) -> bool:
    following = next((line.strip() for line in rest if line.strip()), "")
    return not last.endswith((".", "!", "?", ":")) and following[:1].islower()


def _line_kind(lines: list[str], number: int) -> tuple[str, str]:
    line = lines[number]
    if not line.strip():
        return "blank", ""
    heading = _HEADING_MD.match(line)
    if heading:
        return "heading", heading.group(2)
    item = _LIST_ITEM.match(line)
    if item:
        return "item", item.group(1).strip()
    if "|" in line or "\t" in line:
        return "row", line.strip().strip("|").strip()
    if _looks_like_heading(lines, number):
        return "heading", line.strip()
    return "para", line.strip()


def _looks_like_heading(lines: list[str], number: int) -> bool:
    """A short unpunctuated line that starts a block and is followed by text: a Word or PDF heading.

    A wrapped paragraph line is never short and unpunctuated unless it ends the paragraph,
    and the line before a heading ends a sentence (or is blank, the start, or a heading itself:
    a title followed by a section heading).
    """
    line = lines[number].strip()
    words = line.split()
    if not words or len(words) > 10 or line.endswith(_TERMINAL) or not line[0].isupper():
        return False
    before = lines[number - 1].strip() if number else ""
    after = next((text.strip() for text in lines[number + 1 :] if text.strip()), "")
    after_break = not before or before.endswith((".", "!", "?", ":")) or _looks_like_heading(lines, number - 1)
    return after_break and after[:1].isupper()


def sentences(text: str) -> list[Sentence]:
    """Every sentence of the document with the heading it sits under."""
    heading: str | None = None
    out: list[Sentence] = []
    for kind, body in blocks(text):
        if kind == "heading":
            heading = body
        elif kind == "para":
            out.extend(Sentence(s, heading) for s in split_sentences(body))
        else:
            out.append(Sentence(body, heading, kind))
    return out


def passages(text: str, max_tokens: int = 256, count_tokens: CountTokens | None = None) -> list[Passage]:
    """Consecutive sentences under one heading, packed up to max_tokens (a longer sentence stands alone)."""
    count = count_tokens or default_count_tokens
    out: list[Passage] = []
    for sentence in sentences(text):
        size = count(sentence.text)
        last = out[-1] if out else None
        if last is None or last.heading != sentence.heading or (last.sentences and last.tokens + size > max_tokens):
            last = Passage(index=len(out), heading=sentence.heading)
            out.append(last)
        last.sentences.append(sentence)
        last.tokens += size
    return out
