"""Chat examples in JSON Lines (one object a line) or a JSON file (a list of objects).

Each object's format is detected on its own: OpenAI ``messages``, ShareGPT
``conversations`` or Alpaca ``instruction``/``output``, so a file that mixes them
still works. Every valid line is kept; each invalid one is reported by number. A
line longer than ``data.max_line_bytes`` is skipped without being held in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from appliance.data.ingest import alpaca, messages, sharegpt
from appliance.data.ingest.parsed import FileError, Parsed
from appliance.data.ingest.records import InvalidRecord, Record
from appliance.home.config import DataSection

SUFFIXES = (".jsonl", ".json")
FORMATS = (messages, sharegpt, alpaca)
SKIP_CHUNK = 1 << 20


def parse(path: Path, data: DataSection | None = None) -> Parsed:
    data = data or DataSection()
    parsed = Parsed(format="jsonl")
    if path.suffix.lower() == ".json":
        _parse_json(path, parsed, data)
    else:
        _parse_lines(path, parsed, data)
    parsed.format = _dominant_format(parsed.records) or parsed.format
    return parsed


def to_record(obj: Any) -> Record:
    """Detect the object's format and validate it; raise InvalidRecord with the reason."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, found {type(obj).__name__}")
    for fmt in FORMATS:
        if fmt.matches(obj):
            return fmt.to_record(obj)
    keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
    raise InvalidRecord(
        "unknown format: expected 'messages' (OpenAI), 'conversations' (ShareGPT) or "
        f"'instruction' and 'output' (Alpaca); found keys: {keys}"
    )


def _parse_lines(path: Path, parsed: Parsed, data: DataSection) -> None:
    with open(path, "rb") as handle:
        for number, raw in _lines(handle, data.max_line_bytes):
            if isinstance(raw, int):
                parsed.reject(number, f"longer than the {data.max_line_bytes:,}-byte line limit ({raw:,} bytes)")
                continue
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError:
                parsed.reject(number, "not valid UTF-8 text")
                continue
            if text.strip():
                _add(parsed, number, text)


def _parse_json(path: Path, parsed: Parsed, data: DataSection) -> None:
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise FileError(f"the file is not valid UTF-8 text (first bad byte at offset {exc.start})") from None
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise FileError("JSON nested too deeply to hold conversations") from None
    items = top if isinstance(top, list) else [top]
    for number, obj in enumerate(items, start=1):
        try:
            parsed.add(number, to_record(obj))
        except InvalidRecord as exc:
            parsed.reject(number, str(exc), "item")


def _add(parsed: Parsed, number: int, text: str) -> None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        parsed.reject(number, f"not valid JSON ({exc.msg} at column {exc.colno})")
        return
    except RecursionError:
        parsed.reject(number, "JSON nested too deeply to be a conversation")
        return
    try:
        parsed.add(number, to_record(obj))
    except InvalidRecord as exc:
        parsed.reject(number, str(exc))


def _lines(handle: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, bytes), or (line number, its length) for a line over ``limit``."""
    number = 0
    while raw := handle.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            yield number, len(raw) + _skip_line(handle)
        else:
            yield number, raw


def _skip_line(handle: IO[bytes]) -> int:
    """Read to the end of the current line in bounded pieces; return how many bytes."""
    skipped = 0
    while piece := handle.readline(SKIP_CHUNK):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


def _dominant_format(records: list[Record]) -> str | None:
    counts = Counter(r.format for r in records)
    if not counts:
        return None
    return counts.most_common(1)[0][0] if len(counts) == 1 else "mixed"
