"""What a format parser returns: the valid records and the reasons for the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import Record


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class Parsed:
    format: str
    records: list[Record] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
