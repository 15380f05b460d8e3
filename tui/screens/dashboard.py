"""Dashboard: the pipeline at a glance, in plain words."""

from __future__ import annotations

from datetime import datetime

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Header, ProgressBar, Static

from tui.board import Board, answered, eta_words, stored_words
from tui.screens.base import BoardScreen
from tui.widgets import LossChart, NavBar, StageRow


def model_line(board: Board) -> str:
    current = board.current
    if current is None:
        return "Model: none yet — the endpoint has nothing to serve until a version is promoted."
    when = datetime.fromtimestamp(current.created).strftime("%Y-%m-%d %H:%M")
    line = f"Model: {current.version} ({current.quant}, {current.size / 1e6:.0f} MB, built {when})"
    if board.gate:
        line += "\nGate: " + gate_summary(board.gate)
    return line


def gate_summary(gate: dict) -> str:
    """The gate's checks in a line: 'validation loss 1.91 vs 2.05 ok; general probes 4/5 vs 4/5 ok'."""
    checks = gate.get("checks")
    if isinstance(checks, dict):  # the status's short form: {name: value}
        checks = [{"name": k, "value": v} for k, v in checks.items()]
    if not isinstance(checks, list):
        return "no gate report"
    parts = [check_words(c) for c in checks if isinstance(c, dict) and c.get("passed", True) is not None]
    verdict = gate.get("passed")
    head = "passed: " if verdict is True else "FAILED: " if verdict is False else ""
    return head + "; ".join(p for p in parts if p)


def check_words(check: dict) -> str:
    name = str(check.get("name", "?")).replace("_", " ")
    value = check.get("value")
    passed = check.get("passed")
    mark = " ok" if passed is True else " FAILED" if passed is False else ""
    if isinstance(value, dict):
        cand, cur = value.get("candidate"), value.get("current")
        if "questions" in value and cand is not None:
            n = value["questions"]
            number = f" {answered(cand, n)}/{n}" + (f" vs {answered(cur, n)}/{n}" if cur is not None else "")
        elif isinstance(cand, (int, float)):
            number = f" {cand:.3g}" + (f" vs {cur:.3g}" if isinstance(cur, (int, float)) else "")
        else:
            number = ""
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = f" {value:.3g}"
    else:
        number = ""
    return f"{name}{number}{mark}"


class DashboardScreen(BoardScreen):
    DEFAULT_CSS = """
    DashboardScreen #sentence { padding: 0 1; text-style: bold; height: auto; }
    DashboardScreen StageRow { margin: 1 0 0 0; }
    DashboardScreen ProgressBar { padding: 0 1; }
    DashboardScreen #facts { padding: 0 1; height: auto; margin-top: 1; }
    DashboardScreen LossChart { padding: 0 1; margin-top: 1; }
    """
    BINDINGS = [
        Binding("n", "app.ingest", "Ingest now"),
        Binding("t", "app.retrain", "Retrain"),
        Binding("w", "app.toggle_watching", "Pause/resume"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("dashboard")
        with VerticalScroll():
            yield Static("Looking at the appliance…", id="sentence")
            yield StageRow()
            yield ProgressBar(total=None, show_eta=False, id="progress")
            yield LossChart()
            yield Static("", id="facts")
        yield Footer()

    def show_board(self, board: Board) -> None:
        self.query_one("#sentence", Static).update(board.sentence())
        self.query_one(StageRow).highlight(board.stage)
        bar = self.query_one("#progress", ProgressBar)
        p = board.progress
        running = p is not None and not p.finished
        bar.display = running  # an idle appliance shows no bar (an empty one would pulse as if busy)
        if p is not None and running and p.total:
            bar.update(total=p.total, progress=p.completed)
        elif running:
            bar.update(total=None)  # a stage that cannot count its work: the bar pulses
        chart = self.query_one(LossChart)
        chart.display = bool(board.train_loss)  # the last run's curve stays until the next one starts
        chart.show(board.train_loss, board.val_loss)
        self.query_one("#facts", Static).update(self.facts(board))

    @staticmethod
    def facts(board: Board) -> str:
        def n(value: int | None) -> str:
            return "?" if value is None else str(value)

        inbox = board.inbox
        lines = [
            f"Inbox: {n(inbox.get('new'))} new · {stored_words(inbox.get('ingested'), inbox.get('unlearned'))} · "
            f"{n(inbox.get('quarantined'))} quarantined"
            + (f" · {inbox['files']} file(s) in the folder" if inbox.get("files") is not None else ""),
            model_line(board),
            f"Endpoint: {board.endpoint} — {board.health}",
        ]
        lines = [escape(line) for line in lines]
        p = board.progress
        if p is not None and not p.finished and (left := eta_words(p.eta_seconds())):
            lines.insert(0, f"Running: {p.engine_stage}, {left}")
        queue = board.status.queue
        if queue:
            kinds = ", ".join(str(j.get("kind", "job")) for j in queue[:3])
            lines.append(escape(f"Queued next: {kinds}" + (f" and {len(queue) - 3} more" if len(queue) > 3 else "")))
        if board.paused:
            lines.append("Watching: paused — new documents wait until it is resumed")
        gate = board.extra.get("last_gate")
        if gate:
            refused = gate.startswith("keep")
            lines.append(f"{'[b]Last new model refused:[/b] ' if refused else 'Last check: '}{escape(gate)}")
        if board.extra.get("last_error"):
            lines.append(f"[b]Last problem:[/b] {escape(board.extra['last_error'])}")
        return "\n".join(lines)
