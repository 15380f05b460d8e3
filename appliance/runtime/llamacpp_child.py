"""The parent side of llamacpp_worker: run a request in a child process, read the answer.

Nothing here opens a GGUF with llama.cpp or gguf-py in this process. The one check
made here reads 24 header bytes with ``struct``, so that absurd counts are refused
before a child spends minutes or gigabytes on them.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The worker's exit status for a file llama.cpp or gguf-py refuses (anything else is a crash).
REFUSED = 2

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
# Smallest possible encodings: a tensor info is a name length (8), a name (>= 1),
# n_dims (4), one dim (8), a type (4) and an offset (8); a key/value is a key length
# (8), a key (>= 1), a type (4) and a value (>= 1).
MIN_TENSOR_INFO_BYTES = 33
MIN_KV_BYTES = 14


@dataclass
class ChildResult:
    ok: bool
    error: str = ""
    tokens: list[list[int]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    logits: list[np.ndarray] = field(default_factory=list)
    argmax: list[list[int]] = field(default_factory=list)
    generated: list[list[int]] = field(default_factory=list)
    nll: list[list[float]] = field(default_factory=list)
    chat: list[list[int]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    structure: dict[str, int] = field(default_factory=dict)


def header_problem(path: Path) -> str | None:
    """Why the GGUF header cannot be right, or None. Reads 24 bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if len(head) < 24:
        return f"{size} bytes is too short for a GGUF header"
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
    if magic != GGUF_MAGIC:
        return f"bad magic {magic!r} (a GGUF file starts with b'GGUF')"
    if version not in GGUF_VERSIONS:
        return f"unsupported GGUF version {version}"
    if n_tensors * MIN_TENSOR_INFO_BYTES > size:
        return f"header claims {n_tensors} tensors, more than a {size}-byte file can describe"
    if n_kv * MIN_KV_BYTES > size:
        return f"header claims {n_kv} metadata keys, more than a {size}-byte file can hold"
    return None


def problem(path: Path, timeout: float = 300) -> str | None:
    """Why this GGUF must not be served, or None: header, gguf-py's reading and a
    llama.cpp load, the last two in a child process."""
    result = run(path, validate=True, timeout=timeout)
    return None if result.ok else result.error


def adapter_problem(base: Path, adapter: Path) -> str | None:
    """Why llama.cpp cannot apply the LoRA ``adapter`` to ``base`` (a load in a child process), or None."""
    if reason := header_problem(adapter):
        return f"{adapter.name}: {reason}"
    result = run(base, tokenize=["x"], lora=adapter, argmax=[[1, 2]], timeout=300)
    return None if result.ok else result.error


def run(
    model: Path,
    tokenize: list[str] | None = None,
    logits: list[list[int]] | None = None,
    argmax: list[list[int]] | None = None,
    generate: list[tuple[list[int], int]] | None = None,
    chat: list[list[dict[str, str]]] | None = None,
    lora: Path | None = None,
    threads: int | None = None,
    validate: bool = False,
    timeout: float = 600,
    nll: list[tuple[list[int], list[int]]] | None = None,
    reply: list[tuple[list[dict[str, str]], int]] | None = None,
) -> ChildResult:
    """Load ``model`` in a child process and ask it the given questions; with ``validate``
    gguf-py reads the whole file there first (seconds for a 100k-token vocabulary)."""
    if reason := header_problem(model):
        return ChildResult(False, f"{model.name}: {reason}")
    request: dict[str, Any] = {
        "model": str(model),
        "lora": str(lora) if lora else None,
        "threads": threads,
        "validate": validate,
        "vocab_only": not (logits or argmax or generate or validate or nll or reply),  # a validating load reads tensors
        "tokenize": tokenize or [],
        "logits": logits or [],
        "argmax": argmax or [],
        "generate": generate or [],
        "chat": chat or [],
        "nll": nll or [],
        "reply": reply or [],
    }
    with tempfile.TemporaryDirectory(prefix="appliance-llama-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "appliance.runtime.llamacpp_worker", str(req), tmp],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return ChildResult(False, f"{model.name}: llama.cpp did not finish within {timeout:.0f} s")
        result_file = Path(tmp) / "result.json"
        if proc.returncode == REFUSED and result_file.exists():
            return ChildResult(False, f"{model.name}: {json.loads(result_file.read_text())['error'][:400]}")
        if proc.returncode != 0 or not result_file.exists():
            return ChildResult(False, f"{model.name}: the child process loading it {_death(proc)}")
        data = json.loads(result_file.read_text())
        arrays = [np.load(Path(tmp) / f"logits_{i}.npy") for i in range(len(logits or []))]
        return ChildResult(
            True,
            tokens=data["tokens"],
            metadata=data["metadata"],
            logits=arrays,
            argmax=data["argmax"],
            generated=data["generated"],
            chat=data["chat"],
            structure=data["structure"],
            nll=data.get("nll", []),
            replies=data.get("replies", []),
        )


def _death(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode < 0:
        return f"crashed ({signal.Signals(-proc.returncode).name})"
    lines = proc.stderr.strip().splitlines()
    return f"failed (exit status {proc.returncode}: {lines[-1][-300:] if lines else 'no output'})"
