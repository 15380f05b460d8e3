"""Serving throughput: the appliance's endpoint (front + llama-server backend) against a
bare native llama-server on the same GGUF, threads, slots and context.

Model: the embedded SmolLM2-135M-Instruct GGUF (``basemodel.embedded_gguf()``), registered
as version ``base`` in a temporary home: both sides serve the same bytes.

- native: ``llama-server`` (the binary the appliance manages, built from the pinned sdist)
  on a loopback TCP port, started by hand with the flags a skilled user would pass.
- appliance: ``appliance serve`` in its own process on a loopback port; each request goes
  through the front (key, Host/Origin, limits, proxy over a Unix socket) to the
  llama-server it manages.

Both are driven by the official openai client: 128-token chat completions at temperature
0 with ``ignore_eos`` (every answer is exactly 128 tokens; tokens counted from ``usage``),
1 client in sequence and 4 concurrent clients; the sides alternate A N, N A, ... in blocks
run back to back, and each ratio is the median over rounds of the per-pair ratio
(appliance rate / native rate), so a load burst from elsewhere skews one pair, not the
result. The last line is one JSON object.

    .venv/bin/python benchmarks/serve_throughput.py [--threads 1] [--rounds 6] [--requests 3] [--smoke]

``--smoke``: one round of 2 requests per client of 8 tokens each, 256 tokens of context per slot
(the embedded GGUF is already the smallest real model on disk: nothing to convert).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

import appliance  # noqa: F401  (offline environment first)
from appliance.cli.init import create_home
from appliance.home import registry
from appliance.home.paths import Home
from appliance.runtime.llama_server import binary
from appliance.serving.guard import read_api_key
from appliance.training.basemodel import embedded_gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native_command(gguf: Path, port: int, slots: int, context: int, threads: int) -> list[str]:
    """A bare native llama-server on a loopback port, with the flags a skilled user would pass."""
    return [
        str(binary()),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--alias",
        "native",
        "--parallel",
        str(slots),
        "--ctx-size",
        str(context * slots),
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        "--jinja",
        "--no-webui",
        "--n-gpu-layers",
        "999",
    ]


def start_native(gguf: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = native_command(gguf, port, args.slots, args.context, args.threads)
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_health(f"http://127.0.0.1:{port}/health", proc, log)
    return proc


def start_appliance(
    home: Home, port: int, args: argparse.Namespace, log: Path, settings: dict[str, str] | None = None
) -> subprocess.Popen:
    """``appliance serve`` in its own process, as users run it (front and client never share a GIL);
    ``settings``: more APPLIANCE_* environment settings, over the ones taken from ``args``."""
    env = {
        **os.environ,
        "APPLIANCE_SERVE__THREADS": str(args.threads),
        "APPLIANCE_SERVE__SLOTS": str(args.slots),
        "APPLIANCE_SERVE__CONTEXT": str(args.context),
        "APPLIANCE_SERVE__MAX_TOKENS_LIMIT": str(max(2048, args.tokens)),
        **(settings or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.command", "serve", "--home", str(home.root), "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_health(f"http://127.0.0.1:{port}/health", proc, log, lambda r: bool(r.json().get("loaded")))
    return proc


def wait_health(url: str, proc: subprocess.Popen, log: Path, ready=lambda r: True) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            reply = httpx.get(url, timeout=2)
            if reply.status_code == 200 and ready(reply):
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up; see {log}")
        time.sleep(0.1)


def one_request(base_url: str, key: str, model: str, tokens: int) -> int:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    reply = client.chat.completions.create(
        model=model,
        max_tokens=tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Write a long story about a clinic on a busy night."}],
    )
    return reply.usage.completion_tokens


def measure(
    base_url: str, key: str, model: str | list[str], clients: int, requests: int, tokens: int
) -> tuple[int, float]:
    """(completion tokens, seconds) for ``clients`` concurrent clients doing ``requests`` each;
    with a list of models, each client's requests cycle through it (client i starts at the i-th)."""
    models = [model] if isinstance(model, str) else model

    def worker(i: int) -> int:
        return sum(one_request(base_url, key, models[(i + r) % len(models)], tokens) for r in range(requests))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(worker, range(clients)))
    return total, time.perf_counter() - started


