"""Issue 11 in the terminal app, driven by Pilot at 80x24 against a scripted engine: collections
in the Data and Models screens, the keys admin screen (a new key's secret is shown once), and
chat picking among the collections the window's key may use (over real HTTP, loopback).

The scripted engine extends test_tui's with more collections and keys: ``collections()``,
``scoped(name)``, ``whoami()``, ``keys()``, ``add_key``, ``revoke_key`` are the home's; each
collection's scoped engine has its own versions, documents, quarantine and advice, and records
the calls made to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_tui import SIZE, ScriptedEngine, make_app, settle, sse_server, text_of, version  # noqa: F401 (fixture)
from textual.widgets import DataTable, Input, Select, Static

from appliance.contract.api import Document, QuarantinedFile
from tui.board import parse_collections
from tui.client import Client
from tui.screens.keys import ONCE, AddKeyScreen, KeysScreen, SecretScreen
from tui.widgets import CollectionBar, ConfirmScreen

pytestmark = pytest.mark.anyio
SECRET = "ak-7Qe1-this-is-shown-once-9Zx"


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


class CollectionEngine(ScriptedEngine):
    """One collection's engine (what ``engine.scoped(name)`` returns): its own versions, documents, advice;
    collections and keys are the home's, as in the real engine."""

    def __init__(self, home: Path, name: str, endpoint: str, parent: KeyedEngine):
        super().__init__(home, endpoint)
        self.collection, self.parent = name, parent
        self.versions = [version("v1", 1_700_300_000, current=True), version("v2", 1_700_400_000)]
        self.documents = [Document(f"{name}/guidelines.md", "cc" * 32, "md", 30, name, learned=True)]
        self.quarantine = [QuarantinedFile(f"{name}/scan.pdf", ["no text layer"], name)]
        self.advice = [{"level": "warning", "code": "few_examples", "message": f"Only 30 examples in {name}."}]

    def lineage(self, version: str) -> dict[str, Any] | None:
        return (
            {
                "version": version,
                "documents": [{"path": d.path, "sha256": d.sha256, "records": d.records} for d in self.documents],
            }
            if version == "v1"
            else None
        )

    # collections and keys are the home's
    def collections(self) -> list[dict[str, Any]]:
        return self.parent.collections()

    def scoped(self, collection: str) -> ScriptedEngine:
        return self.parent.scoped(collection)

    def whoami(self) -> dict[str, Any]:
        return self.parent.whoami()

    def keys(self) -> list[dict[str, Any]]:
        return self.parent.keys()

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        return self.parent.add_key(name, role, collections)

    def revoke_key(self, name: str) -> None:
        self.parent.revoke_key(name)


class KeyedEngine(ScriptedEngine):
    """The shared collection's engine in a home with two more collections and three keys."""

    def __init__(self, home: Path, endpoint: str = "http://127.0.0.1:9/v1"):
        super().__init__(home, endpoint)
        self.collection = ""
        self.children = {
            name: CollectionEngine(home, name, endpoint, self) for name in ("cardiology", "legal/matter-17")
        }
        self.children["legal/matter-17"].versions = []
        self.me: dict[str, Any] = {"name": "admin", "role": "admin", "collections": None}
        self.key_list: list[dict[str, Any]] = [
            {"name": "admin", "role": "admin", "collections": None, "created": 1_700_000_000, "revoked": None},
            {"name": "bob", "role": "chat", "collections": ["cardiology"], "created": 1_700_100_000, "revoked": None},
            {
                "name": "old",
                "role": "contributor",
                "collections": ["shared"],
                "created": 1_700_000_500,
                "revoked": 1_700_050_000,
            },
        ]

    def serve_at(self, endpoint: str) -> None:
        for e in (self, *self.children.values()):
            e.endpoint = endpoint

    def collections(self) -> list[dict[str, Any]]:
        rows = [
            {
                "name": "",
                "display": "shared",
                "model_id": "appliance",
                "current": "v1",
                "mode": "merged",
                "documents": 12,
                "records": 340,
                "inbox_files": 3,
            }
        ]
        for name, child in self.children.items():
            current = next((v.version for v in child.versions if v.current), None)
            rows.append(
                {
                    "name": name,
                    "display": name,
                    "model_id": f"appliance/{name}",
                    "current": current,
                    "mode": "adapter",
                    "documents": len(child.documents),
                    "records": 30,
                    "inbox_files": 1,
                }
            )
        return rows

    def scoped(self, collection: str) -> ScriptedEngine:
        return self if collection == "" else self.children[collection]

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        super().add_key(name, role, collections)
        return SECRET


