"""The OpenAI-compatibility benchmark runs end to end (``--smoke``): both servers start, every
check gives a verdict, the servers stop, and the last line is its JSON result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from appliance.contract.errors import ServeError
from appliance.runtime.llama_server import binary

pytestmark = pytest.mark.slow  # two servers on the embedded 135M model: over a minute on 2 cores


def test_smoke_run_reports_every_feature() -> None:
    try:
        binary()
    except ServeError as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "openai_compat.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["name"] == "openai_compat" and isinstance(result["pass"], bool)
    features = result["features"]
    assert len(features) >= 25 and "default_not_capped_256" not in features  # --smoke leaves the slow one out
    # one printed line per feature, and the plainest request works on both sides
    assert {line.split()[0] for line in lines[:-1]} >= set(features)
    assert features["chat_plain"] == [True, True]
    assert result["both"] <= result["native_passed"]
