"""What every screen shares: it is shown the latest board when it appears and on each poll."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

from ..client import Board

if TYPE_CHECKING:
    from ..app import ApplianceApp


class BoardScreen(Screen):
    @property
    def appliance(self) -> "ApplianceApp":
        return cast("ApplianceApp", self.app)

    def on_screen_resume(self) -> None:
        if self.appliance.board is not None:
            self.show_board(self.appliance.board)

    def show_board(self, board: Board) -> None:
        """Update from a fresh poll; screens override this."""