@pytest.fixture()
def engine(tmp_path: Path) -> KeyedEngine:
    (tmp_path / "api_key").write_text("test-key\n")
    return KeyedEngine(tmp_path)


def rows(app, selector: str) -> list[tuple[str, ...]]:
    table = app.screen.query_one(selector, DataTable)
    return [tuple(map(str, table.get_row_at(i))) for i in range(table.row_count)]


def screen_text(app) -> str:
    return app.export_screenshot().replace("&#160;", " ")


async def test_switching_collections_changes_the_data_and_models_screens(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#sources")] == ["policies.jsonl", "facts.md"])
        bar = app.screen.query_one(CollectionBar)
        assert bar.display and [r["display"] for r in bar.rows] == ["shared", "cardiology", "legal/matter-17"]
        assert "(merged model, v1 served) — 12 documents" in screen_text(app)
        await pilot.press("g")  # the next collection: cardiology
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#sources")] == ["cardiology/guidelines.md"])
        assert app.chosen_collection == "cardiology"
        assert "The cardiology model learns from 1 document(s)" in text_of(app, "#summary")
        assert rows(app, "#quarantine") == [("cardiology/scan.pdf", "no text layer")]
        await settle(
            pilot,
            app,
            lambda: any(
                "Only 30 examples in cardiology" in str(w.render()) for w in app.screen.query("#advice Static")
            ),
        )
        shown = screen_text(app)
        assert "cardiology" in shown and "(adapter on base, v1 served) — 1 documents" in shown

        await pilot.press("m")  # Models shows the same collection
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#versions")] == ["v1 ●", "v2"])
        assert str(app.screen.query_one("#collection", Select).value) == "cardiology"
        await pilot.press("down", "p")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        assert "in cardiology" in text_of(app, "#question")
        assert "'appliance/cardiology'" in text_of(app, "#consequence")
        await pilot.press("y")
        child = engine.children["cardiology"]
        await settle(pilot, app, lambda: ("promote", "v2") in child.calls)
        assert not any(c[0] == "promote" for c in engine.calls)  # the shared collection was not touched
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#versions")] == ["v1", "v2 ●"])

        app.screen.query_one("#collection", Select).value = "legal/matter-17"  # the list, as a click would
        await settle(
            pilot,
            app,
            lambda: (
                app.chosen_collection == "legal/matter-17"
                and "No versions in this collection yet" in text_of(app, "#detail")
            ),
        )
        assert rows(app, "#versions") == []
        await pilot.press("g")  # wraps round to shared: its three versions
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#versions")] == ["base", "v1 ●", "v2"])
        assert app.chosen_collection == ""


async def test_lineage_is_read_from_the_chosen_collection(engine):
    app = make_app(engine, poll_seconds=0.2)
    app.chosen_collection = "cardiology"
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#versions")] == ["v1 ●", "v2"])
        await pilot.press("l")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "LineageScreen")
        assert "cardiology/guidelines.md | 30" in app.screen.query_one("#lineage").source


