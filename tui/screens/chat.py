"""Chat: ask the served model, stream its answer; compare two versions side by side;
mark a wrong answer and write the right one, which the engine files into the inbox as a
correction so the next training run learns from it (issue 10). The model list holds the
collections the window's key may use (issue 11: ``appliance/<collection>``), then the shared
collection's versions.

Under each answer, the passages it used (issue 18): number, document, excerpt, score; o (or enter
on a row) opens one in full. The 'sources' switch (ctrl+g) asks the model alone instead, to compare;
an answer that was not grounded says why in one line."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select, Static, Switch, TextArea
from textual.worker import get_current_worker

from appliance.contract.errors import ApplianceError
from appliance.contract.names import SHARED, model_id
from tui.board import Board
from tui.endpoint import Answer, Source
from tui.screens.base import BoardScreen
from tui.widgets import FormScreen, NavBar, form_end

CURRENT = model_id(SHARED)  # the shared collection's served version
SAVED = "Saved your correction; the next training run will learn from it."
EXCERPT = 60  # characters of a passage shown in the sources table


class AnswerPane(Vertical):
    DEFAULT_CSS = """
    AnswerPane { width: 1fr; border: round $primary; }
    AnswerPane > Label { text-style: bold; padding: 0 1; }
    AnswerPane VerticalScroll { height: 1fr; }
    AnswerPane Static { padding: 0 1; }
    AnswerPane .grounding { color: $text-muted; height: auto; display: none; }
    AnswerPane .sources { height: auto; max-height: 5; display: none; overflow-x: hidden; }
    """

    def __init__(self, title: str, **kwargs):
        super().__init__(**kwargs)
        self.title_text = title
        self.answer: Answer | None = None  # the last complete answer shown here, with its sources

    def compose(self) -> ComposeResult:
        yield Label(self.title_text, classes="pane-title")
        with VerticalScroll():
            yield Static("", classes="answer")
        yield Static("", classes="grounding", markup=False)
        table: DataTable = DataTable(classes="sources", cursor_type="row")
        table.add_columns("#", "document", "score", "passage")  # the passage last: a narrow pane cuts it
        yield table

    def set_title(self, title: str) -> None:
        self.query_one(".pane-title", Label).update(title)

    def show(self, text: str) -> None:
        self.query_one(".answer", Static).update(text)
        self.query_one(VerticalScroll).scroll_end(animate=False)

    def show_sources(self, answer: Answer | None) -> None:
        """The answer's sources under it, or why it was not grounded; nothing for None (a new question)."""
        self.answer = answer
        note = self.query_one(".grounding", Static)
        words = grounding_words(answer)
        note.update(words)
        note.display = bool(words)
        table = self.query_one(".sources", DataTable)
        table.clear()
        for s in answer.sources if answer else []:
            table.add_row(str(s.id), s.document, "-" if s.score is None else f"{s.score:.2f}", excerpt(s.passage))
        table.display = table.row_count > 0

    def chosen_source(self) -> Source | None:
        """The source the table's cursor is on (the first one until the person moves)."""
        table = self.query_one(".sources", DataTable)
        if self.answer is None or not table.display or not 0 <= table.cursor_row < len(self.answer.sources):
            return None
        return self.answer.sources[table.cursor_row]


