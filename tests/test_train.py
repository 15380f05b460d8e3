"""Training: resumable after kill -9, survives out-of-memory, stops early, keeps the best."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.contract.errors import TrainError
from appliance.engine.local import LocalEngine
from appliance.home.config import dump, load
from appliance.home.fsutil import read_json
from appliance.home.paths import Home
from appliance.training.train import FAULT_OOM_ENV

REPO = Path(__file__).resolve().parents[1]


def configure(home: Home, **train: object) -> None:
    settings = load(home.config)
    for key, value in train.items():
        setattr(settings.train, key, value)
    home.config.write_text(dump(settings))


def cli_train(home: Home, run: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "train", "--home", str(home.root), "--run", run, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_home: Home):
    configure(
        tiny_home, max_steps=16, checkpoint_every=4, eval_every=8, micro_tokens=512, tokens_per_step=512, patience=None
    )
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    # First attempt: out of memory above 128 tokens per pass (injected), then killed.
    proc = cli_train(tiny_home, "killed", env={FAULT_OOM_ENV: "128"})
    checkpoints = tiny_home.run("killed").checkpoints
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step-*/state.json")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tiny_home.run("killed").root / "train.json").exists()
    killed_at = read_json(sorted(checkpoints.glob("step-*/state.json"))[-1])["step"]
    # Second attempt resumes without the fault: the halved setting must persist.
    resumed = cli_train(tiny_home, "killed")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    info = read_json(tiny_home.run("killed").root / "train.json")
    assert info["steps"] == 16 and info["resumed_from"] == [killed_at]
    assert info["micro_tokens"] == 128
    assert [p["step"] for p in info["curve"]] == list(range(1, 17))
    assert not checkpoints.exists()  # cleaned once finished
    # The same run without interruption ends at the same loss.
    engine.train(run_id="straight")
    straight = read_json(tiny_home.run("straight").root / "train.json")
    assert info["curve"][-1]["loss"] == pytest.approx(straight["curve"][-1]["loss"], rel=2e-3)
    assert info["best_val_loss"] == pytest.approx(straight["best_val_loss"], rel=2e-3)


def test_half_written_checkpoint_is_never_picked(tiny_home: Home):
    configure(tiny_home, max_steps=4, checkpoint_every=2, micro_tokens=512, tokens_per_step=512)
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    run = tiny_home.run("r")
    # A checkpoint folder caught mid-write: staging name, no state.json.
    (run.checkpoints / ".step-000002.partial").mkdir(parents=True)
    (run.checkpoints / ".step-000002.partial" / "adapter.safetensors").write_bytes(b"half")
    engine.train(run_id="r")
    info = read_json(run.root / "train.json")
    assert info["resumed_from"] == [] and info["steps"] == 4


def test_out_of_memory_with_one_example_per_pass_is_a_clear_error(tiny_home: Home, monkeypatch):
    configure(tiny_home, max_steps=2)
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    monkeypatch.setenv(FAULT_OOM_ENV, "16")
    with pytest.raises(TrainError, match="out of memory even with one"):
        engine.train()


def test_early_stopping_keeps_the_best_adapter(tiny_home: Home):
    # A learning rate far too high makes validation loss climb after the first steps.
    configure(
        tiny_home, max_steps=12, eval_every=1, patience=2, learning_rate=0.3, warmup_ratio=0.0, checkpoint_every=100
    )
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    run_id = engine.train()
    info = read_json(tiny_home.run(run_id).root / "train.json")
    vals = [p["val_loss"] for p in info["curve"] if "val_loss" in p]
    assert info["stopped_early"] and info["steps"] < 12
    assert info["best_val_loss"] == pytest.approx(min(vals))
    assert info["best_step"] == next(p["step"] for p in info["curve"] if p.get("val_loss") == min(vals))
    assert (tiny_home.run(run_id).adapter / "adapter_config.json").exists()


def test_fixed_seed_loss_matches_the_recorded_curve(tiny_home: Home):
    """Any change to rendering, packing, masking or the optimizer moves these numbers."""
    configure(tiny_home, max_steps=4, micro_tokens=256, tokens_per_step=512, patience=None, general_mix=0.0)
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    run_id = engine.train()
    losses = [p["loss"] for p in read_json(tiny_home.run(run_id).root / "train.json")["curve"]]
    assert losses == pytest.approx(RECORDED_CURVE, rel=2e-3)


RECORDED_CURVE = [5.7128, 5.4824, 5.4078, 5.5121]  # recorded 2026-11-28, torch 2.13.0 CPU


def test_dora_and_general_mix(tiny_home: Home):
    configure(tiny_home, max_steps=2, dora=True, method="lora", general_mix=0.2)
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    run_id = engine.train()
    info = read_json(tiny_home.run(run_id).root / "train.json")
    assert info["dora"] is True and info["general_examples"] == round(0.25 * info["train_examples"])
    config = json.loads((tiny_home.run(run_id).adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_general_mix_never_holds_what_the_gate_measures():
    """The general material trained against forgetting shares no run of six words with the
    gate's general text and holds none of its probe questions: both stay unseen."""
    import re

    folder = REPO / "appliance" / "data" / "general"

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def shingles(text: str) -> set[tuple[str, ...]]:
        w = words(text)
        return {tuple(w[i : i + 6]) for i in range(len(w) - 5)}

    trained = (folder / "prose.txt").read_text() + "\n" + (folder / "conversations.jsonl").read_text()
    assert len(shingles(trained)) > 3000
    assert not shingles(trained) & shingles((folder / "text.txt").read_text())
    flat = " ".join(words(trained))
    questions = [json.loads(line)["question"] for line in (folder / "probes.jsonl").read_text().splitlines()]
    assert questions and not [q for q in questions if " ".join(words(q)) in flat]
    paragraphs = [p for p in (folder / "prose.txt").read_text().split("\n\n") if p.strip()]
    assert len(paragraphs) >= 40