async def test_keys_screen_lists_adds_with_the_secret_once_and_revokes_after_asking(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.is_admin)
        assert app.screen.query_one("#nav-keys").display  # offered in the navigation bar
        await pilot.press("k")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen) and len(rows(app, "#keys")) == 3)
        assert rows(app, "#keys")[1][:3] == ("bob", "chat", "cardiology")
        assert rows(app, "#keys")[0][2] == "all" and rows(app, "#keys")[2][2] == "shared"
        assert rows(app, "#keys")[2][4] != "-" and rows(app, "#keys")[0][4] == "-"  # revoked, and not

        await pilot.press("n")
        await settle(pilot, app, lambda: isinstance(app.screen, AddKeyScreen))
        await pilot.press(*"dr-lee", "enter")  # enter goes on to the role, adds nothing yet
        await settle(pilot, app, lambda: app.screen.focused is app.screen.query_one("#key-role", Select))
        await pilot.press("enter", "down", "enter")  # chat -> contributor, by keyboard
        await settle(pilot, app, lambda: app.screen.query_one("#key-role", Select).value == "contributor")
        assert not any(c[0] == "add_key" for c in engine.calls)
        app.screen.query_one("#key-collections", Input).focus()
        await pilot.press(*"cardiology, shared", "enter")
        await settle(pilot, app, lambda: isinstance(app.screen, SecretScreen))
        assert ("add_key", "dr-lee", "contributor", ["cardiology", ""]) in engine.calls
        shown = screen_text(app)
        assert SECRET in shown and "only time the secret is shown" in shown and ONCE.startswith("This is the only")
        await pilot.press("enter")  # closed: the secret is gone for good
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen) and len(rows(app, "#keys")) == 4)
        assert SECRET not in screen_text(app)
        assert not any(SECRET in str(n.message) for n in app._notifications)
        assert not any(isinstance(s, SecretScreen) for s in app.screen_stack)

        app.screen.query_one("#keys", DataTable).move_cursor(row=1)  # bob
        await pilot.press("x")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        assert "bob" in text_of(app, "#question") and "refused from the next one on" in text_of(app, "#consequence")
        await pilot.press("n")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen))
        await pilot.pause(0.3)
        assert not any(c[0] == "revoke_key" for c in engine.calls)
        await pilot.press("x")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, app, lambda: ("revoke_key", "bob") in engine.calls)
        await settle(pilot, app, lambda: rows(app, "#keys")[1][4] != "-")


async def test_adding_a_key_without_a_name_is_refused_in_place_and_cancel_adds_nothing(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.is_admin)
        await pilot.press("k")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen))
        await pilot.press("n")
        await settle(pilot, app, lambda: isinstance(app.screen, AddKeyScreen))
        await pilot.press("enter")
        assert "Give the key a name" in text_of(app, "#problem")
        await pilot.press("escape")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen))
        await pilot.pause(0.3)
        assert not any(c[0] == "add_key" for c in engine.calls)


async def test_a_key_that_is_not_admin_gets_no_keys_screen(engine):
    engine.me = {"name": "bob", "role": "chat", "collections": ["cardiology"]}
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None and app.board.identity is not None)
        await pilot.press("k")
        await settle(pilot, app, lambda: any("needs an admin key" in n.message for n in app._notifications))
        note = next(n.message for n in app._notifications if "needs an admin key" in n.message)
        assert "bob (chat)" in note and type(app.screen).__name__ == "DashboardScreen"
        assert not app.screen.query_one("#nav-keys").display
        assert "k Keys" not in screen_text(app)
        assert not any(c.title == "Go to Keys" for c in app.get_system_commands(app.screen))
        await pilot.press("i")  # only the key's collection is offered
        await settle(pilot, app, lambda: [r[0] for r in rows(app, "#sources")] == ["cardiology/guidelines.md"])
        assert [r["name"] for r in app.screen.query_one(CollectionBar).rows] == ["cardiology"]
        assert app.chosen_collection == "cardiology"


async def test_an_admin_whose_key_changes_loses_the_keys_screen(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.is_admin)
        await pilot.press("k")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen) and len(rows(app, "#keys")) == 3)
        engine.me = {"name": "bob", "role": "chat", "collections": ["cardiology"]}
        await settle(pilot, app, lambda: "needs an admin key" in text_of(app, "#keys-note"))
        assert rows(app, "#keys") == []


async def test_chat_lists_only_the_collections_the_key_may_use(engine, sse_server, monkeypatch):
    engine.serve_at(sse_server)
    engine.me = {"name": "lee", "role": "chat", "collections": ["cardiology", "legal/matter-17"]}
    (engine.home / "api_key").write_text("the-admin-key-this-window-must-not-use\n")
    monkeypatch.setenv("APPLIANCE_API_KEY", "test-key")  # the caller's own key comes first
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        screen = app.screen
        await settle(
            pilot, app, lambda: [m for _, m in screen.options] == ["appliance/cardiology", "appliance/legal/matter-17"]
        )
        assert str(screen.query_one("#model", Select).value) == "appliance/cardiology"
        screen.query_one("#question").focus()
        await pilot.press(*"hello", "enter")
        await settle(pilot, app, lambda: "left" in screen.answers)
        assert screen.answers["left"] == "appliance/cardiology says: hello "  # the model id went over HTTP
        assert "appliance/cardiology (v1)" in screen_text(app)
        screen.query_one("#model", Select).value = "appliance/legal/matter-17"
        screen.query_one("#question").focus()
        await pilot.press(*"hi", "enter")
        await settle(pilot, app, lambda: screen.answers.get("left", "").startswith("appliance/legal/matter-17"))