def excerpt(passage: str, width: int = EXCERPT) -> str:
    """One line of a passage: whitespace folded, cut at ``width`` with an ellipsis."""
    line = " ".join(passage.split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def grounding_words(answer: Answer | None) -> str:
    """The one line under an answer that was not grounded; empty when it was (its sources say so) or unknown."""
    if answer is None or answer.grounding is None or answer.grounding.used:
        return ""
    reason = answer.grounding.reason
    return "answered from the model alone" + (f": {reason}" if reason else "")


class SourceScreen(ModalScreen[None]):
    """One source's whole passage over the chat; escape closes it."""

    DEFAULT_CSS = """
    SourceScreen { align: center middle; }
    SourceScreen > Vertical { width: 76; max-width: 100%; height: auto; max-height: 90%;
                              border: thick $accent; background: $surface; padding: 0 1; }
    SourceScreen .title { text-style: bold; }
    SourceScreen .about { color: $text-muted; }
    SourceScreen VerticalScroll { height: auto; max-height: 16; }
    """
    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def compose(self) -> ComposeResult:
        s = self.source
        score = "" if s.score is None else f", score {s.score:.2f}"
        with Vertical():
            yield Static(f"[{s.id}] {s.document}", classes="title", markup=False)
            yield Static(f"sha256 {s.sha256[:16]}{score}", classes="about", markup=False)
            with VerticalScroll():
                yield Static(s.passage, id="passage", markup=False)
        yield Footer()


class ChatScreen(BoardScreen):
    DEFAULT_CSS = """
    ChatScreen #controls { height: 3; }
    ChatScreen #controls Select { width: 40; }
    ChatScreen #controls Label { padding: 1 1 0 2; }
    ChatScreen #answers { height: 1fr; }
    ChatScreen #right { display: none; }
    ChatScreen.-compare #right { display: block; }
    ChatScreen #ask { height: 3; }
    ChatScreen #ask Input { width: 1fr; }
    ChatScreen #ask Button { width: 16; min-width: 16; }
    """
    # ctrl+r: a plain letter would be typed into the question box, and Input binds no ctrl+r.
    # o: a letter, so it opens a source only outside the question box (where it is typed).
    BINDINGS = [
        Binding("ctrl+o", "toggle_compare", "Compare"),
        Binding("ctrl+r", "correct", "Wrong answer"),
        Binding("ctrl+g", "toggle_grounding", "Sources"),
        Binding("o", "open_source", "Open source"),
        Binding("escape", "leave_input", "Leave box", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = []
        self.options: list[tuple[str, str]] = []  # (label, model id) as the picker lists them
        self.served: dict[str, str | None] = {}  # model id -> the version it answers with, when known
        self.answers: dict[str, str] = {}
        self.asked: dict[str, list[dict[str, str]]] = {}  # pane -> the messages its answer replies to

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("chat")
        with Horizontal(id="controls"):
            # No value given: the first option is chosen when it mounts, which may be after the first poll
            # already listed the key's own models (one not seeing the shared collection has no 'appliance').
            yield Select([(f"{CURRENT} (the served version)", CURRENT)], allow_blank=False, id="model")
            # Short labels: the select, both switches and their labels just fit 80 columns.
            yield Label("compare")
            yield Switch(id="compare", tooltip="Ask the previous version too, side by side (ctrl+o)")
            yield Label("sources")
            yield Switch(
                True,
                id="grounding",
                tooltip="On: answers come from your documents and cite them. Off: the model alone (ctrl+g)",
            )
        with Horizontal(id="answers"):
            yield AnswerPane(CURRENT, id="left")
            yield AnswerPane("previous", id="right")
        with Horizontal(id="ask"):
            yield Input(placeholder="Ask a question and press Enter (escape leaves the box)", id="question")
            yield Button(
                "Wrong answer",
                id="correct",
                variant="warning",
                disabled=True,
                tooltip="Mark the last answer wrong and write the right one (ctrl+r)",
            )
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#question", Input).focus()

    def show_board(self, board: Board) -> None:
        if not self.query_one("#model", Select).is_mounted:  # its own mount would reset the value chosen here
            self.call_after_refresh(self.show_board, board)
            return
        options = picker_options(board)
        if options == self.options:
            return
        self.options = options
        self.models = [m.version for m in board.models]
        self.served = {c["model_id"]: c.get("current") for c in board.visible_collections() or []}
        select = self.query_one("#model", Select)
        value = select.value
        select.set_options(options)
        ids = [model for _, model in options]
        select.value = value if value in ids else ids[0]

    def compare_target(self) -> str:
        """The previous version of what is served (or base): what the comparison runs against.
        A collection's adapter is compared with the base it runs on."""
        if str(self.query_one("#model", Select).value).startswith(f"{CURRENT}/"):
            return "base"
        board = self.appliance.board
        models = board.models if board else []
        current = next((i for i, m in enumerate(models) if m.current), None)
        if current is not None and current > 0:
            return models[current - 1].version
        return "base"

    def action_toggle_compare(self) -> None:
        switch = self.query_one("#compare", Switch)
        switch.value = not switch.value

    def action_toggle_grounding(self) -> None:
        switch = self.query_one("#grounding", Switch)
        switch.value = not switch.value

    def action_leave_input(self) -> None:
        self.set_focus(None)

    def on_switch_changed(self, event: Switch.Changed) -> None:
        if event.switch.id == "compare":  # the grounding switch is read when a question is asked
            self.set_class(event.value, "-compare")
            self.query_one("#right", AnswerPane).set_title(self.compare_target())

    # --- sources -------------------------------------------------------------------------
    def action_open_source(self) -> None:
        """Open the chosen source of the pane whose table has focus, else of the left pane."""
        focused = self.focused
        pane = focused.parent if isinstance(focused, DataTable) else None
        pane = pane if isinstance(pane, AnswerPane) else self.query_one("#left", AnswerPane)
        source = pane.chosen_source()
        if source is None:
            self.notify("This answer cites no sources.", title="Sources", severity="warning", timeout=3)
            return
        self.app.push_screen(SourceScreen(source))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open_source()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            return
        event.input.value = ""
        model = str(self.query_one("#model", Select).value)
        grounding = self.query_one("#grounding", Switch).value
        self.ask("left", model, question, grounding)
        if self.query_one("#compare", Switch).value:
            self.ask("right", self.compare_target(), question, grounding)

    def ask(self, pane_id: str, model: str, question: str, grounding: bool = True) -> None:
        pane = self.query_one(f"#{pane_id}", AnswerPane)
        pane.show_sources(None)  # the last answer's sources are not this one's
        board = self.appliance.board
        served = board.current.version if board and board.current else None
        served = self.served.get(model, served if model == CURRENT else None)
        pane.set_title(f"{model} ({served})" if served else model)
        header = f"[b]You:[/b] {escape(question)}\n\n"
        pane.show(header + "…")
        messages = [{"role": "user", "content": question}]
        self.asked[pane_id] = messages
        self.answers.pop(pane_id, None)  # until this question is answered, there is no answer to correct
        if pane_id == "left":
            self.query_one("#correct", Button).disabled = True

        def stream() -> None:
            worker = get_current_worker()
            answer = Answer()
            text = ""
            try:
                for piece in self.appliance.client.stream_chat(messages, model, grounding=grounding, answer=answer):
                    if worker.is_cancelled:  # a newer question, or the app quitting: stop reading (closes the stream)
                        return
                    text += piece
                    self.app.call_from_thread(pane.show, header + escape(text))
            except ApplianceError as exc:
                self.app.call_from_thread(pane.show, header + f"[i]{escape(str(exc))}[/i]")
                self.app.call_from_thread(self.app.notify, str(exc), title=exc.title, severity="error")
                return
            self.app.call_from_thread(self._answered, pane_id, text, answer)

        self.run_worker(stream, thread=True, group=f"chat-{pane_id}", exclusive=True, exit_on_error=False)

    def _answered(self, pane_id: str, text: str, answer: Answer | None = None) -> None:
        self.answers[pane_id] = text
        self.query_one(f"#{pane_id}", AnswerPane).show_sources(answer)
        if pane_id == "left":
            self.query_one("#correct", Button).disabled = not text.strip()

    # --- corrections -------------------------------------------------------------------
    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "correct":
            self.action_correct()

    def action_correct(self) -> None:
        """Mark the last answer (the left pane's: the version asked) wrong and write the right one."""
        client = self.appliance.client
        answer, messages = self.answers.get("left", ""), self.asked.get("left")
        if not messages or not answer.strip():
            self.notify(
                "Ask a question first; once the answer is complete you can mark it wrong.",
                title="Corrections",
                severity="warning",
            )
            return
        messages = [dict(m) for m in messages]

        def done(corrected: str | None) -> None:
            if corrected:
                self.appliance.act(
                    "saving your correction",
                    lambda: client.correct(messages, corrected),
                    lambda _path: self.notify(SAVED, title="Correction saved"),
                )

        self.app.push_screen(CorrectionScreen(messages[-1]["content"], answer), done)


def picker_options(board: Board) -> list[tuple[str, str]]:
    """(label, model id) for the chat's model list: the served model of every collection the key may use,
    then the shared collection's versions (when the key may use the shared collection)."""
    shared_versions = [(f"{m.version}{' (served now)' if m.current else ''}", m.version) for m in board.models]
    visible = board.visible_collections()
    if visible is None:  # an engine without collections: the shared model and its versions, as always
        return [(f"{CURRENT} (the served version)", CURRENT)] + shared_versions
    options: list[tuple[str, str]] = []
    for c in visible:
        if c["name"] == "":
            options.append((f"{CURRENT} (the served version)", CURRENT))
        else:
            options.append((f"{c['model_id']}{'' if c.get('current') else ' (nothing served yet)'}", c["model_id"]))
    if any(c["name"] == "" for c in visible):
        options += shared_versions
    return options or [(f"{CURRENT} (your key may use no collection)", CURRENT)]


class CorrectionScreen(FormScreen[str | None]):
    """The person writes the right answer; dismissed with it on save, with None on cancel."""

    DEFAULT_CSS = """
    CorrectionScreen { align: center middle; }
    CorrectionScreen > Vertical { width: 76; max-width: 100%; height: auto; max-height: 100%;
                                  border: thick $warning; padding: 0 1; background: $surface; }
    CorrectionScreen .title { text-style: bold; }
    CorrectionScreen #was { color: $text-muted; max-height: 4; }
    CorrectionScreen TextArea { height: 8; }
    CorrectionScreen #problem { color: $error; height: auto; }
    CorrectionScreen Horizontal { height: auto; align: right middle; }
    CorrectionScreen Button { margin-left: 2; }
    """
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, answer: str):
        super().__init__()
        self.question, self.answer = question, answer

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Correct the answer to: {self.question}", classes="title", markup=False)
            yield Static(f"The model said: {self.answer.strip()}", id="was", markup=False)
            yield Label("The right answer (the next training run learns it):")
            yield TextArea(self.answer.strip(), id="right-answer")
            yield from form_end("Save", "warning")
        yield Footer()

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.focus()
        area.select_all()  # typing replaces the wrong answer; arrow keys keep it to edit

    def action_save(self) -> None:
        text = self.query_one(TextArea).text.strip()
        problem = self.query_one("#problem", Static)
        if not text:
            problem.update("Write the right answer first (or press escape to cancel).")
        elif text == self.answer.strip():
            problem.update("This is still the model's answer; change it to the right one (or press escape).")
        else:
            self.dismiss(text)
