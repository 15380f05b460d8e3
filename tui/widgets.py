"""Small widgets and modal screens the main screens share."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Markdown, Sparkline, Static

from .client import STAGES


SCREENS = (("d", "dashboard", "Dashboard"), ("m", "models", "Models"), ("i", "data", "Data"),
           ("c", "chat", "Chat"), ("a", "activity", "Activity"), ("v", "review", "Review"))


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
            yield NavLink(key, mode, title).set_class(mode == self.open_mode, "-open")


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
| **c** | Chat: ask the model; **ctrl+o** compare with the previous version; **ctrl+r** correct a wrong answer |
| **a** | Activity: audit log and engine events; type to filter |
| **v** | Review: candidates waiting for people's approval; **1**/**2** prefer answer A/B, **y** approve, **x** reject |
| **ctrl+t** | Light / dark theme |
| **ctrl+p** | Command palette: every action by name |
| **escape** | Leave a text box, close a dialog |
| **?** | This help |
| **q**, **ctrl+q** | Quit (the daemon, if one runs, keeps going); in a text box only ctrl+q |

The mouse works too: click tabs, rows and buttons.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 76; max-width: 100%; height: 90%; border: thick $accent;
                                  background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)
