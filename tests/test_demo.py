"""End to end on the embedded default model: `appliance demo` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port


@pytest.mark.slow
def test_demo_tunes_the_embedded_model_and_it_answers_better(tmp_path: Path):
    home = tmp_path / "demo-home"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "demo",
            "--home",
            str(home),
            "--no-wait",
            "--json",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=2700,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    print(
        f"demo: base {summary['base_score']}/{summary['probes']}, tuned {summary['tuned_score']}/{summary['probes']},"
        f" {summary['total_seconds']:.0f} s"
    )
    assert summary["probes"] >= 30
    assert summary["tuned_score"] > summary["base_score"]
    assert summary["current"] == summary["version"] == "v1"
    assert (home / "models" / "v1" / "model.gguf").exists()
    parity = json.loads(next((home / "runs").glob("run-*/parity.json")).read_text())
    assert parity["passed"]
