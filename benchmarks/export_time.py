"""Export time: the appliance's merge + convert + quantize against the manual path.

Model: the embedded SmolLM2-135M-Instruct (``import_base('embedded', ...)``, cached in
~/.cache/appliance-bench) with a LoRA r=16 on every linear layer built with peft (random
A, small random B, so merging changes every weight).

- appliance: ``merge()`` then ``export_model(..., quant)``, the code ``appliance export``
  runs; its parity check (with 17 held-out clinic conversations for the recall part, as
  the demo's snapshot has) is timed apart and left out of the ratio.
- manual: what a skilled engineer runs by hand with the same tools: peft's
  ``merge_and_unload`` on the base as transformers loads it, ``save_pretrained``,
  ``python convert_hf_to_gguf.py --outtype f16`` (the same pinned converter), then
  ``llama_model_quantize``.
- copy: a plain copy of the bytes the appliance wrote (merged checkpoint, f16 and
  quantized GGUF), for information (io_ratio).

Each measurement runs in its own subprocess with its imports done before the clock
starts; the paths alternate A M, M A, ... The last line printed is one JSON object.

    .venv/bin/python benchmarks/export_time.py [--rounds 5] [--quant Q4_K_M] [--smoke]

``--smoke``: the tests' tiny random model, one round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import appliance  # noqa: F401  (offline environment first)

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from smoke import smoke_base  # noqa: E402


def base_dir() -> Path:
    from appliance.training.basemodel import import_base

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance-bench" / "smollm2"
    return import_base("embedded", cache)


def make_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from appliance.runtime.hf import load_causal_lm

    torch.manual_seed(0)
    model = get_peft_model(
        load_causal_lm(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    model.save_pretrained(out)
    return out


# --- one measurement each, in a fresh process ------------------------------------------------


def preload() -> None:
    """What both paths use, imported before either clock starts (the appliance imports lazily)."""
    import llama_cpp  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401


def appliance_path(base: Path, adapter: Path, work: Path, quant: str) -> dict[str, float]:
    from appliance.export.run import export_model, gguf_metadata
    from appliance.home.config import Settings
    from appliance.training.merge import merge

    preload()
    started = time.perf_counter()
    merge(base, adapter, work / "merged")
    merged = time.perf_counter() - started
    result = export_model(
        work / "merged",
        work / "gguf",
        quant,
        gguf_metadata("smollm2", "bench", None),
        Settings(),
        answers=validation_set(work / "merged"),
    )
    steps = {"merge": merged, "convert": result.seconds["convert"], "quantize": result.seconds.get("quantize", 0.0)}
    return {
        **steps,
        "total": sum(steps.values()),
        "parity": result.seconds["parity"],
        "parity_passed": result.parity.passed,
        "bytes": _bytes(work),
    }


def validation_set(model_dir: Path, n: int = 17) -> list:
    """What the demo's snapshot holds out (10% of the clinic conversations), for the
    recall part of the parity check; rendered before the parity clock starts."""
    from appliance.data.ingest.chat_jsonl import parse
    from appliance.runtime.hf import load_tokenizer
    from appliance.training.render import render

    tokenizer = load_tokenizer(model_dir)
    records = parse(HERE.parents[1] / "examples" / "clinic" / "policies.jsonl").records
    return [render(tokenizer, r, 1024, "truncate") for r in records[:: max(1, len(records) // n)][:n]]


def manual_path(base: Path, adapter: Path, work: Path, quant: str) -> dict[str, float]:
    import ctypes

    import llama_cpp
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.export.quantize import FTYPES
    from appliance.runtime.toolchain import converter_env, llama_cpp_dir

    preload()
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(work / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(work / "merged")
    t1 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(llama_cpp_dir() / "convert_hf_to_gguf.py"),
            str(work / "merged"),
            "--outfile",
            str(work / "f16.gguf"),
            "--outtype",
            "f16",
        ],
        env=converter_env(),
        check=True,
        capture_output=True,
    )
    t2 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    rc = llama_cpp.llama_model_quantize(
        str(work / "f16.gguf").encode(), str(work / f"{quant}.gguf").encode(), ctypes.byref(params)
    )
    assert rc == 0, rc
    t3 = time.perf_counter()
    steps = {"merge": t1 - t0, "convert": t2 - t1, "quantize": t3 - t2}
    return {**steps, "total": t3 - t0}


def copy_path(source: Path, work: Path) -> dict[str, float]:
    """Copy every file the appliance path wrote (not its .partial leftovers: there are none)."""
    started = time.perf_counter()
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        target = work / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    return {"total": time.perf_counter() - started}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(kind: str, base: Path, adapter: Path, work: Path, quant: str, source: Path | None = None) -> dict:
    cmd = [
        sys.executable,
        str(HERE),
        "--one",
        kind,
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--work",
        str(work),
        "--quant",
        quant,
    ] + (["--source", str(source)] if source else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--one", choices=["appliance", "manual", "copy"])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--source", type=Path)
    parser.add_argument(
        "--smoke", action="store_true", help="the same code path at a tiny size: the tests' tiny random model, 1 round"
    )
    args = parser.parse_args()
    if args.one:
        args.work.mkdir(parents=True)
        paths = {
            "appliance": lambda: appliance_path(args.base, args.adapter, args.work, args.quant),
            "manual": lambda: manual_path(args.base, args.adapter, args.work, args.quant),
            "copy": lambda: copy_path(args.source, args.work),
        }
        print(json.dumps(paths[args.one]()))
        return
    run_all(1 if args.smoke else args.rounds, args.quant, args.smoke)


def run_all(rounds: int, quant: str, smoke: bool = False) -> None:
    results: dict[str, list[dict]] = {"appliance": [], "manual": [], "copy": []}
    with tempfile.TemporaryDirectory(prefix="export-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        base = smoke_base(root) if smoke else base_dir()
        adapter = make_adapter(base, root / "adapter")
        for r in range(rounds):
            order = ["appliance", "manual"] if r % 2 == 0 else ["manual", "appliance"]
            for kind in order:
                work = root / f"{r}-{kind}"
                results[kind].append(measure(kind, base, adapter, work, quant))
                print(
                    f"round {r + 1} {kind}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in results[kind][-1].items() if isinstance(v, float)),
                    flush=True,
                )
            results["copy"].append(measure("copy", base, adapter, root / f"{r}-copy", quant, root / f"{r}-appliance"))
            for kind in order:
                shutil.rmtree(root / f"{r}-{kind}")
            shutil.rmtree(root / f"{r}-copy")
    report(results, quant, rounds)


def report(results: dict[str, list[dict]], quant: str, rounds: int) -> None:
    med = lambda kind, key="total": statistics.median(r[key] for r in results[kind])  # noqa: E731
    for step in ("merge", "convert", "quantize"):
        print(f"median {step}: appliance {med('appliance', step):.2f} s, manual {med('manual', step):.2f} s")
    print(
        f"median parity check (not in the ratio): {med('appliance', 'parity'):.2f} s; "
        f"copy of the same {results['appliance'][0]['bytes'] / 1e6:.0f} MB: {med('copy'):.2f} s"
    )
    ratio = med("appliance") / med("manual")
    print(
        json.dumps(
            {
                "name": "export_time",
                "ratio": round(ratio, 3),
                "target": 1.0,
                "parity_seconds": round(med("appliance", "parity"), 2),
                "io_ratio": round(med("appliance") / med("copy"), 1),
                "pass": ratio <= 1.0,
                "appliance_seconds": round(med("appliance"), 2),
                "manual_seconds": round(med("manual"), 2),
                "quant": quant,
                "rounds": rounds,
                "steps": {
                    k: {"appliance": round(med("appliance", k), 2), "manual": round(med("manual", k), 2)}
                    for k in ("merge", "convert", "quantize")
                },
                "parity_passed": all(r["parity_passed"] for r in results["appliance"]),
            }
        )
    )


if __name__ == "__main__":
    main()
