"""The parent side of llamacpp_worker: run a request in a child process, read the answer."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ChildResult:
    ok: bool
    error: str = ""
    tokens: list[list[int]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    logits: list[np.ndarray] = field(default_factory=list)


def run(model: Path, tokenize: list[str] | None = None, logits: list[list[int]] | None = None,
        threads: int | None = None, timeout: float = 600) -> ChildResult:
    with tempfile.TemporaryDirectory(prefix="appliance-llama-") as tmp:
        request: dict[str, Any] = {"model": str(model), "tokenize": tokenize or [], "logits": logits or [],
                                   "threads": threads}
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request))
        try:
            proc = subprocess.run([sys.executable, "-m", "appliance.llamacpp_worker", str(req), tmp],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return ChildResult(False, f"llama.cpp did not finish within {timeout:.0f} s")
        result_file = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            return ChildResult(False, f"llama.cpp failed to load or run {model.name}: {tail[-300:]}")
        data = json.loads(result_file.read_text())
        arrays = [np.load(Path(tmp) / f"logits_{i}.npy") for i in range(len(logits or []))]
        return ChildResult(True, tokens=data["tokens"], metadata=data["metadata"], logits=arrays)
