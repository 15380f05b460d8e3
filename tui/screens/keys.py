"""Keys (admin keys only): who may use which collections. Add a key (its secret is shown once,
in a dialog, and never again: the engine keeps only its hash) and revoke one (after a confirmation).

The app opens this screen only for an admin key (``ApplianceApp.action_keys``); if the key
changes under a running window the screen says so instead of listing keys.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select, Static

from appliance.contract.names import ROLES, display
from tui.board import Board, parse_collections
from tui.screens.base import BoardScreen
from tui.screens.data import fill
from tui.widgets import ConfirmScreen, FormScreen, NavBar, form_end

ROLE_WORDS = {
    "chat": "chat: ask the models of its collections",
    "contributor": "contributor: chat, and add documents",
    "approver": "approver: contribute, and approve or promote versions",
    "admin": "admin: everything, keys included",
}
ONCE = (
    "This is the only time the secret is shown: the appliance keeps only its hash and cannot show it again. "
    "Copy it now and hand it to its holder; if it is lost, revoke the key and add a new one."
)


def when(value: Any) -> str:
    """A key's created/revoked time (epoch seconds or ISO text) as 'YYYY-MM-DD HH:MM'; '-' for none."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M")
    return str(value).replace("T", " ")[:16]


def collections_words(collections: Any) -> str:
    return "all" if collections is None else ", ".join(display(str(c)) for c in collections) or "none"


