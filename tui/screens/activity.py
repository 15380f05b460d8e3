"""Activity: the audit log and the engine's events, newest first, filtered as you type."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from textual.app import ComposeResult
from textual.widgets import DataTable, Footer, Header, Input, Static

from appliance.contract.errors import ApplianceError
from appliance.contract.events import Progress
from tui.board import Board, message_event_text
from tui.screens.base import BoardScreen
from tui.widgets import NavBar

Row = tuple[str, str, str, str]


def _time(at: Any) -> str:
    try:
        return datetime.fromtimestamp(float(at)).strftime("%m-%d %H:%M:%S")
    except (TypeError, ValueError, OSError):
        return str(at or "-")


def _at(entry: dict[str, Any]) -> float:
    try:
        return float(entry.get("at") or entry.get("time") or 0)
    except (TypeError, ValueError):
        return 0.0


def job_row(job: dict[str, Any]) -> Row:
    parts = [
        f"stage {job['stage']}" if job.get("stage") else "",
        f"run {job['run_id']}" if job.get("run_id") else "",
        f"version {job['version']}" if job.get("version") else "",
        str(job.get("error") or job.get("reason") or ""),
    ]
    return (
        _time(job.get("updated") or job.get("created")),
        "job",
        f"#{job.get('id', '?')} {job.get('kind', '')} {job.get('state', '')}",
        ", ".join(p for p in parts if p),
    )


def audit_row(entry: dict[str, Any]) -> Row:
    what = entry.get("what") or entry.get("action") or entry.get("event") or entry.get("kind") or "?"
    detail = {
        k: v
        for k, v in entry.items()
        if k
        not in ("at", "time", "ts", "what", "action", "event", "kind", "hash", "prev", "prev_hash", "seq", "details")
    }
    if isinstance(entry.get("details"), dict):
        detail = {**entry["details"], **detail}
    text = ", ".join(f"{k} {v}" for k, v in detail.items())
    return _time(entry.get("at") or entry.get("time") or entry.get("ts")), "audit", str(what), text


class ActivityScreen(BoardScreen):
    AUTO_FOCUS = "DataTable"  # letters switch screens until the filter box is clicked or tabbed to

    DEFAULT_CSS = """
    ActivityScreen DataTable { height: 1fr; }
    ActivityScreen #audit-note { padding: 0 1; color: $text-muted; height: auto; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] = []
        self.shown: list[Row] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("activity")
        yield Input(placeholder="filter: type a word (stage, file, version…)", id="filter")
        table: DataTable = DataTable(id="activity", cursor_type="row", zebra_stripes=True)
        table.add_columns("when", "from", "what", "detail")
        yield table
        yield Static("", id="audit-note")
        yield Footer()

    def show_board(self, board: Board) -> None:
        self.appliance.act("reading the activity", self._gather, self._show_rows, quiet=True)

    def _gather(self) -> tuple[list[Row], str]:
        client = self.appliance.client
        note = ""
        try:
            audit = client.audit()
        except ApplianceError as exc:  # the audit log is for admin keys: the others still see events and jobs
            audit, note = [], f"Audit log: {exc}. Showing the engine's events and jobs."
        # Progress ticks belong to the dashboard's bar and chart; here they would bury the rest.
        timed: list[tuple[float, int, Row]] = [
            (e.at, i, (_time(e.at), "engine", f"{e.stage} {e.kind}", message_event_text(e)))
            for i, e in enumerate(client.events())
            if not isinstance(e, Progress)
        ]
        timed += [(_at(e), i, audit_row(e)) for i, e in enumerate(audit)]
        timed += [
            (float(j.get("updated") or j.get("created") or 0), i, job_row(j)) for i, j in enumerate(client.jobs())
        ]
        timed.sort(key=lambda t: (t[0], t[1]), reverse=True)  # newest first
        return [row for _, _, row in timed], note

    def _show_rows(self, result: tuple[list[Row], str]) -> None:
        self.rows, note = result
        self.query_one("#audit-note", Static).update(note)
        self.apply_filter()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.apply_filter()

    def apply_filter(self) -> None:
        words = self.query_one("#filter", Input).value.lower().split()
        shown = [r for r in self.rows if all(w in " ".join(r).lower() for w in words)]
        if shown == self.shown:
            return
        self.shown = shown
        table = self.query_one(DataTable)
        table.clear()
        for row in shown[:500]:
            table.add_row(*row)
