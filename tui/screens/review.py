"""Review: people compare the candidate's and the current model's answers, then approve or reject.

With ``[gate] promotion = "review"`` a candidate that passed the automatic gate waits
here. Each question shows two answers, A and B, in an order the engine drew at random;
which one is the candidate's stays hidden until this reviewer has voted. Keys: left /
right move between questions, 1 / 2 prefer A / B on a question, y approves, x rejects
(both ask for a comment and a confirmation), n shows the next waiting candidate.
"""

from __future__ import annotations

import time
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Header, Input, Label, Static

from tui.board import Board
from tui.screens.base import BoardScreen
from tui.widgets import ConfirmScreen, NavBar

REFRESH_SECONDS = 3.0  # the queue changes only when a job finishes its gate or someone votes
EMPTY = (
    'No candidate is waiting for review. With promotion = "review" in the [gate] section of '
    "config.toml, a candidate that passes the automatic gate waits here for people to approve it."
)


class ReviewScreen(BoardScreen):
    DEFAULT_CSS = """
    ReviewScreen #queue { height: auto; padding: 0 1; text-style: bold; }
    ReviewScreen #question { height: auto; max-height: 5; padding: 0 1; }
    ReviewScreen #answers { height: 1fr; }
    ReviewScreen #answers > VerticalScroll { width: 1fr; border: round $primary; padding: 0 1; }
    ReviewScreen #answers > VerticalScroll.-preferred { border: double $accent; }
    ReviewScreen #hint { height: auto; padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("left", "item(-1)", "Prev question"),
        Binding("right", "item(1)", "Next question"),
        Binding("1", "prefer('a')", "Prefer A"),
        Binding("2", "prefer('b')", "Prefer B"),
        Binding("y", "vote(True)", "Approve"),
        Binding("x", "vote(False)", "Reject"),
        Binding("n", "next_candidate", "Next candidate"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[dict[str, Any]] = []  # waiting candidates, as the engine lists them
        self.position = 0  # which candidate is shown
        self.item = 0  # which of its questions
        self.preferences: dict[str, dict[int, str]] = {}  # run -> item -> "a" | "b" (this reviewer's)
        self.results: dict[str, dict[str, Any]] = {}  # run -> the engine's answer to this reviewer's vote
        self._read_at = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("review")
        with Vertical():
            yield Static("Reading the review queue…", id="queue", markup=False)
            yield Static("", id="question", markup=False)
            with Horizontal(id="answers"):
                with VerticalScroll(id="pane-a"):
                    yield Static("", id="answer-a", markup=False)
                with VerticalScroll(id="pane-b"):
                    yield Static("", id="answer-b", markup=False)
            yield Static("←/→ question · 1/2 prefer A/B · y approve · x reject · n next candidate", id="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_queue()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self.refresh_queue()

    def show_board(self, board: Board) -> None:
        if time.monotonic() - self._read_at >= REFRESH_SECONDS:
            self.refresh_queue()

    # --- reading ---------------------------------------------------------------------------
    def refresh_queue(self) -> None:
        self._read_at = time.monotonic()
        self.appliance.act("reading the review queue", self.appliance.client.reviews, self.fill, quiet=True)

    def fill(self, entries: list[dict[str, Any]]) -> None:
        shown = self.entry()
        fresh = list(entries or [])
        if shown is not None and shown["run"] in self.results and all(e["run"] != shown["run"] for e in fresh):
            fresh.insert(0, shown)  # decided by this reviewer's vote: keep it up to show which was which
        self.entries = fresh
        runs = [e["run"] for e in fresh]
        self.position = runs.index(shown["run"]) if shown is not None and shown["run"] in runs else 0
        if shown is None or shown["run"] not in runs:
            self.item = 0
        self.render_entry()

    def entry(self) -> dict[str, Any] | None:
        return self.entries[self.position] if 0 <= self.position < len(self.entries) else None

    def reveal(self, entry: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Which answer was which: only once this reviewer has voted on the candidate."""
        result = self.results.get(entry["run"])
        if result is not None:
            return result.get("reveal")
        return entry.get("reveal") if entry.get("voted") else None

    # --- showing ---------------------------------------------------------------------------
    def render_entry(self) -> None:
        queue, question = self.query_one("#queue", Static), self.query_one("#question", Static)
        entry = self.entry()
        if entry is None:
            queue.update(EMPTY)
            question.update("")
            self._answers("", "", "A", "B", None)
            return
        items = entry.get("items") or []
        self.item = max(0, min(self.item, len(items) - 1))
        result = self.results.get(entry["run"])
        state = (
            f"you voted: {result['state']} ({result['approvals']}/{result['approvals_needed']} approvals, "
            f"job {result['job_state']}, serving {result.get('current') or '-'})"
            if result
            else "you voted"
            if entry.get("voted")
            else "not voted yet"
        )
        stale = (
            " · another model was promoted since these answers were made: reject it"
            if entry.get("stale") and not result
            else ""
        )
        queue.update(
            f"Candidate {self.position + 1} of {len(self.entries)}: run {entry['run']} "
            f"(job {entry['job']}) · {entry.get('approvals', 0)}/{entry.get('approvals_needed', '?')} approvals · {state}{stale}"
        )
        if not items:
            question.update("This review has no questions.")
            self._answers("", "", "A", "B", None)
            return
        item = items[self.item]
        context = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in item.get("context") or [])
        question.update(f"Question {self.item + 1} of {len(items)}: {context}{item['question']}")
        revealed = self.reveal(entry)
        names = next((r for r in revealed or [] if r.get("index") == item["index"]), None)
        title_a = f"A = {names['a']} ({names['a_is']})" if names else "A"
        title_b = f"B = {names['b']} ({names['b_is']})" if names else "B"
        self._answers(
            item["answer_a"],
            item["answer_b"],
            title_a,
            title_b,
            self.preferences.get(entry["run"], {}).get(item["index"]),
        )

    def _answers(self, a: str, b: str, title_a: str, title_b: str, preferred: str | None) -> None:
        for side, text, title in (("a", a, title_a), ("b", b, title_b)):
            pane = self.query_one(f"#pane-{side}", VerticalScroll)
            pane.border_title = title + ("  ★ preferred" if preferred == side else "")
            pane.set_class(preferred == side, "-preferred")
            self.query_one(f"#answer-{side}", Static).update(text or "(no answer)")

    # --- keys ------------------------------------------------------------------------------
    def action_item(self, step: int) -> None:
        entry = self.entry()
        if entry is not None and entry.get("items"):
            self.item = (self.item + step) % len(entry["items"])
            self.render_entry()

    def action_next_candidate(self) -> None:
        if len(self.entries) > 1:
            self.position = (self.position + 1) % len(self.entries)
            self.item = 0
            self.render_entry()

    def action_prefer(self, side: str) -> None:
        entry = self.entry()
        if entry is None or not entry.get("items") or self._already_voted(entry):
            return
        index = entry["items"][self.item]["index"]
        chosen = self.preferences.setdefault(entry["run"], {})
        if chosen.get(index) == side:
            del chosen[index]  # pressing it again takes the preference back
        else:
            chosen[index] = side
        self.render_entry()

    def _already_voted(self, entry: dict[str, Any]) -> bool:
        if entry["run"] in self.results or entry.get("voted"):
            self.notify("You have voted on this candidate already; each reviewer votes once.", severity="warning")
            return True
        return False

    def action_vote(self, approve: bool) -> None:
        entry = self.entry()
        if entry is None:
            self.notify("No candidate is waiting for review.", severity="warning")
            return
        if self._already_voted(entry):
            return
        run = entry["run"]
        verb = "Approve" if approve else "Reject"

        def confirmed(comment: str, yes: bool | None) -> None:
            if yes:
                prefs = dict(self.preferences.get(run, {}))
                self.appliance.act(
                    f"recording your vote on run {run}",
                    lambda: self.appliance.client.vote(run, approve, comment, prefs),
                    lambda result: self.voted(entry, result),
                )

        def commented(comment: str | None) -> None:
            if comment is None:
                return
            left = max(0, int(entry.get("approvals_needed") or 1) - int(entry.get("approvals") or 0))
            consequence = (
                (
                    "This is the last approval needed: the candidate is promoted and the endpoint serves "
                    "it instead of the current model (you can roll back from Models)."
                    if left <= 1
                    else f"{left - 1} more approval(s) are needed after yours before it is promoted."
                )
                if approve
                else "The candidate is refused and the current model keeps serving."
            )
            self.app.push_screen(
                ConfirmScreen(
                    f"{verb} run {run}?",
                    consequence + " Your vote, your user name and your comment go into the audit log.",
                    verb,
                ),
                lambda yes: confirmed(comment, yes),
            )

        self.app.push_screen(CommentScreen(run, approve), commented)

    def voted(self, entry: dict[str, Any], result: dict[str, Any]) -> None:
        self.results[entry["run"]] = result
        words = {
            "approved": "approved and promoted",
            "rejected": "rejected; the current model keeps serving",
            "pending": "recorded; more approvals are needed",
        }
        state = str(result.get("state"))
        self.notify(f"Run {entry['run']}: {words.get(state, state)}.", title="Vote")
        self.render_entry()
        self.refresh_queue()


class CommentScreen(ModalScreen[str | None]):
    """The reviewer's words for the audit log; required to reject, optional to approve."""

    DEFAULT_CSS = """
    CommentScreen { align: center middle; }
    CommentScreen > Vertical { width: 70; max-width: 100%; height: auto; border: thick $warning; padding: 1 2;
                               background: $surface; }
    CommentScreen #problem { color: $error; height: auto; }
    CommentScreen Horizontal { height: auto; margin-top: 1; align: right middle; }
    CommentScreen Button { margin-left: 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, run: str, approve: bool):
        super().__init__()
        self.run, self.approve = run, approve

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(
                f"{'Approve' if self.approve else 'Reject'} run {self.run}: "
                + ("a comment (optional)" if self.approve else "why? (required)")
            )
            yield Input(placeholder="Enter to continue, escape to cancel", id="comment")
            yield Static("", id="problem")
            with Horizontal():
                yield Button("Continue (enter)", variant="warning", id="ok")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.submit()
        else:
            self.action_cancel()

    def submit(self) -> None:
        text = self.query_one(Input).value.strip()
        if not text and not self.approve:
            self.query_one("#problem", Static).update("Say why you reject it: the words go into the audit log.")
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)
