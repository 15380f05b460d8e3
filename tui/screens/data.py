"""Data: the data advisor's warnings, the source documents (learned by the served version, or stored
and not yet learned; the facts found in each, the study questions written and the served model's
recall on them, flagged where it does not know them yet), what was refused and why, and 'ingest now' — for the collection chosen at the
top (g picks the next one). A line says how big the collection's passage index is: what grounded
answers are drawn from (issue 18)."""

from __future__ import annotations

import asyncio
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from appliance.contract.api import KNOWN_RECALL, Document, QuarantinedFile
from appliance.contract.errors import ApplianceError
from tui.board import Board
from tui.client import Client
from tui.screens.base import CollectionScreen
from tui.widgets import CollectionBar, ConfirmScreen, NavBar


def fill(table: DataTable, rows: list[tuple[str, ...]]) -> None:
    """Replace the rows only when they changed, keeping the cursor where the person left it."""
    if rows == [tuple(table.get_row_at(i)) for i in range(table.row_count)]:
        return
    row = table.cursor_row
    table.clear()
    for r in rows:
        table.add_row(*r)
    if rows:
        table.move_cursor(row=min(row, len(rows) - 1))


def index_words(row: dict[str, Any] | None) -> str:
    """The collection's passage index in a line; empty when the engine does not report one."""
    if row is None or "index" not in row:
        return ""
    index = row["index"]
    if not isinstance(index, dict):
        return "Passage index: none yet; until an ingest indexes documents, answers come from the model alone."
    docs, passages = index.get("documents", "?"), index.get("passages", "?")
    return f"Passage index: {docs} document(s), {passages} passage(s); grounded answers cite these."


def knowledge(doc: Document) -> tuple[str, str, str]:
    """Facts found, study questions written and the served model's recall; a sign where it does not know them."""
    if doc.facts is None:
        return ("-", "-", "-")
    recall = "not asked" if doc.recall is None else f"{doc.recall:.0%}"
    return (str(doc.facts), str(doc.questions), ("⚠ " if doc.unknown else "") + recall)