def test_progress_events_carry_the_numbers_people_watch(tiny_home: Home):
    from appliance.contract.events import Progress

    configure(tiny_home, max_steps=3, eval_every=3)
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    seen: list = []
    engine.train(emit=seen.append)
    progress = [e for e in seen if isinstance(e, Progress)]
    assert [e.completed for e in progress] == [1, 2, 3]
    for key in ("loss", "lr", "tokens_per_s", "peak_memory_mb", "eta_s", "epoch"):
        assert key in progress[-1].metrics
    assert "val_loss" in progress[-1].metrics and progress[-1].metrics["eta_s"] == 0


def test_validation_does_not_break_later_gradients(tiny_base: Path):
    """Regression: a validation pass must not change what the next training step computes
    (bitsandbytes' CPU repacking of 4-bit weights in eval mode drops their backward)."""
    import torch
    from conftest import SAMPLE

    from appliance.data.ingest.chat_jsonl import parse
    from appliance.home.config import Settings
    from appliance.runtime.hf import load_tokenizer
    from appliance.training.examples import pack
    from appliance.training.render import render
    from appliance.training.train import evaluate, load_trainable, step_loss

    settings = Settings()
    tokenizer = load_tokenizer(tiny_base)
    examples = [render(tokenizer, r, 512) for r in parse(SAMPLE / "policies.jsonl").records[:8]]
    torch.manual_seed(0)
    model = load_trainable(tiny_base, settings, "cpu", "qlora", total_steps=10)
    for module in model.modules():  # deterministic: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rows = pack(examples, 512)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        step_loss(model, rows, "cpu", backward=True)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    evaluate(model, examples, "cpu", 512)
    after = grads()
    first_layer = [n for n in before if "layers.0." in n]
    assert first_layer and all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)


def test_stop_between_passes_checkpoints_the_last_complete_step(tiny_home: Home):
    """A daemon asked to stop mid-step drops the partial step, checkpoints the last
    complete one and resumes from it (no finished step is lost)."""
    from appliance.data import snapshot
    from appliance.training.train import TrainInterrupted, train

    configure(tiny_home, max_steps=4, checkpoint_every=100, micro_tokens=128, tokens_per_step=512)
    LocalEngine(tiny_home.root).ingest()
    settings = load(tiny_home.config)
    snap = snapshot.cut(tiny_home, settings.data.val_fraction)
    passes = {"n": 0}

    def stop() -> bool:  # true in the middle of step 3 (4 passes of 128 tokens per step)
        passes["n"] += 1
        return passes["n"] > 2 * 5 + 2

    with pytest.raises(TrainInterrupted):
        train(tiny_home, snap, settings, run_id="s", stop=stop)
    run = tiny_home.run("s")
    saved = sorted(p.name for p in run.checkpoints.glob("step-*"))
    assert saved == ["step-000002"]
    assert read_json(run.checkpoints / "step-000002" / "state.json")["step"] == 2
    result = train(tiny_home, snap, settings, run_id="s")
    assert result.steps == 4 and read_json(run.root / "train.json")["resumed_from"] == [2]