async def test_chat_for_a_key_seeing_everything_lists_collections_then_versions(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        screen = app.screen
        await settle(pilot, app, lambda: bool(screen.options) and len(screen.options) > 1)
        assert [m for _, m in screen.options] == [
            "appliance",
            "appliance/cardiology",
            "appliance/legal/matter-17",
            "base",
            "v1",
            "v2",
        ]
        assert dict((m, label) for label, m in screen.options)["appliance/legal/matter-17"].endswith(
            "(nothing served yet)"
        )


def test_a_scoped_client_reads_its_collection_and_is_kept(engine):
    client = Client(engine)
    cardiology = client.scoped("cardiology")
    assert client.scoped("") is client and client.scoped("cardiology") is cardiology
    assert [d.path for d in cardiology.sources()] == ["cardiology/guidelines.md"]
    assert [q.file for q in cardiology.quarantined()] == ["cardiology/scan.pdf"]
    assert client.whoami() == {"name": "admin", "role": "admin", "collections": None}
    engine.me = {"name": "bob", "role": "chat", "collections": ["shared", "cardiology"]}
    assert client.whoami()["collections"] == ["", "cardiology"]  # the engine's "shared" is the rows' ""


def test_collections_typed_by_people_are_parsed_for_the_engine():
    assert parse_collections("") is None and parse_collections(" , ") is None
    assert parse_collections("cardiology, shared; legal/matter-17/ ,cardiology") == [
        "cardiology",
        "",
        "legal/matter-17",
    ]


def test_the_callers_own_key_comes_before_the_homes(engine, monkeypatch):
    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)
    assert Client(engine).api_key() == "test-key"
    monkeypatch.setenv("APPLIANCE_API_KEY", " mine \n")
    assert Client(engine).api_key() == "mine"


# --- the real engine on a real home: a collection folder, the real key store -------------------


@pytest.fixture()
def real_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil

    from conftest import SAMPLE, free_port, tiny_settings

    from appliance.cli.init import create_home

    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)  # the window acts with the home's admin key
    settings = tiny_settings()
    settings.serve.port = free_port()  # nothing listens there: health says so, quickly
    home = create_home(tmp_path / "home", "tiny", settings)
    (home.inbox / "cardiology").mkdir()
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "cardiology" / "policies.jsonl")
    return home


async def test_real_engine_collections_and_keys(real_home):
    from appliance.contract.api import open_engine
    from appliance.home.keys import KeyStore

    app = make_app(open_engine(real_home.root), poll_seconds=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(
            pilot, app, lambda: [r["name"] for r in app.screen.query_one(CollectionBar).rows] == ["", "cardiology"]
        )
        await pilot.press("g")
        await settle(pilot, app, lambda: "The cardiology model learns from 0 document(s)" in text_of(app, "#summary"))
        assert "1 file(s) in its inbox folder" in text_of(app, "#summary")
        await pilot.press("n")  # ingest, for real: the folder is its collection
        await settle(
            pilot, app, lambda: "learns from 1 document(s), 168 record(s)" in text_of(app, "#summary"), timeout=30
        )
        await settle(
            pilot,
            app,
            lambda: rows(app, "#sources") == [("policies.jsonl", "openai-messages", "168", "not yet", "-", "-", "-")],
        )
        assert rows(app, "#quarantine") == [] and "Nothing quarantined" in text_of(app, "#quarantine-note")
        await pilot.press("m")
        await settle(pilot, app, lambda: "No versions in this collection yet" in text_of(app, "#detail"))
        assert "'appliance/cardiology' is not served" in text_of(app, "#detail")

        await pilot.press("k")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen) and len(rows(app, "#keys")) == 1)
        assert rows(app, "#keys")[0][:3] == ("admin", "admin", "all")  # the init key, migrated
        await pilot.press("n")
        await settle(pilot, app, lambda: isinstance(app.screen, AddKeyScreen))
        await pilot.press(*"dr-lee", "enter")
        app.screen.query_one("#key-collections", Input).focus()
        await pilot.press(*"cardiology", "enter")
        await settle(pilot, app, lambda: isinstance(app.screen, SecretScreen))
        secret = str(app.screen.query_one("#secret", Static).render())
        key = KeyStore(real_home).authenticate(secret)  # what was shown is the real secret
        assert key is not None and (key.name, key.role, key.collections) == ("dr-lee", "chat", ("cardiology",))
        await pilot.press("enter")
        await settle(pilot, app, lambda: isinstance(app.screen, KeysScreen) and len(rows(app, "#keys")) == 2)
        assert secret not in screen_text(app)
        app.screen.query_one("#keys", DataTable).move_cursor(row=1)
        await pilot.press("x")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, app, lambda: KeyStore(real_home).authenticate(secret) is None)
        await settle(pilot, app, lambda: rows(app, "#keys")[1][4] != "-")
        assert not any(n.severity == "error" for n in app._notifications)


