"""The terminal app against the real in-process engine on a real home, and the real
``appliance tui`` command in tmux.

The home is a real one (create_home: config, api_key, SQLite store) holding the clinic
sample and a malformed file; model versions are registered through the real registry
with small stand-in files (promotion and rollback only move the ``current`` pointer,
so no model has to load). The chat test at the end serves the embedded SmolLM2 GGUF
through the real endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, free_port, tiny_settings
from textual.widgets import DataTable, Static

from appliance.cli.init import create_home
from appliance.contract.api import open_engine
from appliance.home import registry
from appliance.home.paths import Home
from tui.app import make_app
from tui.widgets import ConfirmScreen

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    settings = tiny_settings()
    settings.serve.port = free_port()  # nothing listens there: health says so, quickly
    home = create_home(tmp_path / "home", "tiny", settings)
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    (home.inbox / "broken.jsonl").write_text('{"messages": "not a list"}\n{oops\n')
    for name in ("base", "v1"):
        stand_in = tmp_path / f"{name}.gguf"
        stand_in.write_bytes(b"GGUF" + name.encode() * 64)
        registry.add(
            home, name, stand_in, {"run": None, "quant": "Q4_K_M", "best_val_loss": 2.5 if name == "v1" else None}
        )
        time.sleep(0.01)  # versions are ordered by creation time
    registry.promote(home, "base")
    return home


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def settle(pilot, until, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        if until():
            return
    raise AssertionError("condition not reached")


async def test_real_engine_status_data_models_and_activity(home: Home):
    app = make_app(open_engine(home.root), poll_seconds=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, lambda: app.board is not None)
        assert text_of(app, "#sentence") == "2 new documents waiting in the inbox."
        facts = text_of(app, "#facts")
        assert "Model: base" in facts and "not running" in facts

        await pilot.press("i")
        await pilot.press("n")  # ingest now, for real
        await settle(pilot, lambda: app.screen.query_one("#quarantine", DataTable).row_count == 1)
        row = app.screen.query_one("#quarantine", DataTable).get_row_at(0)
        assert row[0] == "broken.jsonl" and row[1]
        assert "1 document(s)" in text_of(app, "#summary")
        assert any("Learned" in n.message for n in app._notifications)
        sources = app.screen.query_one("#sources", DataTable)
        await settle(pilot, lambda: sources.row_count == 1)
        assert [str(c) for c in sources.get_row_at(0)] == [
            "policies.jsonl",
            "openai-messages",
            "168",
            "not yet",
            "-",
            "-",
            "-",
        ]
        await pilot.press("d")  # read into the store, but no served version was trained on it
        await settle(pilot, lambda: "1 document(s) stored, not yet learned" in text_of(app, "#facts"))

        await pilot.press("m")
        table = app.screen.query_one(DataTable)
        await settle(pilot, lambda: table.row_count == 2)
        assert str(table.get_row_at(0)[0]) == "base ●"
        await settle(pilot, lambda: table.get_row_at(1)[4] == "2.500")  # v1's validation loss, via the engine
        await pilot.press("down", "p")
        await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await settle(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.3)
        assert registry.current(home) == "base"
        await pilot.press("p")
        await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, lambda: registry.current(home) == "v1")
        await settle(pilot, lambda: str(table.get_row_at(1)[0]) == "v1 ●")
        await pilot.press("r")
        await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, lambda: registry.current(home) == "base")

        await pilot.press("a")  # the engine's audit log recorded both
        activity = app.screen.query_one(DataTable)
        await settle(pilot, lambda: activity.row_count >= 2)
        whats = [activity.get_row_at(i)[2] for i in range(activity.row_count)]
        assert "promote" in whats and "rollback" in whats

        app.action_verify_audit()  # the command palette's "Verify the audit chain"
        await settle(pilot, lambda: any(n.title == "Audit chain" for n in app._notifications))
        verdict = next(n for n in app._notifications if n.title == "Audit chain")
        assert "intact" in verdict.message and verdict.severity != "error"


async def test_real_engine_error_is_a_notification(home: Home):
    app = make_app(open_engine(home.root), poll_seconds=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await settle(pilot, lambda: app.screen.query_one(DataTable).row_count == 2)
        await pilot.press("r")  # nothing was promoted before base
        await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, lambda: any(n.severity == "error" for n in app._notifications))
        note = next(n for n in app._notifications if n.severity == "error")
        assert "nothing to roll back to" in note.message and note.title == "Model registry"
        assert app.is_running


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_real_command_starts_and_quits_in_tmux(home: Home):
    session = f"tui-test-{os.getpid()}"
    command = f"{REPO / '.venv/bin/appliance'} tui --home {home.root}; echo EXITED=$?; sleep 30"
    _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", command)
    try:
        screen = ""
        deadline = time.monotonic() + 60
        while "waiting in the inbox" not in screen and time.monotonic() < deadline:
            time.sleep(0.5)
            screen = _tmux("capture-pane", "-p", "-t", session)
        assert "2 new documents waiting in the inbox." in screen, screen
        assert "Model: base" in screen and str(home.root)[:30] in screen  # the title names the home
        _tmux("send-keys", "-t", session, "m")
        deadline = time.monotonic() + 20
        while "base ●" not in screen and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = _tmux("capture-pane", "-p", "-t", session)
        assert "base ●" in screen and "v1" in screen, screen
        _tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 20
        while "EXITED=" not in screen and time.monotonic() < deadline:
            time.sleep(0.3)
            screen = _tmux("capture-pane", "-p", "-t", session)
        assert "EXITED=0" in screen and "Traceback" not in screen, screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def _llama_server_missing() -> str | None:
    from appliance.contract.errors import ApplianceError
    from appliance.runtime.llama_server import binary

    try:
        binary()
    except ApplianceError as exc:
        return str(exc)
    return None


@pytest.mark.slow
async def test_chat_streams_from_the_real_endpoint(tmp_path: Path):
    """The embedded SmolLM2 GGUF as version 'base', served by the appliance's own endpoint."""
    if reason := _llama_server_missing():
        pytest.skip(reason)
    from appliance.home.config import load
    from appliance.serving.server import Server
    from appliance.training.basemodel import embedded_gguf

    settings = tiny_settings()
    settings.serve.port = free_port()
    home = create_home(tmp_path / "home", "tiny", settings)
    registry.add(home, "base", embedded_gguf(), {"run": None, "quant": "Q4_1"})
    registry.promote(home, "base")
    server = Server(home, load(home.config)).start()
    try:
        app = make_app(open_engine(home.root), poll_seconds=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, lambda: app.board is not None and "answering" in app.board.health)
            await pilot.press("c")
            await pilot.pause(0.2)
            await pilot.press(*"What is the capital of France?", "enter")
            screen = app.screen
            await settle(pilot, lambda: "left" in screen.answers, timeout=120)
            assert screen.answers["left"].strip()
            await pilot.press("ctrl+r")  # mark the answer wrong, write the right one
            await settle(pilot, lambda: type(app.screen).__name__ == "CorrectionScreen")
            await pilot.press(*"Paris.", "ctrl+s")
            await settle(pilot, lambda: list(home.inbox.glob("correction-*.jsonl")))
            saved = json.loads(next(home.inbox.glob("correction-*.jsonl")).read_text())
            assert saved["messages"] == [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
    finally:
        server.stop()


def test_real_engine_files_a_correction_in_the_inbox(home: Home):
    from tui.client import Client

    client = Client(open_engine(home.root))
    messages = [{"role": "user", "content": "How much is a missed appointment?"}]
    path = Path(client.correct(messages, "The fee for a missed appointment is 20 euros."))
    assert path.parent == home.inbox and path.exists()
    saved = json.loads(path.read_text().splitlines()[0])
    assert saved["messages"] == [
        *messages,
        {"role": "assistant", "content": "The fee for a missed appointment is 20 euros."},
    ]
    assert "correction" in saved  # marked, so people can tell corrections apart


async def test_real_engine_advice_on_the_data_screen(home: Home):
    app = make_app(open_engine(home.root), poll_seconds=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await pilot.press("n")  # ingest the clinic sample: far fewer than 500 examples
        await settle(pilot, lambda: app.screen.query_one("#quarantine", DataTable).row_count == 1)
        await settle(
            pilot, lambda: any(str(w.render()).startswith("⚠") for w in app.screen.query("#advice Static")), timeout=60
        )
        lines = [str(w.render()) for w in app.screen.query("#advice Static")]
        assert "not available" not in " ".join(lines)
        warnings = [i for i, line in enumerate(lines) if line.startswith("⚠")]
        assert warnings == list(range(len(warnings)))  # warnings come first
        assert app.is_running
