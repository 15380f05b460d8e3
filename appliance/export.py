"""``appliance export RUN``: merge -> convert -> quantize -> parity, for one run.

Each step is idempotent (complete output is reused), so an interrupted export
resumes where it stopped. The quantized file is only worth registering if
``parity.json`` says it passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import Settings
from .convert import convert
from .errors import ExportError, ParityError
from .events import Emit, ignore
from .fsutil import read_json, write_json_atomic
from .merge import merge
from .parity import ParityReport, check
from .paths import Home, RunDir
from .quantize import quantize


@dataclass
class ExportResult:
    run_id: str
    gguf: Path
    qtype: str
    parity: ParityReport
    seconds: dict[str, float]


def gguf_metadata(base: str, run_id: str, snapshot_id: str | None) -> dict[str, Any]:
    """general.* keys so any served file can be traced back to what made it."""
    return {
        "general.name": f"appliance {run_id}",
        "general.finetune": run_id,
        "general.description": f"base {base}; run {run_id}; snapshot {snapshot_id or '-'}; appliance {__version__}",
        "general.tags": ["appliance", f"base:{base}", f"run:{run_id}", f"snapshot:{snapshot_id or '-'}",
                         f"appliance:{__version__}"],
    }


def export_model(hf_dir: Path, out: Path, qtype: str, metadata: dict[str, Any], settings: Settings,
                 emit: Emit = ignore) -> ExportResult:
    """Convert + quantize + parity for a ready HF checkpoint (a merged run or the base)."""
    times: dict[str, float] = {}
    t = time.monotonic()
    f16 = convert(hf_dir, out / "model-f16.gguf", "f16", metadata, emit)
    times["convert"] = time.monotonic() - t
    if qtype == "F16":
        final = f16
    else:
        t = time.monotonic()
        final = quantize(f16, out / f"model-{qtype}.gguf", qtype, settings.train.threads, emit)
        times["quantize"] = time.monotonic() - t
    report = check(hf_dir, f16, final if final != f16 else None, qtype if final != f16 else None,
                   settings.export.min_logit_cosine, emit)
    times["parity"] = report.seconds
    return ExportResult(out.name, final, qtype, report, times)


def export_run(home: Home, run_id: str, settings: Settings, qtype: str | None = None,
               emit: Emit = ignore) -> ExportResult:
    run = home.run(run_id)
    if not run.root.is_dir():
        raise ExportError(f"{run.root}: no such run; 'appliance train' prints the run id")
    qtype = qtype or settings.export.quant
    base_dir = home.base(settings.base.name)
    t = time.monotonic()
    merge(base_dir, run.adapter, run.merged, emit)
    merge_s = time.monotonic() - t
    train_info = read_json(run.root / "train.json") if (run.root / "train.json").exists() else {}
    result = export_model(run.merged, run.gguf, qtype,
                          gguf_metadata(settings.base.name, run.id, train_info.get("snapshot")), settings, emit)
    result.run_id = run.id
    result.seconds = {"merge": merge_s, **result.seconds}
    _record(run, result, settings)
    return result


def _record(run: RunDir, result: ExportResult, settings: Settings) -> None:
    write_json_atomic(run.parity, {"gguf": result.gguf.name, "quant": result.qtype, **result.parity.to_dict()})
    meta = read_json(run.meta) if run.meta.exists() else {}
    meta["export"] = {"gguf": result.gguf.name, "quant": result.qtype, "seconds": result.seconds,
                      "parity_passed": result.parity.passed, "appliance": __version__}
    write_json_atomic(run.meta, meta)


def require_parity(result: ExportResult) -> None:
    if not result.parity.passed:
        raise ParityError(f"{result.gguf}: parity check failed ({'; '.join(result.parity.failures())}); "
                          "the model was not registered")