async def test_real_engine_with_a_collection_key(real_home):
    from appliance.contract.api import open_engine
    from appliance.home.keys import KeyStore

    store = KeyStore(real_home)
    key = store.authenticate(store.add("lee", "chat", ["cardiology"]))
    app = make_app(open_engine(real_home.root, key=key), poll_seconds=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None and app.board.identity is not None)
        assert app.client.collection == "cardiology"  # the shared collection would refuse this key
        await pilot.press("k")
        await settle(pilot, app, lambda: any("needs an admin key" in n.message for n in app._notifications))
        await pilot.press("c")
        await settle(pilot, app, lambda: [m for _, m in app.screen.options] == ["appliance/cardiology"])
        assert not [n for n in app._notifications if n.severity == "error"]


async def test_a_home_with_only_the_shared_collection_offers_no_other(tmp_path):
    (tmp_path / "api_key").write_text("test-key\n")
    app = make_app(ScriptedEngine(tmp_path), poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("i")
        await settle(pilot, app, lambda: app.screen.query_one("#sources", DataTable).row_count == 2)
        assert [r["display"] for r in app.screen.query_one(CollectionBar).rows] == ["shared"]
        assert "g Collection" not in screen_text(app)  # no next collection to go to


def test_the_real_engine_lists_sources_quarantine_and_what_is_not_yet_learned(real_home):
    """Sources from the collection's store, quarantined files with their reasons from the sidecars, and
    'learned' decided by the current version's lineage: stored is not learned until a version trained
    on the document is promoted."""
    from appliance.contract.api import open_engine
    from appliance.home import registry

    (real_home.inbox / "cardiology" / "broken.jsonl").write_text('{"messages": "not a list"}\n{oops\n')
    engine = open_engine(real_home.root).scoped("cardiology")
    assert engine.sources() == [] and engine.quarantined() == [] and engine.status().unlearned == 0
    engine.ingest()
    [doc] = engine.sources()
    assert (doc.path, doc.format, doc.records, doc.collection, doc.learned) == (
        "policies.jsonl",
        "openai-messages",
        168,
        "cardiology",
        False,
    )
    [refused] = engine.quarantined()
    assert refused.file == "broken.jsonl" and refused.reasons and refused.collection == "cardiology"
    assert (real_home.quarantine / "cardiology" / str(refused.moved_to)).exists()
    assert open_engine(real_home.root).quarantined() == []  # the shared collection's quarantine is its own
    assert engine.status().unlearned == 1

    scope = real_home.scoped("cardiology")
    stand_in = real_home.root / "v1.gguf"
    stand_in.write_bytes(b"GGUF" + b"v1" * 64)
    registry.add(scope, "v1", stand_in, {"run": None, "quant": "Q4_K_M"})
    registry.write_lineage(
        scope, "v1", {"version": "v1", "documents": [{"sha256": doc.sha256, "path": doc.path, "records": doc.records}]}
    )
    assert engine.status().unlearned == 1  # registered, not promoted: not learned yet
    registry.promote(scope, "v1")
    assert engine.status().unlearned == 0 and [d.learned for d in engine.sources()] == [True]

    (real_home.quarantine / "cardiology" / str(refused.moved_to)).unlink()  # taken out of quarantine
    assert engine.quarantined() == []
    assert engine.api_key() == (real_home.root / "api_key").read_text().strip()
