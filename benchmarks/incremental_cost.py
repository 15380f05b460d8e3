"""Incremental cost: one new file dropped into a home whose store already holds N files'
records, N = 1x and 10x; the time from the drop to the promoted version, on the
incremental path and on the full-retrain path, side by side.

For each N (``--files``, default 20 and 200 chat files of 10 conversations, each stating
its own made-up codes), a home on the tests' tiny model trains a first version on the N
files (a full run), then one new file is dropped and one job runs it through every stage
(ingest, snapshot, train, export, gate, promote) twice from the same starting copy:
``[train] incremental = true`` (continue the adapter on the new records plus a replay
sample) and ``false`` (from the base on everything). The gate is made lenient here (the
question is cost, not whether a random tiny model's 6th version is better).

Ratios (10x over 1x): ``incremental_ratio`` (target <= 1.5) and ``full_ratio`` beside it,
for the whole drop-to-promoted time and for the train stage alone. Then old knowledge:
five incremental runs each add a file, and the validation loss of the *first* file's
records (with the adapter of each version) must stay within the gate's margin of what
the first version reached. The last line is one JSON object.

    .venv/bin/python benchmarks/incremental_cost.py [--files 20,200] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke import smoke_base  # noqa: E402

from appliance.cli.init import init  # noqa: E402
from appliance.data.ingest import ingest  # noqa: E402
from appliance.engine.pipeline import Context, run_job  # noqa: E402
from appliance.home import registry  # noqa: E402
from appliance.home.config import dump, load  # noqa: E402
from appliance.home.fsutil import read_json  # noqa: E402
from appliance.home.journal import Journal  # noqa: E402
from appliance.home.paths import Home  # noqa: E402

TARGETS = {"incremental_ratio": 1.5, "first_facts_loss_growth": 0.05}
CONVERSATIONS = 10
CHAIN = 5  # runs after the first, each adding a file; the first file's loss is read after each
SMOKE_CHAIN = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default=None, help="the two store sizes, 1x and 10x (default 20,200)")
    parser.add_argument("--smoke", action="store_true", help="2 and 4 files, a chain of 2, a few steps: the code path")
    args = parser.parse_args()
    sizes = [int(n) for n in (args.files or ("2,4" if args.smoke else "20,200")).split(",")]
    work = Path(tempfile.mkdtemp(prefix="incremental-cost-", dir=os.environ.get("BENCH_TMP")))
    try:
        result = run(work, sizes, args.smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def chat_file(path: Path, topic: str) -> None:
    lines = []
    for i in range(CONVERSATIONS):
        code = f"{topic[:3].upper()}-{i:03d}"
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is the {topic} code for item {i}?"},
                        {"role": "assistant", "content": f"The {topic} code for item {i} is {code}."},
                    ]
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")


def template(work: Path, smoke: bool) -> Home:
    home = Home(work / "template")
    init(home.root, str(smoke_base(work)))
    s = load(home.config)
    s.gate.require_better_on_new = False
    s.gate.require_recall_gain = False
    s.gate.loss_margin = 100.0
    s.gate.general_max_drop = 1.0
    s.gate.general_max_ppl_ratio = 100.0
    s.gate.user_max_drop = 1.0
    s.gate.recall_max_drop = 1.0
    s.train.threads = 1
    if smoke:
        s.train.max_steps = 4
    home.config.write_text(dump(s))
    return home


def job(home: Home) -> tuple[float, dict[str, Any]]:
    """Ingest what is in the inbox and run one train job to its end: seconds, train.json."""
    started = time.monotonic()
    ingest(home)
    with Journal(home.jobs_db) as journal:
        journal.enqueue("train", reason="benchmark")
        done = run_job(Context(home, journal, load(home.config)), journal.next_job())
    seconds = time.monotonic() - started
    if done.state not in ("done", "refused"):
        sys.exit(f"the job failed: {done.error}")
    return seconds, read_json(home.run(done.run_id or "").train_json)


def run(work: Path, sizes: list[int], smoke: bool) -> dict[str, Any]:
    base = template(work, smoke)
    timings: dict[str, dict[int, dict[str, float]]] = {"incremental": {}, "full": {}}
    for n in sizes:
        start = Home(work / f"start-{n}")
        shutil.copytree(base.root, start.root, symlinks=True)
        for i in range(n):
            chat_file(start.inbox / f"file-{i:04d}.jsonl", f"topic{i}")
        job(start)  # the first version, on the N files
        for mode in ("incremental", "full"):
            home = Home(work / f"{mode}-{n}")
            shutil.copytree(start.root, home.root, symlinks=True)
            settings = load(home.config)
            settings.train.incremental = mode == "incremental"
            home.config.write_text(dump(settings))
            chat_file(home.inbox / "new.jsonl", "fresh")
            seconds, info = job(home)
            timings[mode][n] = {"seconds": seconds, "train_seconds": info["seconds"], "steps": info["steps"]}
            print(
                f"{n} files, {mode}: {seconds:.1f} s (train {info['seconds']:.1f} s, {info['steps']} steps; "
                f"{info['incremental']['mode']}: {info['incremental']['reason']})",
                flush=True,
            )
    small, large = sizes[0], sizes[-1]

    def ratio(mode: str, key: str) -> float:
        return round(timings[mode][large][key] / timings[mode][small][key], 3)

    kept = old_knowledge(work, base, smoke)
    result = {
        "name": "incremental_cost",
        "files": sizes,
        "timings": {m: {str(k): v for k, v in t.items()} for m, t in timings.items()},
        "incremental_ratio": ratio("incremental", "seconds"),
        "full_ratio": ratio("full", "seconds"),
        "incremental_train_ratio": ratio("incremental", "train_seconds"),
        "full_train_ratio": ratio("full", "train_seconds"),
        "first_facts": kept,
        "targets": TARGETS,
        "smoke": smoke,
    }
    result["pass"] = (
        result["incremental_ratio"] <= TARGETS["incremental_ratio"]
        and kept["growth"] <= TARGETS["first_facts_loss_growth"]
    )
    return result


def old_knowledge(work: Path, base: Home, smoke: bool) -> dict[str, Any]:
    """The first file's loss under each version of a chain of five incremental runs."""
    home = Home(work / "chain")
    shutil.copytree(base.root, home.root, symlinks=True)
    chat_file(home.inbox / "first.jsonl", "first")
    chat_file(home.inbox / "second.jsonl", "second")
    job(home)
    losses, modes = [first_loss(home)], []
    for i in range(SMOKE_CHAIN if smoke else CHAIN):
        chat_file(home.inbox / f"more-{i}.jsonl", f"more{i}")
        _, info = job(home)
        modes.append(info["incremental"]["mode"])
        losses.append(first_loss(home))
    return {"losses": losses, "modes": modes, "growth": round(losses[-1] - losses[0], 4)}


def first_loss(home: Home) -> float:
    """Mean loss per token of first.jsonl's conversations under the current version's adapter."""
    import torch
    from peft import PeftModel

    from appliance.data.ingest.chat_jsonl import parse
    from appliance.runtime.hf import load_causal_lm, load_tokenizer
    from appliance.training.render import render
    from appliance.training.train import step_loss

    settings = load(home.config)
    version = registry.current(home)
    base_dir = home.base(settings.base.name)
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, dtype=torch.float32)
    if version and version != "base":
        model = PeftModel.from_pretrained(model, home.run(registry.get(home, version)["run"]).adapter)
    model.eval()
    examples = [render(tokenizer, r, 256) for r in parse(home.inbox / "first.jsonl").records]
    with torch.no_grad():
        loss, _ = step_loss(model, [examples], "cpu", backward=False)  # one row per example, token-weighted
    return round(loss, 4)


if __name__ == "__main__":
    main()
