"""Distributed training: 2 processes (torchrun, gloo, one CPU thread each) against 1 process
(one thread), the same run: same data, same optimizer steps, same effective batch; data
parallel (ddp, a whole model per process) and sharded (fsdp, FSDP2 over the 4-bit base).

A correctness benchmark first: the per-step training losses of the two runs must agree
within 2% and the final loss within 1% (the step's gradients are summed across processes,
so the updates are those of one process, up to floating-point summation order). Then
throughput: real tokens per second of training steps (model loading excluded), 2 processes
over 1, where each process has its own core (target >= 1.6).

Both runs go through the appliance's own launcher (training/launch.py: torchrun, rank 0
writes), on a home whose snapshot holds the clinic sample conversations and generated
chat files; study material is off so the data are exactly the same. The last line printed
is one JSON object.

    .venv/bin/python benchmarks/distributed_train.py [--steps 16] [--smoke]

Full size: the embedded SmolLM2-135M, QLoRA. ``--smoke``: the tests' tiny model, 3 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke import REPO, smoke_base  # noqa: E402

from appliance.cli.init import init  # noqa: E402
from appliance.data.ingest import ingest  # noqa: E402
from appliance.data.snapshot import cut  # noqa: E402
from appliance.home.config import load  # noqa: E402
from appliance.home.fsutil import read_json  # noqa: E402
from appliance.home.paths import Home  # noqa: E402
from appliance.training.launch import launch  # noqa: E402

TARGETS = {
    "final_loss_rel_diff": 0.01,
    "step_loss_rel_diff": 0.02,
    "tokens_per_s_ratio": 1.6,
    "fsdp_final_loss_rel_diff": 0.01,
    "fsdp_step_loss_rel_diff": 0.02,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of each run")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 3 steps: the code path")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distributed-train-", dir=os.environ.get("BENCH_TMP")))
    try:
        result = run(work, 3 if args.smoke else args.steps, args.smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def home_with_data(work: Path, smoke: bool) -> Home:
    home = Home(work / "home")
    init(home.root, str(smoke_base(work)) if smoke else "embedded")
    shutil.copy(REPO / "examples" / "clinic" / "policies.jsonl", home.inbox / "policies.jsonl")
    lines = []
    for i in range(200):  # enough conversations that every step is full and both processes have work
        question = f"What is the procedure code for item {i} on ward {i % 7}?"
        answer = (
            f"Item {i} on ward {i % 7} uses procedure code PR-{i:04d}; record it on the chart before the shift ends."
        )
        lines.append(
            json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        )
    (home.inbox / "codes.jsonl").write_text("\n".join(lines) + "\n")
    ingest(home)
    return home


def run(work: Path, steps: int, smoke: bool) -> dict[str, Any]:
    home = home_with_data(work, smoke)
    settings = load(home.config)
    settings.study.enabled = False
    settings.train.general_mix = 0.0
    settings.train.method = "qlora"
    settings.train.max_steps = steps
    settings.train.tokens_per_step = 2048
    settings.train.micro_tokens = 256
    settings.train.eval_every = steps  # one validation, at the end
    settings.train.patience = None
    settings.train.threads = 1  # each process on its own core
    snap = cut(home, settings.data.val_fraction)
    runs = {}
    for name, n, layout in (("p1", 1, "ddp"), ("p2", 2, "ddp"), ("fsdp2", 2, "fsdp")):
        settings.train.processes = n
        settings.train.distributed = layout  # type: ignore[assignment]
        launch(home, snap.id, settings, name, "train", lambda _: None)
        runs[name] = read_json(home.run(name).train_json)
        print(f"{n} process(es), {layout}: {summarise(runs[name])}", flush=True)
    one, two, sharded = runs["p1"]["curve"], runs["p2"]["curve"], runs["fsdp2"]["curve"]
    step_diffs = rel_diffs(one, two)
    fsdp_diffs = rel_diffs(one, sharded)
    result = {
        "name": "distributed_train",
        "model": "tiny" if smoke else "SmolLM2-135M (embedded), QLoRA",
        "steps": steps,
        "processes": [runs[name]["processes"] for name in ("p1", "p2", "fsdp2")],
        "losses_1": [round(p["loss"], 5) for p in one],
        "losses_2": [round(p["loss"], 5) for p in two],
        "losses_fsdp_2": [round(p["loss"], 5) for p in sharded],
        "final_loss_rel_diff": round(step_diffs[-1], 6),
        "step_loss_rel_diff": round(max(step_diffs), 6),
        "fsdp_final_loss_rel_diff": round(fsdp_diffs[-1], 6),
        "fsdp_step_loss_rel_diff": round(max(fsdp_diffs), 6),
        "tokens_per_s_1": round(tokens_per_s(runs["p1"]), 1),
        "tokens_per_s_2": round(tokens_per_s(runs["p2"]), 1),
        "tokens_per_s_fsdp_2": round(tokens_per_s(runs["fsdp2"]), 1),
        "targets": TARGETS,
        "smoke": smoke,
    }
    result["tokens_per_s_ratio"] = round(result["tokens_per_s_2"] / result["tokens_per_s_1"], 3)
    # FSDP gathers every layer's weights from the other rank at each pass: on two CPU cores
    # over gloo that is slower than DDP; it exists for bases one device cannot hold (no target).
    result["fsdp_tokens_per_s_ratio"] = round(result["tokens_per_s_fsdp_2"] / result["tokens_per_s_1"], 3)
    result["pass"] = all(
        (result[key] >= target) if key == "tokens_per_s_ratio" else (result[key] <= target)
        for key, target in TARGETS.items()
    )
    return result


def rel_diffs(one: list[dict[str, Any]], other: list[dict[str, Any]]) -> list[float]:
    """Each step's loss of ``other`` against the one-process run's, relative."""
    return [abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(one, other, strict=True)]


def tokens_per_s(info: dict[str, Any]) -> float:
    """Tokens over the time spent in training steps (each step's tokens / its rate)."""
    seconds = sum(p.get("tokens", 0) / p["tokens_per_s"] for p in info["curve"])
    tokens = sum(p.get("tokens", 0) for p in info["curve"])
    return tokens / seconds if seconds else 0.0


def summarise(info: dict[str, Any]) -> str:
    return (
        f"{info['steps']} steps, final loss {info['curve'][-1]['loss']:.4f}, "
        f"{tokens_per_s(info):.0f} tokens/s, {info['seconds']:.1f} s in all"
    )


if __name__ == "__main__":
    main()
