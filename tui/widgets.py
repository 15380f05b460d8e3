"""Small widgets and modal screens the main screens share."""

from __future__ import annotations

from typing import Any, TypeVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label, Markdown, Select, Sparkline, Static
from textual.widgets.button import ButtonVariant

from tui.board import STAGES

T = TypeVar("T")


SCREENS = (
    ("d", "dashboard", "Dashboard"),
    ("m", "models", "Models"),
    ("i", "data", "Data"),
    ("c", "chat", "Chat"),
    ("a", "activity", "Activity"),
    ("v", "review", "Review"),
    ("k", "keys", "Keys"),
)
ADMIN_ONLY = {"keys"}  # shown only while the window's key is an admin key


class NavLink(Label):
    def __init__(self, key: str, mode: str, title: str):
        super().__init__(f" {key} {title} ", id=f"nav-{mode}")
        self.mode = mode

    def on_click(self) -> None:
        self.app.switch_mode(self.mode)


class NavBar(Horizontal):
    """The screens, their keys, and which one is open; click to switch."""

    DEFAULT_CSS = """
    NavBar { height: 1; width: 100%; background: $panel; }
    NavBar > NavLink { margin-right: 1; }
    NavBar > NavLink:hover { background: $boost; }
    NavBar > NavLink.-open { background: $primary; color: $text; text-style: bold; }
    """

    def __init__(self, open_mode: str):
        super().__init__()
        self.open_mode = open_mode

    def compose(self) -> ComposeResult:
        for key, mode, title in SCREENS:
            link = NavLink(key, mode, title).set_class(mode == self.open_mode, "-open")
            link.display = mode not in ADMIN_ONLY or mode == self.open_mode
            yield link

    def on_mount(self) -> None:
        if hasattr(self.app, "is_admin"):
            self.watch(self.app, "is_admin", self._admin_changed)

    def _admin_changed(self, admin: bool) -> None:
        for mode in ADMIN_ONLY:
            self.query_one(f"#nav-{mode}", NavLink).display = admin or mode == self.open_mode


def collection_words(c: dict[str, Any]) -> str:
    """'(adapter on base, v2 served) — 12 documents' for the collection bar (fits 80 columns beside the list)."""
    how = "adapter on base" if c.get("mode") == "adapter" else "merged model"
    serving = f"{c['current']} served" if c.get("current") else "none served yet"
    docs = c.get("documents")
    return f"({how}, {serving})" + (f" — {docs} documents" if isinstance(docs, int) else "")


class CollectionBar(Horizontal):
    """Which collection the Data and Models screens show: a one-line chooser (g picks the next).

    Hidden for an engine without collections. Choosing posts ``CollectionBar.Chosen``.
    """

    DEFAULT_CSS = """
    CollectionBar { height: 1; width: 100%; display: none; }
    CollectionBar.-shown { display: block; }
    CollectionBar > Label { padding: 0 1; }
    CollectionBar > Select { width: 22; }
    CollectionBar > #collection-about { width: 1fr; color: $text-muted; }
    """

    class Chosen(Message):
        def __init__(self, collection: str) -> None:
            super().__init__()
            self.collection = collection

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.chosen: str | None = None  # what the screen last asked to show; None until it first did

    def compose(self) -> ComposeResult:
        yield Label("Collection")
        yield Select(
            [("shared", "")],
            allow_blank=False,
            compact=True,
            id="collection",
            tooltip="Which collection this screen shows (g: the next one)",
        )
        yield Label("", id="collection-about")

    def show(self, rows: list[dict[str, Any]] | None, chosen: str) -> None:
        self.set_class(rows is not None, "-shown")
        if rows is None:
            return
        select = self.query_one("#collection", Select)
        if not select.is_mounted:  # its own mount would reset the value chosen here: show it once mounted
            self.call_after_refresh(self.show, rows, chosen)
            return
        if [(r["name"], r["display"]) for r in rows] != [(r["name"], r["display"]) for r in self.rows]:
            with select.prevent(Select.Changed):  # filling the list is not the person choosing
                select.set_options([(r["display"], r["name"]) for r in rows])
        self.rows = list(rows)
        self.chosen = chosen
        if select.value != chosen and any(r["name"] == chosen for r in rows):
            with select.prevent(Select.Changed):
                select.value = chosen
        row = next((r for r in rows if r["name"] == chosen), None)
        self.query_one("#collection-about", Label).update(collection_words(row) if row else "")

    def on_select_changed(self, event: Select.Changed) -> None:
        """A person's choice; not the list's own changes (mounting, refilling), which arrive as messages too,
        sometimes after the screen already set another value: those are stale and dropped."""
        event.stop()
        value = event.value
        if self.chosen is None or not isinstance(value, str) or value != event.select.value or value == self.chosen:
            return
        self.chosen = value
        self.post_message(self.Chosen(value))


