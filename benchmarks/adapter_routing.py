"""Adapter routing: collections' LoRA adapters served on the one loaded base (the adapter
host, requests choosing their adapter per request) against one of them merged into its
own model, both through the same appliance endpoint, on the same prompts.

Model: the embedded SmolLM2-135M-Instruct (``export_time.base_dir()``, imported once into
~/.cache/appliance-bench), with ``export_time.make_adapter``'s LoRA (r=16 on every linear
layer, random A, small random B). The second adapter is the first with B negated: other
weights, the same shapes and cost. Files, each built the way the appliance builds them:

- ``base``: the base converted to f16 and quantized (``--quant``, default Q4_K_M);
- adapters: ``convert_lora`` (f16 GGUF LoRA), registered as version v1 of collections
  ``alpha`` and ``beta`` (adapter versions, served on ``base``);
- merged: ``merge()`` of adapter alpha into the base, converted and quantized the same
  way, registered as the shared collection's ``v1``.

``appliance serve`` runs in its own process; the official openai client sends 128-token
chat completions at temperature 0 with ``ignore_eos``:

- adapter: ``appliance/alpha`` and ``appliance/beta`` alternately, so every request
  switches adapter (llama.cpp then drops the slot's prompt cache as well);
- merged: ``v1``, the same prompt.

One client in sequence (the headline ``ratio``), then 4 concurrent clients (two per
adapter: llama.cpp batches only slots with the same adapters, so this is the worst mix).
The sides alternate A M, M A, ... in blocks run back to back and each ratio is the median
of the per-pair ratios (adapter rate / merged rate). The last line is one JSON object.

    nice -n -15 .venv/bin/python benchmarks/adapter_routing.py [--threads 1] [--rounds 6] [--requests 4]
                                                               [--adapter-type f16|q8_0]
                                                               [--shape embedded|smollm2-360m|smollm2-1.7b]
                                                               [--smoke]

``--smoke``: the tests' tiny random model as the base, one round of 2 requests per client of
8 tokens each (``--shape`` is then ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_time import base_dir, make_adapter  # noqa: E402  (the same model and LoRA as the export benchmark)
from serve_throughput import free_port, parse_server_arguments, server_arguments, start_appliance, tally  # noqa: E402
from serve_throughput import measure as run_block
from smoke import smoke_base  # noqa: E402

from appliance.cli.init import create_home  # noqa: E402
from appliance.home import registry  # noqa: E402
from appliance.home.paths import Home  # noqa: E402
from appliance.serving.guard import read_api_key  # noqa: E402

COLLECTIONS = ("alpha", "beta")
# Larger bases of the same family for --shape (random weights: decode speed does not depend
# on their values, and with ignore_eos every request generates exactly --tokens tokens).
SHAPES = {
    "smollm2-360m": dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5
    ),
    "smollm2-1.7b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32
    ),
}

MODELS = {"embedded": "SmolLM2-135M-Instruct", "tiny": "the tests' tiny random Llama"}


def shaped_base(shape: str, work: Path) -> Path:
    """The embedded model itself, a random model of a larger SmolLM2's shape with its
    tokenizer, or (``tiny``, the smoke size) the tests' tiny model."""
    if shape == "tiny":
        return smoke_base(work)
    embedded = base_dir()
    if shape == "embedded":
        return embedded
    out = embedded.parent.parent / f"random-{shape}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(embedded)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def negated(adapter: Path, out: Path) -> Path:
    """The same LoRA with B negated: a different adapter of exactly the same shape and cost."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def build(work: Path, quant: str, adapter_type: str, shape: str = "embedded") -> Home:
    """A home serving base + two adapter collections + the merged model of one of them."""
    from appliance.export.convert import convert, convert_lora
    from appliance.export.quantize import quantize
    from appliance.training.merge import merge

    base = shaped_base(shape, work)
    started = time.monotonic()
    peft = {"alpha": make_adapter(base, work / "alpha")}
    peft["beta"] = negated(peft["alpha"], work / "beta")
    home = create_home(work / "home", "embedded")

    def gguf(hf_dir: Path, name: str) -> Path:
        return quantize(convert(hf_dir, work / f"{name}-f16.gguf"), work / f"{name}-{quant}.gguf", quant)

    record = registry.add(home, "base", gguf(base, "base"), {"quant": quant})
    merged = gguf(merge(base, peft["alpha"], work / "merged"), "merged")
    registry.add(home, "v1", merged, {"quant": quant, "merged_from": "alpha"})
    registry.promote(home, "v1")
    for collection in COLLECTIONS:
        scope = home.scoped(collection)
        scope.inbox.mkdir(parents=True, exist_ok=True)
        lora = convert_lora(base, peft[collection], work / f"{collection}.gguf", outtype=adapter_type)
        registry.add(
            scope,
            "v1",
            lora,
            {"kind": "adapter", "base_version": "base", "base_sha256": record["sha256"], "collection": collection},
            name=registry.ADAPTER_FILE,
        )
        registry.promote(scope, "v1")
    print(
        f"built base, two {adapter_type} adapters and the merged model ({quant}) in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return home


def main() -> None:
    parser = server_arguments(__doc__.splitlines()[0], 4, "requests per client per block (even: both adapters)")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument(
        "--adapter-type", default="f16", choices=["f16", "q8_0"], help="the GGUF LoRA's tensor type (export writes f16)"
    )
    parser.add_argument(
        "--shape",
        default="embedded",
        choices=["embedded", *SHAPES],
        help="the embedded SmolLM2-135M, or a random model of a larger SmolLM2's shape",
    )
    args = parse_server_arguments(parser)
    if args.smoke:
        args.shape = "tiny"

    work = Path(tempfile.mkdtemp(prefix="adapter-bench-", dir=os.environ.get("BENCH_TMP")))
    home = build(work, args.quant, args.adapter_type, args.shape)
    port = free_port()
    server = start_appliance(home, port, args, work / "appliance.log")
    url, key = f"http://127.0.0.1:{port}/v1", read_api_key(home)
    sides = {"adapter": [f"appliance/{c}" for c in COLLECTIONS], "merged": ["v1"]}
    totals = {(side, c): [0, 0.0] for side in sides for c in (1, 4)}
    pairs: dict[int, list[float]] = {1: [], 4: []}
    try:
        for models in sides.values():  # warm-up: backends loaded, first-request costs out of the clock
            run_block(url, key, models, len(models), 1, 16)
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for clients in (1, 4):
                # one client: single requests alternate A M A M within the block, so a burst of
                # load from elsewhere on the machine hits both sides about equally
                steps = (
                    [(side, 1) for _ in range(args.requests) for side in order]
                    if clients == 1
                    else [(side, args.requests) for side in order]
                )
                block = {side: [0, 0.0] for side in order}
                turn = {side: 0 for side in order}
                for side, requests in steps:
                    models = sides[side][turn[side] :] + sides[side][: turn[side]]  # the adapter keeps alternating
                    turn[side] = (turn[side] + requests) % len(sides[side])
                    tokens, seconds = run_block(url, key, models, clients, requests, args.tokens)
                    block[side][0] += tokens
                    block[side][1] += seconds
                rates = tally(rnd, clients, block, totals)
                pairs[clients].append(rates["adapter"] / rates["merged"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    ratio_1, ratio_4 = statistics.median(pairs[1]), statistics.median(pairs[4])
    result = {
        "name": "adapter_routing",
        "ratio": round(ratio_1, 3),
        "target": 0.8,
        "pass": ratio_1 >= 0.8,
        "model": MODELS.get(args.shape, f"random {args.shape} shape"),
        "quant": args.quant,
        "adapter_type": args.adapter_type,
        "lora_r": 16,
        "threads": args.threads,
        "slots": args.slots,
        "context_per_slot": args.context,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "adapter_1": round(rate[("adapter", 1)], 1),
        "merged_1": round(rate[("merged", 1)], 1),
        "adapter_4": round(rate[("adapter", 4)], 1),
        "merged_4": round(rate[("merged", 4)], 1),
        "pair_ratios_1": [round(r, 3) for r in pairs[1]],
        "pair_ratios_4": [round(r, 3) for r in pairs[4]],
        "ratio_4": round(ratio_4, 3),
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
