"""OpenAI-style chat JSONL: one ``{"messages": [...]}`` object per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .records import InvalidRecord, Record, validate_messages
from .parsed import LineError, Parsed

SUFFIXES = (".jsonl",)


def parse(path: Path) -> Parsed:
    """Keep every valid line; report each invalid one by its line number."""
    parsed = Parsed(format="openai-messages")
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            parsed.records.append(_record(line))
        except InvalidRecord as exc:
            parsed.errors.append(LineError(number, str(exc)))
    return parsed


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, "\x00invalid-utf8"


def _record(line: str) -> Record:
    if line.startswith("\x00invalid-utf8"):
        raise InvalidRecord("the line is not valid UTF-8 text")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRecord(f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or "messages" not in obj:
        raise InvalidRecord("expected an object with a 'messages' list")
    return Record("chat", {"messages": validate_messages(obj["messages"])})
