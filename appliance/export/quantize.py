"""Stage 7, quantize: GGUF f16 -> a smaller type with llama.cpp's ``llama_model_quantize``.

Quality decides the type, not habit (gguf-conversion.md, "Quantizing"): by default the
smallest type is tried first and the next larger one follows while the quantized file
misses its thresholds against the f16 file. Every try is recorded with its reason.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from appliance.contract.errors import ExportError
from appliance.contract.events import Emit, Message, StageFinished, StageStarted, ignore

STAGE = "quantize"
FTYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}
LADDER = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")  # smallest first
AUTO = "auto"


@dataclass
class Attempt:
    """One quantization tried: its checks against the f16 file and why it was kept or not."""

    qtype: str
    file: str
    passed: bool
    reason: str
    bytes: int
    quantize_seconds: float
    check_seconds: float
    checks: list[Any] = field(default_factory=list)  # parity.Check

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checks": [asdict(c) for c in self.checks]}


# judge(qtype, quantized file) -> that file's checks against the f16 file
Judge = Callable[[str, Path], list[Any]]


def quantize(src: Path, dst: Path, qtype: str, threads: int | None = None, emit: Emit = ignore) -> Path:
    if dst.exists():
        return dst
    if qtype not in FTYPES:
        raise ExportError(f"unknown quantization {qtype!r} (choose from {', '.join(FTYPES)})")
    # llama.cpp logs every tensor it quantizes; only errors are worth a person's attention.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    started = time.monotonic()
    emit(StageStarted(STAGE, description=f"Quantizing to {qtype}"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = threads or len(os.sched_getaffinity(0))
    partial = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise ExportError(f"{src}: llama.cpp could not quantize to {qtype} (code {rc})")
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    partial.replace(dst)
    emit(
        StageFinished(
            STAGE, summary=f"{dst.name} ({dst.stat().st_size / 1e6:.0f} MB)", seconds=time.monotonic() - started
        )
    )
    return dst


def ladder(quant: str) -> tuple[str, ...]:
    """The types to try, in order: the whole ladder for ``auto``, else the forced one."""
    if quant == AUTO:
        return LADDER
    if quant not in FTYPES or quant == "F16":
        raise ExportError(f"unknown quantization {quant!r} (choose from auto, {', '.join(LADDER)})")
    return (quant,)


def choose(
    f16: Path, out_dir: Path, quant: str, judge: Judge, threads: int | None = None, emit: Emit = ignore
) -> list[Attempt]:
    """Quantize and judge each type in turn until one passes; the last attempt is the
    result (passed or not). Files of rejected types are removed, except the last."""
    tries = ladder(quant)
    attempts: list[Attempt] = []
    for i, qtype in enumerate(tries):
        path = out_dir / f"model-{qtype}.gguf"
        started = time.monotonic()
        quantize(f16, path, qtype, threads, emit)
        quantized = time.monotonic()
        checks = judge(qtype, path)
        failed = [c for c in checks if not c.passed]
        attempts.append(
            Attempt(
                qtype,
                path.name,
                not failed,
                _why(failed),
                path.stat().st_size,
                round(quantized - started, 3),
                round(time.monotonic() - quantized, 3),
                checks,
            )
        )
        if not failed:
            break
        if i + 1 < len(tries):
            path.unlink()
            emit(Message(STAGE, f"{qtype} missed its thresholds ({attempts[-1].reason}); trying {tries[i + 1]}"))
    return attempts


def _why(failed: list[Any]) -> str:
    if not failed:
        return "within every threshold against the f16 file"
    return "; ".join(f"{c.name} {c.value} (limit {c.threshold})" for c in failed)
