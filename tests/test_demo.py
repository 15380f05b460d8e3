"""End to end on the embedded default model: `appliance demo` as a user runs it.

The demo's own path (a fresh home, the embedded base exported, ingest, train, export,
promote, the endpoint, probes asked of base and tuned) on the first 12 facts of the bundled
clinic sample (``--data``): the whole sample takes 9-20 minutes on two CPU cores (slower
where bf16 is not native), these 12 facts about 4, with the same settings, which are a
fresh home's defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port

from appliance.home.config import Settings

FACTS = 12
CONVERSATIONS_PER_FACT = 5  # examples/clinic/facts.md: each fact asked five ways, in order


def sample_subset(folder: Path) -> Path:
    clinic = REPO / "examples" / "clinic"
    folder.mkdir()
    policies = (clinic / "policies.jsonl").read_text().splitlines()[: FACTS * CONVERSATIONS_PER_FACT]
    probes = (clinic / "probes.jsonl").read_text().splitlines()[:FACTS]
    (folder / "policies.jsonl").write_text("\n".join(policies) + "\n")
    (folder / "probes.jsonl").write_text("\n".join(probes) + "\n")
    return folder


def demo(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``appliance demo ARGS`` as a user starts it."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", "demo", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_demo_tunes_the_embedded_model_and_it_answers_better(tmp_path: Path):
    home = tmp_path / "demo-home"
    data = sample_subset(tmp_path / "sample")
    proc = demo("--home", str(home), "--no-wait", "--json", "--port", str(free_port()), "--data", str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    print(
        f"demo: base {summary['base_score']}/{summary['probes']}, tuned {summary['tuned_score']}/{summary['probes']},"
        f" {summary['total_seconds']:.0f} s"
    )
    assert summary["probes"] == FACTS
    assert summary["tuned_score"] > summary["base_score"]
    assert summary["current"] == summary["version"] == "v1"
    assert (home / "models" / "v1" / "model.gguf").exists()
    run = next((home / "runs").glob("run-*"))
    assert json.loads((run / "parity.json").read_text())["passed"]
    # no demo-only settings: the run trained with what a fresh home's config says
    trained = json.loads((run / "train.json").read_text())["settings"]
    defaults = Settings().train.model_dump(mode="json")
    assert set(trained) <= set(defaults)
    assert trained == {k: defaults[k] for k in trained}


def test_demo_data_must_hold_both_files(tmp_path: Path):
    (tmp_path / "only-policies").mkdir()
    (tmp_path / "only-policies" / "policies.jsonl").write_text("{}\n")
    proc = demo("--home", str(tmp_path / "h"), "--data", str(tmp_path / "only-policies"), timeout=120)
    assert proc.returncode != 0
    assert "probes.jsonl: missing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "h").exists()  # refused before any work
