"""The terminal app, built by :func:`make_app` from an engine client.

The CLI (``appliance tui``) passes the real engine; tests pass a scripted one. The app
polls the engine in a thread worker on a timer, so a slow engine never freezes the
screen, and every engine call that can fail goes through :meth:`ApplianceApp.act`,
which turns errors into notifications (what happened, what to do), never tracebacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from appliance.contract.api import Engine
from appliance.contract.errors import ApplianceError
from tui.board import Board
from tui.client import Client
from tui.screens import ActivityScreen, ChatScreen, DashboardScreen, DataScreen, ModelsScreen
from tui.screens.keys import KeysScreen, not_admin_words
from tui.screens.review import ReviewScreen
from tui.widgets import HelpScreen

log = logging.getLogger(__name__)

DARK, LIGHT = "textual-dark", "textual-light"


class ApplianceApp(App[None]):
    TITLE = "Appliance"
    MODES = {
        "dashboard": DashboardScreen,
        "models": ModelsScreen,
        "data": DataScreen,
        "chat": ChatScreen,
        "activity": ActivityScreen,
        "review": ReviewScreen,
        "keys": KeysScreen,
    }
    BINDINGS = [
        Binding("d", "switch_mode('dashboard')", "Dashboard", show=False),
        Binding("m", "switch_mode('models')", "Models", show=False),
        Binding("i", "switch_mode('data')", "Data", show=False),
        Binding("c", "switch_mode('chat')", "Chat", show=False),
        Binding("a", "switch_mode('activity')", "Activity", show=False),
        Binding("v", "switch_mode('review')", "Review", show=False),
        Binding("k", "keys", "Keys", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("q", "quit", "Quit"),
    ]

    is_admin: reactive[bool] = reactive(False)  # the window's key is an admin key: Keys is offered
    chosen_collection: reactive[str] = reactive("")  # the collection the Data and Models screens show

    def __init__(self, client: Client, poll_seconds: float = 1.0, theme: str | None = None):
        super().__init__()
        self.client = client
        self.poll_seconds = poll_seconds
        self.board: Board | None = None
        self._last_poll_error: str | None = None
        self._quiet_errors: set[str] = set()
        if theme:
            self.theme = theme

    def on_mount(self) -> None:
        self.sub_title = str(self.client.engine.home)  # which home this window is attached to
        if self.client.collection:  # a key that may not use the shared collection: the window is its collection's
            self.sub_title += f" — {self.client.collection}"
        self.switch_mode("dashboard")
        self.poll()
        self.set_interval(self.poll_seconds, self.poll)

    # --- polling -----------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="poll", exit_on_error=False)
    def poll(self) -> None:
        try:
            board = self.client.board()
        except Exception as exc:  # noqa: BLE001 - any failure becomes one notification, not a crash
            self.call_from_thread(self._poll_failed, exc)
            return
        self.call_from_thread(self._show_board, board)

    def _show_board(self, board: Board) -> None:
        self.board = board
        self._last_poll_error = None
        self.is_admin = board.is_admin
        names = [c["name"] for c in board.visible_collections() or []]
        if names and self.chosen_collection not in names:
            # Gone, or not this key's: back to the shared collection, or the key's first one.
            self.chosen_collection = "" if "" in names else names[0]
        show = getattr(self.screen, "show_board", None)
        if show is not None:  # modal dialogs have none; the screen underneath catches up on resume
            show(board)

    def _poll_failed(self, exc: Exception) -> None:
        text = str(exc)
        if text != self._last_poll_error:  # once per distinct problem, not once a second
            self._last_poll_error = text
            self.report(exc, "reading the appliance's state")

    # --- acting ------------------------------------------------------------------------
    def act(
        self, what: str, fn: Callable[[], Any], done: Callable[[Any], None] | None = None, quiet: bool = False
    ) -> None:
        """Run an engine call off the UI thread; hand the result to ``done`` on the UI thread."""

        def run() -> None:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - reported, never raised into the UI
                self.call_from_thread(self._reread_failed if quiet else self.report, exc, what)
                return
            if done is not None:
                self.call_from_thread(done, result)
            if not quiet:  # an action changed the engine's state: show it now, not at the next tick
                self.call_from_thread(self.poll)

        if not quiet:
            self.notify(f"{what[0].upper()}{what[1:]}…", timeout=3)
        self.run_worker(run, thread=True, group=what, exit_on_error=False)

    def _reread_failed(self, exc: Exception, what: str) -> None:
        """A background re-read (once a poll) failed: say so once, not every second."""
        key = f"{what}: {exc}"
        if key not in self._quiet_errors:
            self._quiet_errors.add(key)
            self.report(exc, what)

    def report(self, exc: Exception, what: str) -> None:
        if isinstance(exc, ApplianceError):
            self.notify(str(exc), title=exc.title, severity="error", timeout=10)
        else:
            log.exception("unexpected error while %s", what, exc_info=exc)
            self.notify(
                f"Something unexpected went wrong while {what}: {exc}. Try again; if it keeps "
                f"happening, run the same step with the 'appliance' command to see the full message.",
                title="Unexpected problem",
                severity="error",
                timeout=15,
            )

    def action_ingest(self) -> None:
        self.act("reading the inbox", self.client.ingest, self._ingested)

    def _ingested(self, report: dict[str, Any]) -> None:
        quarantined = len(report.get("quarantined", []))
        self.notify(
            f"Learned {report.get('accepted', 0)} new record(s) from {report.get('files', 0)} file(s); "
            f"{report.get('duplicates', 0)} duplicate(s); {quarantined} file(s) quarantined"
            + (" — see Data (i) for why." if quarantined else "."),
            title="Inbox read",
        )

    def action_retrain(self) -> None:
        self.act("retraining", self.client.retrain, lambda text: self.notify(str(text), title="Retrain"))

    async def action_rollback(self) -> None:
        await self.switch_mode("models")
        if isinstance(self.screen, ModelsScreen):
            self.screen.action_rollback()

    def action_toggle_watching(self) -> None:
        resume = bool(self.board and self.board.paused)
        self.act(
            "resuming watching" if resume else "pausing watching",
            lambda: self.client.set_watching(resume),
            lambda _: self.notify(
                "Watching the inbox again."
                if resume
                else "Watching paused: new documents wait in the inbox until you resume (w).",
                title="Watching",
            ),
        )

    def action_verify_audit(self) -> None:
        self.act("checking the audit chain", self.client.verify_audit, self._audit_verdict)

    def _audit_verdict(self, verdict: dict[str, Any]) -> None:
        if verdict.get("ok"):
            self.notify(
                f"The audit chain is intact: {verdict.get('entries', '?')} entries, none edited, removed or reordered.",
                title="Audit chain",
            )
        else:
            self.notify(
                f"The audit chain is broken at line {verdict.get('bad_line')}: {verdict.get('reason')}. "
                f"Keep a copy of audit.log and tell whoever looks after this machine.",
                title="Audit chain",
                severity="error",
                timeout=30,
            )

    def action_keys(self) -> None:
        """Open Keys for an admin key; anyone else is told why not (asked afresh: keys change)."""
        self.act("checking this window's key", self.client.whoami, self._keys_for, quiet=True)

    def _keys_for(self, identity: dict[str, Any] | None) -> None:
        self.is_admin = identity is not None and identity.get("role") == "admin"
        if self.is_admin:
            self.switch_mode("keys")
        else:
            self.notify(not_admin_words(identity), title="Keys", severity="warning", timeout=10)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme == DARK else DARK

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, text in (
            ("dashboard", "what the appliance is doing now"),
            ("models", "versions, promote, roll back"),
            ("data", "documents and quarantined files"),
            ("chat", "ask the model"),
            ("activity", "audit log and events"),
            ("review", "vote on candidates waiting for promotion"),
        ):
            yield SystemCommand(f"Go to {mode.title()}", text, lambda m=mode: self.switch_mode(m))
        if self.is_admin:
            yield SystemCommand("Go to Keys", "add and revoke API keys (admin)", self.action_keys)
        yield SystemCommand("Ingest now", "read the inbox once", self.action_ingest)
        yield SystemCommand("Retrain now", "train on the current data and build a new version", self.action_retrain)
        yield SystemCommand("Roll back", "serve the previously promoted version again", self.action_rollback)
        yield SystemCommand(
            "Pause or resume watching", "stop or restart reading new inbox files", self.action_toggle_watching
        )
        yield SystemCommand(
            "Verify the audit chain",
            "check that no audit entry was edited, removed or reordered",
            self.action_verify_audit,
        )
        yield SystemCommand(
            "Toggle light/dark", "switch between the light and the dark theme", self.action_toggle_theme
        )
        yield SystemCommand("Help", "keys and what they do", self.action_help)


def make_app(client: Engine | Client, poll_seconds: float = 1.0, theme: str | None = None) -> ApplianceApp:
    """The app for an engine (the real one, an attached daemon's, or a test's scripted one)."""
    client = client if isinstance(client, Client) else Client(client)
    return ApplianceApp(client.for_caller(), poll_seconds, theme)
