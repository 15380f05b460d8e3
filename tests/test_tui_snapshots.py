"""Snapshot tests (pytest-textual-snapshot) of the screens people see most, at 80x24:
the dashboard idle, training mid-way and after a refused gate, and the chat screen
comparing two versions. The scripted engine's state is fixed (no clock in it), so the
SVGs are the same on every run; `pytest --snapshot-update` rewrites them after a
deliberate change (review the diff in tests/__snapshots__/)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_tui import ScriptedEngine, make_app

from appliance.contract.events import Progress, StageFinished, StageStarted

NOW = 1_764_000_000.0  # a fixed moment: the screens show durations, never the wall clock
SIZE = (80, 24)


@pytest.fixture()
def scripted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ScriptedEngine:
    import time

    monkeypatch.setattr(time, "time", lambda: NOW)
    monkeypatch.setenv("TZ", "UTC")  # version dates are shown in local time
    time.tzset()
    (tmp_path / "api_key").write_text("test-key")
    return ScriptedEngine(tmp_path)


def shown(app):
    return app


async def settle(pilot) -> None:
    pilot.app.sub_title = "/var/lib/appliance"  # not the temporary folder, which differs per run
    await pilot.pause(1.0)


def test_dashboard_idle(snap_compare, scripted: ScriptedEngine):
    assert snap_compare(shown(make_app(scripted, poll_seconds=0.2)), terminal_size=SIZE, run_before=settle)


def training_midway(engine: ScriptedEngine, now: float) -> None:
    """Step 120 of 400 with a falling loss curve (also used by tests/make_tui_screenshots.py)."""
    engine.emit_event(StageStarted("train", total=400, description="Learning from 3 new documents", at=now - 60))
    for i in range(1, 121):
        metrics = {"loss": 2.2 + 0.9 * math.exp(-i / 40) + 0.08 * math.sin(i)}
        if i % 10 == 0:
            metrics["val_loss"] = 2.3 + 0.8 * math.exp(-i / 45)
        engine.emit_event(Progress("train", completed=i, total=400, metrics=metrics, at=now))
    engine.job = {
        "id": 3,
        "kind": "train",
        "stage": "train",
        "since": now - 70,
        "progress": {"stage": "train", "completed": 120, "total": 400, "metrics": {"eta_s": 360.0}},
    }


def test_dashboard_training_midway(snap_compare, scripted: ScriptedEngine):
    training_midway(scripted, NOW)
    assert snap_compare(shown(make_app(scripted, poll_seconds=0.2)), terminal_size=SIZE, run_before=settle)


def test_dashboard_gate_failed(snap_compare, scripted: ScriptedEngine):
    scripted.emit_event(StageStarted("gate", description="Comparing run r2 with the current model", at=NOW))
    scripted.emit_event(
        StageFinished(
            "gate",
            summary="keep the current model v1: validation_loss: validation loss "
            "2.31 vs current 1.91, worse than the current model beyond "
            "the margin 0.02",
            at=NOW,
        )
    )
    assert snap_compare(shown(make_app(scripted, poll_seconds=0.2)), terminal_size=SIZE, run_before=settle)


def test_chat_screen(snap_compare, scripted: ScriptedEngine):
    async def open_chat(pilot) -> None:
        await pilot.press("c", "ctrl+o")
        await settle(pilot)

    assert snap_compare(shown(make_app(scripted, poll_seconds=0.2)), terminal_size=SIZE, run_before=open_chat)
