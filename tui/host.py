"""What a screen needs from the app that shows it: the screens depend on this, not on tui/app.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tui.board import Board
from tui.client import Client


class Host(Protocol):
    client: Client  # the window's client (its own collection's)
    board: Board | None  # the last poll's board; None before the first
    chosen_collection: str  # the collection the Data and Models screens show ("" the shared one)
    is_admin: bool  # the window's key is an admin key: Keys is offered

    def act(
        self, what: str, fn: Callable[[], Any], done: Callable[[Any], Any] | None = None, quiet: bool = False
    ) -> None:
        """Run an engine call off the UI thread, hand its result to ``done`` on the UI thread; a failure
        becomes a notification (once, for a ``quiet`` background read)."""

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: str = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None: ...