class DataScreen(CollectionScreen):
    AUTO_FOCUS = "VerticalScroll"  # not the collection list: letters are this screen's keys
    DEFAULT_CSS = """
    DataScreen #summary { padding: 0 1; height: auto; }
    DataScreen #index { padding: 0 1; height: auto; }
    DataScreen .title { padding: 0 1; text-style: bold; margin-top: 1; }
    DataScreen DataTable { height: auto; max-height: 8; }
    DataScreen .note { padding: 0 1; color: $text-muted; }
    DataScreen #advice { height: auto; padding: 0 1; }
    DataScreen #advice .advice-warning { color: $warning; }
    DataScreen #advice .advice-ok { color: $text-muted; }
    DataScreen #advice .note { padding: 0; }
    """
    BINDINGS = [Binding("n", "app.ingest", "Ingest now"), Binding("f", "forget", "Forget document")]

    def __init__(self) -> None:
        super().__init__()
        self.documents: list[Document] = []
        self.advice: list[dict[str, str]] | None = None
        self._advised: tuple[Any, ...] | None = None  # the data state the advice shown was read for
        self._advice_lock = asyncio.Lock()  # two reads finishing together must not interleave their redraws
        self._shown_collection = ""  # the collection the tables hold

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("data")
        yield CollectionBar()
        with VerticalScroll():
            yield Static("", id="summary")
            yield Static("", id="index", markup=False)
            yield Static("Data advisor", classes="title")
            yield Vertical(Static("Reading the advice…", classes="note"), id="advice")
            yield Static("Sources", classes="title")
            sources: DataTable = DataTable(id="sources", cursor_type="row")
            sources.add_columns("document", "format", "records", "learned", "facts", "questions", "recall")
            yield sources
            yield Static("", id="sources-note", classes="note")
            yield Static("Quarantined files (not learned from)", classes="title")
            quarantine: DataTable = DataTable(id="quarantine", cursor_type="row")
            quarantine.add_columns("file", "why")
            yield quarantine
            yield Static("", id="quarantine-note", classes="note")
        yield Footer()

    def show_board(self, board: Board) -> None:
        self.show_collections(board)
        if self._shown_collection != self.collection:  # another collection: nothing of the last one stays shown
            self._shown_collection = self.collection
            self.documents = []
            fill(self.query_one("#sources", DataTable), [])
            fill(self.query_one("#quarantine", DataTable), [])
            self.query_one("#sources-note", Static).update("Reading…")
        s = board.status
        row = self.collection_row()
        index, words = self.query_one("#index", Static), index_words(row)
        index.update(words)
        index.display = bool(words)  # no blank line for an engine that reports no index
        if self.collection and row is not None:
            where = s.home / "inbox" / row["name"] if s is not None else f"inbox/{row['name']}"
            docs, records, files = ("?" if row[k] is None else row[k] for k in ("documents", "records", "inbox_files"))
            self.query_one("#summary", Static).update(
                f"The {row['display']} model learns from {docs} document(s), {records} record(s). "
                f"{files} file(s) in its inbox folder ({where}). Press n to read the inbox now."
            )
        elif s is not None:
            formats = ""
            report = self.appliance.client.last_ingest
            if report and report.get("formats"):
                formats = (
                    " Formats in the last ingest: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items()) + "."
                )
            self.query_one("#summary", Static).update(
                f"The model learns from {s.documents} document(s), {s.records} record(s). "
                f"{s.inbox_files} file(s) in the inbox folder ({s.home / 'inbox'}).{formats} Press n to read the inbox now."
            )
        self.read("reading the data lists", self._lists, self._show_lists)
        self.refresh_advice(board)

    def on_screen_resume(self) -> None:
        self._advised = None  # opening the screen reads the advice afresh
        super().on_screen_resume()

    def refresh_advice(self, board: Board) -> None:
        """Ask the advisor again when the data changed (an ingest, here or by the daemon), not every poll:
        it reads the whole snapshot."""
        s = board.status
        row = self.collection_row() or {}
        key = (
            (
                s.documents,
                s.records,
                s.versions,
                s.current,
                self.appliance.client.ingests,
                self.collection,
                row.get("documents"),
                row.get("records"),
                row.get("current"),
            )
            if s
            else None
        )
        if key is not None and key == self._advised:
            return
        self._advised = key
        self.read("reading the data advice", self._advise, self.show_advice)

    @staticmethod
    def _advise(client: Client) -> list[dict[str, str]] | ApplianceError:
        """The advice, or the engine's reason it has none (no data yet, say): shown in place, not as an alarm."""
        try:
            return client.advise()
        except ApplianceError as exc:
            return exc

    async def show_advice(self, advice: list[dict[str, str]] | ApplianceError) -> None:
        async with self._advice_lock:
            await self._draw_advice(advice)

    async def _draw_advice(self, advice: list[dict[str, str]] | ApplianceError) -> None:
        box = self.query_one("#advice", Vertical)
        if isinstance(advice, ApplianceError):
            self.advice = None
            await box.remove_children()
            await box.mount(Static(f"The advisor has nothing to say yet: {advice}", markup=False, classes="note"))
            return
        if advice == self.advice and box.children:
            return
        self.advice = advice
        await box.remove_children()
        if not advice:
            await box.mount(Static("No advice: nothing to warn about.", classes="advice-ok"))
            return
        # Warnings first (the client sorts them), each on its own line with a sign that needs no colour.
        await box.mount_all(
            Static(
                ("⚠ " if a["level"] == "warning" else "✓ ") + a["message"],
                markup=False,
                classes="advice-warning" if a["level"] == "warning" else "advice-ok",
            )
            for a in advice
        )

    @staticmethod
    def _lists(client: Client) -> tuple[list[Document], list[QuarantinedFile]]:
        return client.sources(), client.quarantined()

    def _show_lists(self, lists: tuple[list[Document], list[QuarantinedFile]]) -> None:
        sources, quarantined = lists
        self.documents = list(sources)
        fill(
            self.query_one("#sources", DataTable),
            [
                (d.path, d.format or "-", str(d.records), "yes" if d.learned else "not yet", *knowledge(d))
                for d in sources
            ],
        )
        waiting = sum(not d.learned for d in sources)
        unknown = sum(d.unknown for d in sources)
        self.query_one("#sources-note", Static).update(
            (
                "No documents read yet."
                if not sources
                else "The served version learned every document."
                if not waiting
                else f"{waiting} document(s) stored, not yet learned: the next trained and promoted version learns them."
            )
            + (
                f" ⚠ The model does not know the facts of {unknown} document(s) yet (recall under "
                f"{KNOWN_RECALL:.0%} on questions it never trained on)."
                if unknown
                else ""
            )
        )
        fill(
            self.query_one("#quarantine", DataTable),
            [(q.file, "; ".join(q.reasons) or "no reason recorded") for q in quarantined],
        )
        self.query_one("#quarantine-note", Static).update(
            "Nothing quarantined."
            if not quarantined
            else "Fix the file and drop it into the inbox again; the reasons say what was wrong."
        )

    def action_forget(self) -> None:
        client = self.appliance.client
        table = self.query_one("#sources", DataTable)
        if not self.documents or table.cursor_row >= len(self.documents):
            self.notify("Choose a document in the Sources table first (arrow keys or a click).", severity="warning")
            return
        doc = self.documents[table.cursor_row]
        name, target = doc.path, doc.sha256
        chosen, row = self.collection, self.collection_row()
        consequence = (
            f"Everything the appliance holds from {name} is deleted: its records, any quarantined copy "
            f"and the training files of runs that used it. The model is retrained without it, and every "
            f"version trained on it is retired and deleted, so no rollback can bring it back. "
            f"This cannot be undone."
        )

        def done(yes: bool | None) -> None:
            if yes:
                self.appliance.act(
                    f"forgetting {name}",
                    lambda: client.scoped(chosen).forget(target),
                    lambda _: self.notify(f"{name} is forgotten; retraining without it is queued.", title="Forgotten"),
                )

        where = f" from the {row['display']} collection" if chosen and row else ""
        self.app.push_screen(ConfirmScreen(f"Forget {name}{where}?", consequence, "Forget"), done)