class StageRow(Horizontal):
    """The pipeline as a row of stages; the running one is highlighted."""

    DEFAULT_CSS = """
    StageRow { height: 1; width: 100%; }
    StageRow > Label { width: 1fr; content-align: center middle; color: $text-muted; }
    StageRow > Label.-current { background: $accent; color: $text; text-style: bold; }
    """

    def compose(self) -> ComposeResult:
        for stage in STAGES:
            yield Label(stage, id=f"stage-{stage}")

    def highlight(self, current: str | None) -> None:
        for stage in STAGES:
            label = self.query_one(f"#stage-{stage}", Label)
            label.set_class(stage == current, "-current")
            label.update(f"▶ {stage}" if stage == current else stage)  # visible without colour, too


class LossChart(Vertical):
    """Training and validation loss as two labelled sparklines (newest on the right)."""

    DEFAULT_CSS = """
    LossChart { height: auto; }
    LossChart Horizontal { height: 2; }
    LossChart Label { width: 22; }
    LossChart Sparkline { width: 1fr; height: 2; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label("training loss  -", id="train-label")
            yield Sparkline([], id="train-spark")
        with Horizontal():
            yield Label("validation loss -", id="val-label")
            yield Sparkline([], id="val-spark")

    def show(self, train: list[float], val: list[float]) -> None:
        self.query_one("#train-spark", Sparkline).data = train[-200:]
        self.query_one("#val-spark", Sparkline).data = val[-200:]
        self.query_one("#train-label", Label).update(f"training loss  {train[-1]:.3f}" if train else "training loss  -")
        self.query_one("#val-label", Label).update(f"validation loss {val[-1]:.3f}" if val else "validation loss -")


class ConfirmScreen(ModalScreen[bool]):
    """Asks before an action that changes what the endpoint serves; says what will change."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 70; max-width: 100%; height: auto; border: thick $warning; padding: 1 2;
                               background: $surface; }
    ConfirmScreen #question { text-style: bold; }
    ConfirmScreen Horizontal { height: auto; margin-top: 1; align: right middle; }
    ConfirmScreen Button { margin-left: 2; }
    """
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, consequence: str, confirm_label: str = "Yes"):
        super().__init__()
        self.question, self.consequence, self.confirm_label = question, consequence, confirm_label

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, id="question")
            yield Static(self.consequence, id="consequence")
            with Horizontal():
                yield Button(f"{self.confirm_label} (y)", variant="warning", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe choice is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


HELP = """\
# Keys

| key | what it does |
|---|---|
| **d** | Dashboard: what the appliance is doing now; **n** ingest now, **t** retrain, **w** pause/resume watching |
| **m** | Models: versions, promote (**p**), roll back (**r**), lineage and sample answers (**l**), training method (**e**) |
| **i** | Data: the advisor's warnings, documents, quarantined files, ingest now (**n**), forget (**f**) |
| **c** | Chat: ask the model; **ctrl+o** compare with the previous version; **ctrl+r** correct a wrong answer; **ctrl+g** answer from your documents or the model alone; **o**/enter open a cited source |
| **a** | Activity: audit log and engine events; type to filter |
| **v** | Review: candidates waiting for people's approval; **1**/**2** prefer answer A/B, **y** approve, **x** reject |
| **k** | Keys (admin keys only): who may use which collections; **n** add a key (secret shown once), **x** revoke |
| **g** | In Data and Models: show the next collection (or pick one in the Collection list) |
| **ctrl+t** | Light / dark theme |
| **ctrl+p** | Command palette: every action by name |
| **escape** | Leave a text box, close a dialog |
| **?** | This help |
| **q**, **ctrl+q** | Quit (the daemon, if one runs, keeps going); in a text box only ctrl+q |

The mouse works too: click tabs, rows and buttons.
"""


class MarkdownScreen(ModalScreen[None]):
    """A text in Markdown in a scrolling box over the screen (help, a version's lineage)."""

    DEFAULT_CSS = """
    MarkdownScreen { align: center middle; }
    MarkdownScreen > VerticalScroll { width: 76; max-width: 100%; height: 90%; border: thick $accent;
                                      background: $surface; padding: 0 1; }
    """
    FOOTER = False

    def __init__(self, text: str, markdown_id: str | None = None):
        super().__init__()
        self.text = text
        self.markdown_id = markdown_id

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(self.text, id=self.markdown_id)
        if self.FOOTER:
            yield Footer()


class HelpScreen(MarkdownScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self) -> None:
        super().__init__(HELP)


def form_end(save: str, variant: ButtonVariant = "primary") -> ComposeResult:
    """What every form ends with: a line for its problem, then Save (ctrl+s) and Cancel (esc)."""
    yield Static("", id="problem")
    with Horizontal():
        yield Button(f"{save} (ctrl+s)", variant=variant, id="save")
        yield Button("Cancel (esc)", id="cancel")


class FormScreen(ModalScreen[T]):
    """A modal form: its Save button runs ``action_save``, Cancel (or escape) dismisses it with None."""

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def action_save(self) -> None:
        raise NotImplementedError

    def action_cancel(self) -> None:
        self.dismiss(None)
