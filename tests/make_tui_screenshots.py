"""Regenerate the TUI screenshots in tui/screenshots/ (SVG, Textual's export) at 80x24.

    .venv/bin/python tests/make_tui_screenshots.py

States: dashboard idle, training mid-way, the gate refusing a candidate, and chat in
compare mode (streamed over real HTTP from the test's SSE server). Uses the scripted
engine of tests/test_tui.py; not collected by pytest.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import uvicorn  # noqa: E402
from conftest import free_port  # noqa: E402
from test_tui import ScriptedEngine, make_app, sse_app  # noqa: E402
from test_tui_snapshots import training_midway  # noqa: E402

from appliance.contract.events import StageFinished, StageStarted  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tui" / "screenshots"
SHOWN_HOME = "/var/lib/appliance"


def engine() -> ScriptedEngine:
    home = Path(tempfile.mkdtemp(prefix="appliance-"))
    (home / "api_key").write_text("test-key")
    return ScriptedEngine(home)


async def shot(e: ScriptedEngine, name: str, keys: tuple[str, ...] = (), until=None) -> None:
    app = make_app(e, poll_seconds=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(1.5)
        for key in keys:
            await pilot.press(key)
        for _ in range(100 if until else 0):
            await pilot.pause(0.1)
            if until(app):
                break
        app.sub_title = SHOWN_HOME  # not the temporary folder
        await pilot.pause(0.5)
        (OUT / f"{name}.svg").write_text(app.export_screenshot(title=f"appliance tui — {name}"))


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    await shot(engine(), "dashboard-idle")
    e = engine()
    training_midway(e, time.time())
    await shot(e, "dashboard-training")
    e = engine()
    e.emit_event(StageStarted("gate", description="Comparing run r2 with the current model"))
    e.emit_event(
        StageFinished(
            "gate",
            summary="keep the current model v1: validation_loss: validation loss 2.31 "
            "vs current 1.91, worse than the current model beyond the margin 0.02",
        )
    )
    await shot(e, "dashboard-gate-failed")
    e = engine()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sse_app("test-key"), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    e.endpoint = f"http://127.0.0.1:{port}/v1"
    await shot(
        e,
        "chat-compare",
        ("c", "ctrl+o", *"What is the visiting policy?", "enter"),
        until=lambda app: {"left", "right"} <= set(app.screen.answers),
    )
    server.should_exit = True


if __name__ == "__main__":
    asyncio.run(main())
