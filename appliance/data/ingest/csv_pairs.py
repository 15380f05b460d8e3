"""Spreadsheet exports: a CSV (or TSV) with a header row naming a prompt and a response column.

Which columns: the first header (any case) found in ``data.csv_prompt_columns``
and in ``data.csv_response_columns``. The delimiter is sniffed (comma, semicolon,
tab or bar: spreadsheet programs pick one by locale). Each row becomes a one-turn
conversation; rows that cannot are reported by the line they start on.
"""

from __future__ import annotations

import csv
from pathlib import Path

from appliance.data.ingest.parsed import FileError, Parsed
from appliance.data.ingest.records import InvalidRecord, Record, validate_messages
from appliance.home.config import DataSection

SUFFIXES = (".csv", ".tsv")
FORMAT = "csv"
SNIFF_BYTES = 64 * 1024


def parse(path: Path, data: DataSection | None = None) -> Parsed:
    data = data or DataSection()
    csv.field_size_limit(data.max_line_bytes)  # process-wide; the same limit as for a JSON line
    parsed = Parsed(format=FORMAT)
    # surrogateescape: a bad byte spoils only its own row, found below, not the whole file
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        dialect = _dialect(handle.read(SNIFF_BYTES), path.suffix.lower())
        handle.seek(0)
        reader = csv.reader(handle, dialect)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise FileError(f"the header row is not valid CSV ({exc})") from None
        if not header:
            raise FileError("the file is empty")
        prompt_col, response_col = _columns(header, data)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                parsed.reject(start, f"not a valid CSV row ({exc})")
                continue
            if any(cell.strip() for cell in row):
                _add(parsed, start, row, prompt_col, response_col)
    return parsed


def _dialect(sample: str, suffix: str) -> type[csv.Dialect] | csv.Dialect:
    if suffix == ".tsv":
        return csv.excel_tab
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:  # one column, or too little to tell: the common case is a comma
        return csv.excel


def _columns(header: list[str], data: DataSection) -> tuple[int, int]:
    names = [h.strip().lower() for h in header]

    def find(wanted: list[str], what: str) -> int:
        for name in wanted:
            if name.lower() in names:
                return names.index(name.lower())
        shown = ", ".join(repr(h) for h in header[:10])
        raise FileError(
            f"no {what} column: looked for {', '.join(wanted)} (data.csv_{what}_columns); the header has {shown}"
        )

    return find(data.csv_prompt_columns, "prompt"), find(data.csv_response_columns, "response")


def _add(parsed: Parsed, line: int, row: list[str], prompt_col: int, response_col: int) -> None:
    if max(prompt_col, response_col) >= len(row):
        parsed.reject(line, f"the row has {len(row)} column(s); the prompt or response column is missing")
        return
    prompt, response = row[prompt_col], row[response_col]
    for what, cell in (("prompt", prompt), ("response", response)):
        if not cell.strip():
            parsed.reject(line, f"the {what} cell is empty")
            return
    if any("\udc80" <= ch <= "\udcff" for ch in prompt + response):
        parsed.reject(line, "not valid UTF-8 text")
        return
    try:
        turns = validate_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    except InvalidRecord as exc:
        parsed.reject(line, str(exc))
        return
    parsed.add(line, Record("chat", {"messages": turns}, format=FORMAT))
