"""Training throughput: the appliance's trainer against a plain Trainer + PEFT baseline.

Same model (the embedded SmolLM2-135M, QLoRA NF4, LoRA r=16 all-linear, dropout 0.05),
same data (chat examples whose lengths are drawn log-uniformly between 32 and 1024
tokens, fixed seed), same batches of 8 examples in the same order, same hardware and
threads. The baseline is ``transformers.Trainer`` with ``DataCollatorForSeq2Seq``,
which pads each batch to its longest example; the appliance packs the same examples
padding-free. Throughput counts real (non-padding) tokens per second for both.

Each measurement runs in its own subprocess (so peak memory is per variant), and the
variants alternate A B A B. The last line printed is one JSON object.

    .venv/bin/python benchmarks/train_throughput.py [--batches 3] [--rounds 2] [--smoke]

``--smoke``: the tests' tiny random model, one batch of examples up to 128 tokens, one round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke import smoke_base  # noqa: E402

BATCH = 8
WORDS = (
    "the clinic policy requires staff to record every dose on the chart before the end of each shift "
    "visitors sign in at the front desk and wear a badge infection control reviews the sharps bins "
    "pharmacy answers after hours on the internal line patients are discharged with written instructions"
).split()


def base_dir() -> Path:
    from appliance.training.basemodel import import_base

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance-bench" / "smollm2"
    return import_base("embedded", cache)


def examples(tokenizer, n: int, seed: int = 0, longest: int = 1024):
    """Chat examples with total lengths log-uniform in [32, ``longest``] tokens."""
    from appliance.data.ingest.records import Record
    from appliance.training.render import render

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        target = int(math.exp(rng.uniform(math.log(32), math.log(longest))))
        words = max(4, int(target * 0.7))  # about 1.3 tokens per word here, less the template's overhead
        split = max(1, words // 3)
        text = [rng.choice(WORDS) for _ in range(words)]
        record = Record(
            "chat",
            {
                "messages": [
                    {"role": "user", "content": " ".join(text[:split])},
                    {"role": "assistant", "content": " ".join(text[split:])},
                ]
            },
        )
        ex = render(tokenizer, record, longest, "truncate")
        if 32 <= len(ex.input_ids) <= longest:
            out.append(ex)
    return out


def run_appliance(base: Path, batches) -> dict:
    import torch

    from appliance.home.config import Settings
    from appliance.training.train import TrainState, load_trainable, train_step

    settings = Settings()
    model = load_trainable(base, settings, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    state = TrainState("bench", "bench", len(batches), micro_tokens=256)
    model.train()
    tokens, seconds = 0, 0.0
    for batch in batches:
        t0 = time.perf_counter()
        train_step(model, batch, state, "cpu", lambda e: None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += sum(len(e.input_ids) for e in batch)
    return {"tokens": tokens, "seconds": seconds}


def run_baseline(base: Path, batches) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from appliance.home.config import Settings
    from appliance.runtime.hf import load_tokenizer
    from appliance.training.train import load_trainable

    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_trainable(base, Settings(), "cpu")
    data = [{"input_ids": e.input_ids, "labels": e.labels} for batch in batches for e in batch]

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = 0.0, 0.0

        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds += time.perf_counter() - self.t0

    class InOrder(Trainer):  # same batches, same order as the appliance's run
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=len(batches),
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = InOrder(
            model=model,
            args=args,
            train_dataset=data,
            callbacks=[timer],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        )
        torch.manual_seed(0)
        trainer.train()
    return {"tokens": sum(len(e.input_ids) for batch in batches for e in batch), "seconds": timer.seconds}


def child(variant: str, base: Path, n_batches: int, threads: int, longest: int) -> None:
    import torch

    from appliance.runtime.hf import load_tokenizer

    torch.set_num_threads(threads)
    exs = examples(load_tokenizer(base), BATCH * n_batches, longest=longest)
    batches = [exs[i : i + BATCH] for i in range(0, len(exs), BATCH)]
    result = (run_appliance if variant == "appliance" else run_baseline)(base, batches)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", choices=["appliance", "baseline"])
    parser.add_argument("--longest", type=int, default=1024, help="the longest example, in tokens")
    parser.add_argument("--base", type=Path, help="the HF checkpoint to train (default: the embedded model)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same code path at a tiny size: "
        "the tests' tiny random model, 1 batch of examples up to 128 tokens, 1 round",
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.batches, args.threads, args.longest)
        return
    if args.smoke:
        args.batches, args.rounds, args.longest = 1, 1, 128
    with tempfile.TemporaryDirectory(prefix="train-bench-", dir=os.environ.get("BENCH_TMP")) as work:
        if args.base is None:  # import the model once, outside the timed children
            args.base = smoke_base(Path(work)) if args.smoke else base_dir()
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """The variants alternating, each in its own subprocess; prints the result line."""
    results: dict[str, list[dict]] = {"appliance": [], "baseline": []}
    for round_ in range(args.rounds):
        for variant in ("appliance", "baseline"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--base",
                    str(args.base),
                    "--batches",
                    str(args.batches),
                    "--threads",
                    str(args.threads),
                    "--longest",
                    str(args.longest),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            results[variant].append(result)
            print(
                f"round {round_ + 1} {variant:9s} {result['tokens_per_s']:7.1f} tok/s  "
                f"peak RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    speed = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in results.items()}
    memory = {v: statistics.median(r["peak_rss_mb"] for r in rs) for v, rs in results.items()}
    ratio = speed["appliance"] / speed["baseline"]
    mem_ratio = memory["appliance"] / memory["baseline"]
    print(
        json.dumps(
            {
                "name": "train_throughput",
                "ratio": round(ratio, 3),
                "target": 2.0,
                "peak_mem_ratio": round(mem_ratio, 3),
                "appliance_tokens_per_s": round(speed["appliance"], 1),
                "baseline_tokens_per_s": round(speed["baseline"], 1),
                "batches": args.batches,
                "longest": args.longest,
                "rounds": args.rounds,
                "threads": args.threads,
                "pass": ratio >= 2.0 and mem_ratio <= 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()
