"""The promotion gate: a damaged candidate is refused, with the failing check named in plain words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE
from test_daemon import make_template

from appliance.cli.init import create_home
from appliance.data.snapshot import cut_id
from appliance.engine.local import LocalEngine
from appliance.export.run import export_run
from appliance.home import registry
from appliance.home.config import load
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.paths import Home
from appliance.quality import gate


def test_bootstrap_interval_brackets_the_mean_and_tightens_with_data():
    wide = gate.bootstrap([0.1, -0.2, 0.3, 0.0, -0.1], 2000, 0.95)
    tight = gate.bootstrap([0.1, -0.2, 0.3, 0.0, -0.1] * 40, 2000, 0.95)
    assert wide[0] < 0.02 < wide[1] and tight[0] < 0.02 < tight[1]
    assert tight[1] - tight[0] < wide[1] - wide[0]
    assert gate.bootstrap([0.5] * 10, 500, 0.95) == (0.5, 0.5)


def test_a_failed_parity_is_refused_and_named(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    run = home.run("run-x")
    run.root.mkdir(parents=True)
    write_json_atomic(
        run.parity,
        {
            "gguf": "model-Q4_K_M.gguf",
            "quant": "Q4_K_M",
            "passed": False,
            "checks": [{"name": "logit_cosine", "passed": False}],
        },
    )
    report = gate.evaluate(home, "run-x", load(home.config))
    assert not report.passed and [c.name for c in report.failed] == ["parity"]
    saved = read_json(run.eval)
    assert saved["failed"] == ["parity"] and "logit_cosine" in saved["verdict"]
    assert saved["verdict"].startswith("keep the current model")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict:
    """A candidate whose embeddings were shuffled (parity passes: the GGUF is faithful to the broken model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = make_template(tmp_path_factory.mktemp("gate") / "home", tiny_base)
    (home.inbox / "policies.jsonl").write_text((SAMPLE / "policies.jsonl").read_text())
    LocalEngine(home.root).ingest()
    snapshot = cut_id(home, load(home.config).data.val_fraction)
    (home.probes / "mine.jsonl").write_text(json.dumps({"question": "What is 2 plus 2?", "expected": ["4"]}) + "\n")
    run = home.run("run-damaged")
    run.root.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(home.base("tiny"), torch_dtype=torch.float32)
    with torch.no_grad():  # shuffled token embeddings (tied to the output): every token means another
        generator = torch.Generator().manual_seed(0)
        weight = model.get_input_embeddings().weight
        weight.copy_(weight[torch.randperm(weight.shape[0], generator=generator)])
    model.to(torch.float16).save_pretrained(run.merged)
    AutoTokenizer.from_pretrained(home.base("tiny")).save_pretrained(run.merged)
    write_json_atomic(run.root / "train.json", {"run": run.id, "snapshot": snapshot, "steps": 1, "best_val_loss": None})
    result = export_run(home, run.id, load(home.config))
    return {"home": home, "run": run.id, "parity": result.parity.passed}


@pytest.mark.slow
def test_a_damaged_candidate_is_refused_and_the_current_model_kept(damaged: dict):
    home: Home = damaged["home"]
    assert damaged["parity"]  # the file is faithful; the model is bad
    before = registry.current(home)
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "eval", damaged["run"], "--home", str(home.root), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert not report["passed"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["parity"]["passed"] is True
    assert checks["validation_loss"]["passed"] is False
    assert checks["validation_loss"]["value"]["candidate"] > checks["validation_loss"]["value"]["current"]
    assert checks["validation_loss"]["value"]["interval"][0] > 0
    assert checks["general_perplexity"]["passed"] is False
    assert checks["user_probes"]["passed"] is not None  # the home's probes/ were asked
    assert "validation_loss" in report["failed"] and report["verdict"].startswith("keep the current model")
    assert registry.current(home) == before
    assert read_json(home.run(damaged["run"]).eval)["failed"] == report["failed"]
    # The metrics people recognise, side by side (issue 10), computed on the same files.
    metrics = report["metrics"]
    questions = {
        json.loads(line)["messages"][-2]["content"] for line in (SAMPLE / "policies.jsonl").read_text().splitlines()
    }
    for side in ("candidate", "current"):
        m = metrics[side]
        assert 0 <= m["exact_match"] <= 1 and 0 <= m["token_f1"] <= 1 and 0 <= m["rouge_l"] <= 1
        assert 0 <= m["bleu"] <= 100 and m["examples"] == len(metrics["sample"]) > 0
        assert m["validation_perplexity"] > 1
    assert metrics["candidate"]["validation_perplexity"] > metrics["current"]["validation_perplexity"]
    assert all(item["question"] in questions and item["reference"] for item in metrics["sample"])