class KeysScreen(BoardScreen):
    DEFAULT_CSS = """
    KeysScreen #keys-note { padding: 0 1; height: auto; }
    KeysScreen DataTable { height: 1fr; }
    """
    BINDINGS = [Binding("n", "add", "Add key"), Binding("x", "revoke", "Revoke")]

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("keys")
        with Vertical():
            yield Static("Reading the keys…", id="keys-note")
            table: DataTable = DataTable(cursor_type="row", zebra_stripes=True, id="keys")
            table.add_columns("name", "role", "collections", "created", "revoked")
            yield table
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()

    def show_board(self, board: Board) -> None:
        if not board.is_admin:
            self.keys = []
            fill(self.query_one(DataTable), [])
            self.query_one("#keys-note", Static).update(not_admin_words(board.identity))
            return
        self.appliance.act("reading the keys", self.appliance.client.keys, self.show_keys, quiet=True)

    def show_keys(self, keys: list[dict[str, Any]]) -> None:
        self.keys = list(keys)
        fill(
            self.query_one(DataTable),
            [
                (
                    str(k.get("name", "?")),
                    str(k.get("role", "?")),
                    collections_words(k.get("collections")),
                    when(k.get("created")),
                    when(k.get("revoked")),
                )
                for k in self.keys
            ],
        )
        active = sum(1 for k in self.keys if not k.get("revoked"))
        self.query_one("#keys-note", Static).update(
            f"{active} active key(s) of {len(self.keys)}. A key reaches only its collections' models; any other "
            f"model id is 'not found' to it. n adds a key, x revokes the selected one."
        )

    def selected(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not self.keys or table.cursor_row >= len(self.keys):
            return None
        return self.keys[table.cursor_row]

    def action_add(self) -> None:
        def chosen(form: tuple[str, str, list[str] | None] | None) -> None:
            if form is None:
                return
            name, role, collections = form
            # The secret goes straight from the engine's answer into the dialog and is kept nowhere else.
            self.appliance.act(
                f"adding the key {name}",
                lambda: self.appliance.client.add_key(name, role, collections),
                lambda secret: self.app.push_screen(SecretScreen(name, role, collections, secret)),
            )

        self.app.push_screen(AddKeyScreen(), chosen)

    def action_revoke(self) -> None:
        key = self.selected()
        if key is None:
            self.notify("Choose a key in the table first (arrow keys or a click).", severity="warning")
            return
        name = str(key.get("name"))
        if key.get("revoked"):
            self.notify(f"The key {name} is already revoked.")
            return
        consequence = (
            f"Every request and command with the key {name} ({key.get('role')}, collections: "
            f"{collections_words(key.get('collections'))}) is refused from the next one on. "
            f"This cannot be undone; add a new key to give access again."
        )

        def done(yes: bool | None) -> None:
            if yes:
                self.appliance.act(
                    f"revoking the key {name}",
                    lambda: self.appliance.client.revoke_key(name),
                    lambda _: self.notify(f"The key {name} is revoked.", title="Keys"),
                )

        self.app.push_screen(ConfirmScreen(f"Revoke the key {name}?", consequence, "Revoke"), done)


def not_admin_words(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return (
            "Managing keys needs an admin key, and this engine does not say which key this window uses. "
            "Use 'appliance keys list' with an admin key."
        )
    return (
        f"Managing keys needs an admin key; this window uses the key {identity.get('name')} "
        f"({identity.get('role')}). Start it with an admin key in APPLIANCE_API_KEY, or ask an admin."
    )


class AddKeyScreen(FormScreen[tuple[str, str, list[str] | None] | None]):
    """Name, role and collections of a new key; dismissed with them, or None on cancel."""

    DEFAULT_CSS = """
    AddKeyScreen { align: center middle; }
    AddKeyScreen > Vertical { width: 72; max-width: 100%; height: auto; max-height: 100%;
                              border: thick $accent; padding: 0 1; background: $surface; }
    AddKeyScreen .title { text-style: bold; }
    AddKeyScreen #problem { color: $error; height: auto; }
    AddKeyScreen Horizontal { height: auto; align: right middle; }
    AddKeyScreen Button { margin-left: 2; }
    """
    BINDINGS = [Binding("ctrl+s", "save", "Add"), Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Add a key", classes="title")
            yield Input(placeholder="name (who holds it, e.g. dr-lee)", id="key-name")
            yield Select([(ROLE_WORDS[r], r) for r in ROLES], value="chat", allow_blank=False, id="key-role")
            yield Input(
                placeholder="collections: a, b/c (empty: all; 'shared': the inbox's top level)", id="key-collections"
            )
            yield from form_end("Add")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#key-name", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in the name goes on to the role (a key for every collection is not made by accident);
        enter in the collections adds the key."""
        if event.input.id == "key-name" and event.value.strip():
            self.query_one("#key-role", Select).focus()
        else:
            self.action_save()

    def action_save(self) -> None:
        name = self.query_one("#key-name", Input).value.strip()
        if not name:
            self.query_one("#problem", Static).update("Give the key a name first (or press escape to cancel).")
            self.query_one("#key-name", Input).focus()
            return
        role = str(self.query_one("#key-role", Select).value)
        self.dismiss((name, role, parse_collections(self.query_one("#key-collections", Input).value)))


class SecretScreen(ModalScreen[None]):
    """The new key's secret, once. Closing forgets it: nothing in the window holds it afterwards."""

    DEFAULT_CSS = """
    SecretScreen { align: center middle; }
    SecretScreen > Vertical { width: 76; max-width: 100%; height: auto; border: thick $warning; padding: 1 2;
                              background: $surface; }
    SecretScreen #secret { text-style: bold; background: $boost; padding: 0 1; margin: 1 0; }
    SecretScreen #once { color: $warning; }
    SecretScreen Horizontal { height: auto; margin-top: 1; align: right middle; }
    SecretScreen Button { margin-left: 2; }
    """
    BINDINGS = [Binding("ctrl+c,y", "copy", "Copy"), Binding("escape,enter", "close", "Close")]

    def __init__(self, name: str, role: str, collections: list[str] | None, secret: str):
        super().__init__()
        self.key_name, self.role, self.collections, self.secret = name, role, collections, secret

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(
                f"The key {self.key_name} is added ({self.role}; collections: "
                f"{collections_words(self.collections)}). Its secret:",
                markup=False,
            )
            yield Static(self.secret, id="secret", markup=False)
            yield Static(ONCE, id="once")
            with Horizontal():
                yield Button("Copy (y)", id="copy")
                yield Button("I have copied it (enter)", variant="warning", id="close")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.action_close()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.secret)
        self.notify("Copied to the clipboard (where the terminal allows it).", title="Keys", timeout=3)

    def action_close(self) -> None:
        self.secret = ""
        self.query_one("#secret", Static).update("")
        self.dismiss(None)
