"""Stage 7, quantize: GGUF f16 -> a smaller type with llama.cpp's ``llama_model_quantize``."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from .errors import ExportError
from .events import Emit, StageFinished, StageStarted, ignore

STAGE = "quantize"
FTYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def quantize(src: Path, dst: Path, qtype: str, threads: int | None = None, emit: Emit = ignore) -> Path:
    if dst.exists():
        return dst
    if qtype not in FTYPES:
        raise ExportError(f"unknown quantization {qtype!r} (choose from {', '.join(FTYPES)})")
    import logging

    import llama_cpp

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
    emit(StageFinished(STAGE, summary=f"{dst.name} ({dst.stat().st_size / 1e6:.0f} MB)",
                       seconds=time.monotonic() - started))
    return dst
