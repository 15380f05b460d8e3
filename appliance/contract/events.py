"""Typed progress events. Stages report through a callback, never through UI calls.

A stage receives ``emit: Emit`` and calls it with one of these. The CLI renders
them with rich; the TUI turns them into messages; tests collect them in a list.
Plain dataclasses, no third-party imports, so any front end can use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    stage: str
    at: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class StageStarted(Event):
    total: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Progress(Event):
    """``completed`` of ``total`` units done; ``metrics`` holds stage-specific numbers."""

    completed: float
    total: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Message(Event):
    text: str
    level: str = "info"


@dataclass(frozen=True)
class StageFinished(Event):
    summary: str = ""
    seconds: float = 0.0


Emit = Callable[[Event], None]

KINDS: dict[str, type[Event]] = {cls.__name__: cls for cls in (StageStarted, Progress, Message, StageFinished)}


def from_dict(data: dict[str, Any]) -> Event:
    """The event ``to_dict`` wrote (a child process's events, read back by its parent)."""
    fields = dict(data)
    return KINDS[fields.pop("kind")](**fields)


def ignore(_: Event) -> None:
    """The default callback: drop events."""
