"""What a format parser returns: the valid records and the reasons for the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.data.ingest.records import Record

# Enough to show what is wrong with a file without a report the size of the file.
MAX_ERRORS_KEPT = 100


@dataclass(frozen=True)
class LineError:
    """One unusable line (or row, or item) of a file, with the reason in one sentence."""

    line: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"


class FileError(ValueError):
    """The whole file is unusable; the message is one plain sentence."""


@dataclass
class Parsed:
    """Records (with the line each came from), or a document's text to be chunked."""

    format: str
    records: list[Record] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    text: str | None = None  # a document's text, before it is cut into chunks
    tokens: list[int] | None = None  # each record's length in base-model tokens, when counted

    def add(self, line: int, record: Record) -> None:
        self.records.append(record)
        self.lines.append(line)

    def reject(self, line: int, reason: str, unit: str = "line") -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(LineError(line, reason, unit))


def first_line(exc: BaseException) -> str:
    """A library's exception as a short clause for a reason sentence."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
