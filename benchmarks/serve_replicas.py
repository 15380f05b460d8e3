"""Serving replicas: the endpoint with 2 llama-server replicas of one thread each against 1
replica with two threads, 8 concurrent clients, the same GGUF, slots and context; then one
replica killed (SIGKILL) in the middle of a run.

Model: the embedded SmolLM2-135M-Instruct GGUF, registered as version ``base``. Both
endpoints are ``appliance serve`` processes (``[serve] replicas`` and ``threads`` set through
the environment) started side by side and measured in turn, A B then B A, each block 8
clients x ``--requests`` chat completions of ``--tokens`` tokens (``ignore_eos``); the ratio
is the median of the per-pair ratios of aggregate tokens/s (2 replicas / 1 replica).

Fault phase, on the 2-replica endpoint: 8 clients with a ``--timeout`` per request, one
replica's llama-server killed a second into the run. Every request's latency and outcome is
kept: no request may wait past the timeout (none hangs), each failure must be a clear error
(the endpoint's 503 or the stream's "stopped answering"), and the replica must be back.
The last line is one JSON object.

    .venv/bin/python benchmarks/serve_replicas.py [--rounds 4] [--requests 3] [--tokens 64] [--smoke]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai
import psutil

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import (  # noqa: E402
    free_port,
    measure,
    parse_server_arguments,
    server_arguments,
    start_appliance,
)

from appliance.cli.init import create_home  # noqa: E402
from appliance.home import registry  # noqa: E402
from appliance.serving.guard import read_api_key  # noqa: E402
from appliance.training.basemodel import embedded_gguf  # noqa: E402

CLIENTS = 8
SIDES = {"one_replica_2_threads": (1, 2), "two_replicas_1_thread": (2, 1)}


def llama_servers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "llama-server" in c.name()]


def throughput(sides: dict[str, tuple[str, str]], args: Any) -> dict[str, Any]:
    pairs: list[float] = []
    totals = {side: [0, 0.0] for side in sides}
    for url, key in sides.values():  # warm-up: first-request costs out of the clock
        measure(url, key, "appliance", 2, 1, 8)
    for rnd in range(args.rounds):
        order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
        rates = {}
        for side in order:
            tokens, seconds = measure(*sides[side], "appliance", CLIENTS, args.requests, args.tokens)
            totals[side][0] += tokens
            totals[side][1] += seconds
            rates[side] = tokens / seconds
            print(
                f"round {rnd + 1} {side:24s} {rates[side]:7.1f} tok/s ({tokens} tokens in {seconds:.1f} s)", flush=True
            )
        pairs.append(rates["two_replicas_1_thread"] / rates["one_replica_2_threads"])
    return {
        "tokens_per_s": {side: round(t / s, 1) for side, (t, s) in totals.items()},
        "pair_ratios": [round(r, 3) for r in pairs],
        "ratio": round(statistics.median(pairs), 3),
    }


def killed_replica(url: str, key: str, proc: subprocess.Popen, args: Any) -> dict[str, Any]:
    """8 clients on the 2-replica endpoint; one replica SIGKILLed a second in."""
    outcomes: list[tuple[float, str]] = []
    lock = threading.Lock()

    def client() -> None:
        api = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=args.timeout)
        for _ in range(args.requests * 2):
            sent = time.monotonic()
            try:
                api.chat.completions.create(
                    model="appliance",
                    max_tokens=args.tokens,
                    extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": "Write a long story about a clinic on a busy night."}],
                )
                outcome = "ok"
            except openai.APIStatusError as exc:
                outcome = f"{exc.status_code}: {exc.message}"
            except openai.APITimeoutError:
                outcome = "timeout"
            except openai.APIError as exc:
                outcome = f"error: {exc}"
            with lock:
                outcomes.append((time.monotonic() - sent, outcome))

    victims = llama_servers(proc)
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    victims[0].kill()
    for thread in threads:
        thread.join()
    back = len(llama_servers(proc)) == len(victims)
    latencies = sorted(seconds for seconds, _ in outcomes)
    failures = [o for _, o in outcomes if o != "ok"]
    explained = all(("503" in f and "not answering" in f) or "stopped answering" in f for f in failures)
    return {
        "requests": len(outcomes),
        "failed": len(failures),
        "failures": sorted(set(failures)),
        "failures_explained": explained,
        "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
        "max_latency_s": round(latencies[-1], 2),
        "timeout_s": args.timeout,
        "bounded": "timeout" not in failures and latencies[-1] < args.timeout,
        "replica_back": back,
    }


def main() -> None:
    parser = server_arguments(__doc__.splitlines()[0], 3, "requests per client per block")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, in the fault phase")
    args = parse_server_arguments(parser)
    if not args.smoke:
        args.rounds = min(args.rounds, 4)
        args.tokens = 64 if args.tokens == 128 else args.tokens
    work = Path(tempfile.mkdtemp(prefix="serve-replicas-", dir=os.environ.get("BENCH_TMP")))
    home = create_home(work / "home", "embedded")
    registry.add(home, "base", embedded_gguf(), {"quant": "as shipped"})
    registry.promote(home, "base")
    key = read_api_key(home)
    servers: dict[str, subprocess.Popen] = {}
    urls: dict[str, tuple[str, str]] = {}
    try:
        for side, (replicas, threads) in SIDES.items():
            port = free_port()
            replicated = {"APPLIANCE_SERVE__REPLICAS": str(replicas), "APPLIANCE_SERVE__THREADS": str(threads)}
            servers[side] = start_appliance(home, port, args, work / f"{side}.log", replicated)
            urls[side] = (f"http://127.0.0.1:{port}/v1", key)
        assert len(llama_servers(servers["two_replicas_1_thread"])) == 2, "the 2-replica endpoint runs 2 llama-servers"
        speed = throughput(urls, args)
        os.killpg(servers["one_replica_2_threads"].pid, signal.SIGTERM)  # the fault phase has the cores to itself
        fault = killed_replica(*urls["two_replicas_1_thread"], servers["two_replicas_1_thread"], args)
    finally:
        for proc in servers.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "name": "serve_replicas",
        "model": embedded_gguf().name,
        "clients": CLIENTS,
        "slots": args.slots,
        "tokens": args.tokens,
        **speed,
        "killed_replica": fault,
        "targets": {"bounded": True, "failures_explained": True, "replica_back": True},
        "smoke": args.smoke,
    }
    result["pass"] = fault["bounded"] and fault["failures_explained"] and fault["replica_back"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