def tally(rnd: int, clients: int, block: dict[str, list], totals: dict[tuple[str, int], list]) -> dict[str, float]:
    """Add one round's blocks (side -> [tokens, seconds]) to the totals, print them, return each side's rate."""
    rates = {}
    for side, (tokens, seconds) in block.items():
        totals[(side, clients)][0] += tokens
        totals[(side, clients)][1] += seconds
        rates[side] = tokens / seconds
        print(
            f"round {rnd + 1} {side:9s} clients={clients} {rates[side]:7.1f} tok/s "
            f"({tokens} tokens in {seconds:.1f} s)",
            flush=True,
        )
    return rates


def server_arguments(description: str, requests: int, requests_help: str) -> argparse.ArgumentParser:
    """The options both serving benchmarks share (llama-server's shape and the rounds)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024, help="context per slot")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=requests, help=requests_help)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same code path at a tiny size: 1 round, 2 requests per client, 8 tokens each",
    )
    return parser


def parse_server_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, cut down to the smoke size when ``--smoke`` is given."""
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.requests, args.tokens, args.context = 1, 2, 8, 256
    return args


def main() -> None:
    args = parse_server_arguments(server_arguments(__doc__.splitlines()[0], 3, "requests per client per block"))

    work = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=os.environ.get("BENCH_TMP")))
    home = create_home(work / "home", "embedded")
    gguf = embedded_gguf()
    registry.add(home, "base", gguf, {"quant": "as shipped"})
    registry.promote(home, "base")

    native_port = free_port()
    native = start_native(registry.gguf_path(home, "base"), native_port, args, work / "native.log")
    app_port = free_port()
    server = start_appliance(home, app_port, args, work / "appliance.log")
    sides = {
        "appliance": (f"http://127.0.0.1:{app_port}/v1", read_api_key(home), "appliance"),
        "native": (f"http://127.0.0.1:{native_port}/v1", "none", "native"),
    }
    totals = {(side, c): [0, 0.0] for side in sides for c in (1, 4)}
    pairs: dict[int, list[float]] = {1: [], 4: []}
    try:
        for url, key, model in sides.values():  # warm-up: first-request costs out of the clock
            measure(url, key, model, 1, 1, 16)
        for rnd in range(args.rounds):
            # A N, then N A: each pair of blocks runs back to back, so a burst of load from
            # elsewhere on the machine hits both sides of a pair about equally
            order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
            for clients in (1, 4):
                rates = {}
                # one client: single requests alternate A N A N within the block (a 128-token
                # answer takes about 2 s here, too short to average out other load alone)
                steps = (
                    [(side, 1) for _ in range(args.requests) for side in order]
                    if clients == 1
                    else [(side, args.requests) for side in order]
                )
                block = {side: [0, 0.0] for side in order}
                for side, requests in steps:
                    tokens, seconds = measure(*sides[side], clients, requests, args.tokens)
                    block[side][0] += tokens
                    block[side][1] += seconds
                rates.update(tally(rnd, clients, block, totals))
                pairs[clients].append(rates["appliance"] / rates["native"])
    finally:
        for proc in (server, native):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    # the median of the per-pair ratios: robust to a pair that a load burst skewed
    ratio_1, ratio_4 = statistics.median(pairs[1]), statistics.median(pairs[4])
    result = {
        "name": "serve_throughput",
        "model": gguf.name,
        "threads": args.threads,
        "slots": args.slots,
        "context_per_slot": args.context,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "native_1": round(rate[("native", 1)], 1),
        "appliance_1": round(rate[("appliance", 1)], 1),
        "native_4": round(rate[("native", 4)], 1),
        "appliance_4": round(rate[("appliance", 4)], 1),
        "pair_ratios_1": [round(r, 3) for r in pairs[1]],
        "pair_ratios_4": [round(r, 3) for r in pairs[4]],
        "ratio_1": round(ratio_1, 3),
        "ratio_4": round(ratio_4, 3),
        "target_1": 0.95,
        "target_4": 0.90,
        "pass": ratio_1 >= 0.95 and ratio_4 >= 0.90,
    }
    shutil.rmtree(work, ignore_errors=True)  # kept when a run fails: its logs say why
    print(json.dumps(result))


if __name__ == "__main__":
    main()
