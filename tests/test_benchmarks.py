"""Every benchmark still runs: its ``--smoke`` size (the same code path at a tiny size) in
a subprocess, as a user would start it, exits 0 with its one-JSON-object result line last.

The ratios are not asserted: at the smoke size they measure start-up noise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BENCHMARKS = REPO / "benchmarks"
HELPERS = {"smoke"}  # modules the benchmarks share, not benchmarks
OWN_TEST = {"openai_compat"}  # tests/test_benchmarks_compat.py runs its smoke size and checks more
NEEDS_TINY_BASE = {
    "adapter_routing",
    "export_time",
    "train_throughput",
    "knowledge_recall",
    "grounded_recall",
    "incremental_cost",
    "distributed_train",
}
# Over a minute on two busy cores: several converter subprocesses, each importing torch.
SLOW = {"adapter_routing", "export_time", "knowledge_recall", "grounded_recall", "incremental_cost", "serve_replicas"}
TIMEOUT_S = 600
GRACE_S = 30


def names() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in HELPERS | OWN_TEST)


def params() -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names()]


def run_smoke(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``script --smoke``; past the timeout, SIGINT first so that its ``finally`` blocks
    stop the servers it started in their own sessions (a kill would leave them running)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--smoke"],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{script.name} --smoke did not finish in {TIMEOUT_S} s; stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_every_benchmark_is_found():
    assert set(names()) >= {
        "adapter_routing",
        "export_time",
        "gpu_qlora",
        "ingest_scaling",
        "serve_throughput",
        "train_throughput",
        "index_update",
        "knowledge_recall",
        "grounded_recall",
        "incremental_cost",
        "distributed_train",
        "serve_replicas",
    }


@pytest.mark.parametrize("name", params())
def test_smoke_size_runs_and_ends_with_its_result(name: str, tmp_path: Path, request: pytest.FixtureRequest):
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "BENCH_TMP": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if name in NEEDS_TINY_BASE:  # the session's tiny model, not one built per benchmark
        env["BENCH_TINY_BASE"] = str(request.getfixturevalue("tiny_base"))
    proc = run_smoke(BENCHMARKS / f"{name}.py", env)
    assert proc.returncode == 0, f"{name} --smoke exited {proc.returncode}; stderr ends:\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["name"] == name and "pass" in result, last
