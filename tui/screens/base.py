"""What every screen shares: it is shown the latest board when it appears and on each poll, and
it reaches the app through the small ``tui.host.Host`` protocol (client, board, act, …).

``CollectionScreen`` adds the collection chooser of the Data and Models screens: the chosen
collection is the app's (``Host.chosen_collection``), so both screens show the same one, and
everything they read or change goes through the client scoped to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from textual.binding import Binding
from textual.screen import Screen

from tui.board import Board
from tui.client import Client
from tui.host import Host
from tui.widgets import CollectionBar


class BoardScreen(Screen):
    @property
    def appliance(self) -> Host:
        return cast(Host, self.app)

    def on_screen_resume(self) -> None:
        if self.appliance.board is not None:
            self.show_board(self.appliance.board)

    def show_board(self, board: Board) -> None:
        """Update from a fresh poll; screens override this."""


class CollectionScreen(BoardScreen):
    BINDINGS = [Binding("g", "next_collection", "Collection")]

    @property
    def collection(self) -> str:
        return self.appliance.chosen_collection

    def collection_row(self) -> dict[str, Any] | None:
        """The chosen collection as the last poll listed it (None: not listed, or the key may not list them)."""
        board = self.appliance.board
        rows = board.visible_collections() if board else None
        return next((r for r in rows or [] if r["name"] == self.collection), None)

    def scoped(self) -> Client:
        """The client for the chosen collection (the app's own for the shared one); call it off the UI thread:
        the first call for a collection opens its engine."""
        return self.appliance.client.scoped(self.collection)

    def read(self, what: str, fn: Callable[[Client], Any], done: Callable[[Any], Any]) -> None:
        """A quiet background read through the chosen collection's client; its answer is dropped when the
        person chose another collection meanwhile (it would show one collection's data under another's name)."""
        chosen = self.collection
        client = self.appliance.client

        def shown(result: Any) -> Any:
            if chosen == self.collection:
                return done(result)
            return None

        self.appliance.act(what, lambda: fn(client.scoped(chosen)), shown, quiet=True)

    def show_collections(self, board: Board) -> None:
        self.query_one(CollectionBar).show(board.visible_collections(), self.collection)
        self.refresh_bindings()  # g is offered only when there is more than one collection

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_collection":
            board = self.appliance.board
            return len((board.visible_collections() if board else None) or []) > 1
        return True

    def action_next_collection(self) -> None:
        board = self.appliance.board
        names = [r["name"] for r in (board.visible_collections() if board else None) or []]
        if len(names) < 2:
            return
        at = names.index(self.collection) if self.collection in names else -1
        self.choose(names[(at + 1) % len(names)])

    def on_collection_bar_chosen(self, event: CollectionBar.Chosen) -> None:
        self.choose(event.collection)

    def choose(self, collection: str) -> None:
        if collection == self.collection:
            return
        self.appliance.chosen_collection = collection
        if self.appliance.board is not None:
            self.show_board(self.appliance.board)
