"""``appliance export RUN``: merge -> convert -> parity -> quantize (judged) -> record.

Each step is idempotent (complete output is reused), so an interrupted export
resumes where it stopped. The quantized file is only worth registering if
``parity.json`` says it passed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.contract.errors import ExportError, ParityError
from appliance.contract.events import Emit, StageFinished, StageStarted, ignore
from appliance.data.snapshot import load, records
from appliance.export import parity
from appliance.export.convert import convert, convert_lora
from appliance.export.parity import ParityReport
from appliance.export.quantize import Attempt, Judge, choose
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.paths import Home, RunDir
from appliance.runtime.hf import load_tokenizer
from appliance.runtime.llamacpp_child import ChildResult
from appliance.training.merge import merge
from appliance.training.render import Example, RenderError, render

F16_NAME = "model-f16.gguf"
ADAPTER_NAME = "adapter-f16.gguf"


@dataclass
class ExportResult:
    run_id: str
    gguf: Path
    qtype: str
    parity: ParityReport
    seconds: dict[str, float]
    attempts: list[Attempt] = field(default_factory=list)
    adapter: Path | None = None


@dataclass(frozen=True)
class Lora:
    """A GGUF LoRA adapter and the f16 base GGUF it applies to."""

    adapter: Path
    base: Path


def gguf_metadata(base: str, run_id: str, snapshot_id: str | None) -> dict[str, Any]:
    """general.* keys so any served file can be traced back to what made it."""
    return {
        "general.name": f"{base} {run_id}",
        "general.basename": base,
        "general.finetune": run_id,
        "general.base_models": [{"name": base}],
        "general.datasets": [{"name": f"snapshot {snapshot_id}"}] if snapshot_id else [],
        "general.quantized_by": f"appliance {__version__}",
        "general.description": f"base {base}; run {run_id}; snapshot {snapshot_id or '-'}; appliance {__version__}",
        "general.tags": [
            "appliance",
            f"base:{base}",
            f"run:{run_id}",
            f"snapshot:{snapshot_id or '-'}",
            f"appliance:{__version__}",
        ],
    }


def export_model(
    hf_dir: Path,
    out: Path,
    qtype: str,
    metadata: dict[str, Any],
    settings: Settings,
    emit: Emit = ignore,
    answers: Sequence[Example] = (),
    lora: Lora | None = None,
    thresholds: dict[str, dict[str, float]] | None = None,
) -> ExportResult:
    """Convert + parity + quantize for a ready HF checkpoint (a merged run or the base).

    ``qtype`` is ``auto`` (the smallest type that keeps quality), a forced type, or F16.
    ``answers`` are validation examples whose recall a quantized file must keep.
    """
    times: dict[str, float] = {}
    t = time.monotonic()
    f16 = convert(hf_dir, out / F16_NAME, "f16", metadata, emit)
    times["convert"] = time.monotonic() - t
    t = time.monotonic()
    emit(StageStarted(parity.STAGE, description="Checking the GGUF against the trained model"))
    report, probe, reference = _check_f16(hf_dir, f16, answers, lora, settings)
    times["parity"] = time.monotonic() - t
    result = ExportResult(out.name, f16, "F16", report, times)
    if qtype != "F16" and report.passed:  # a broken f16 file is not worth quantizing

        def judge(q: str, path: Path) -> list[parity.Check]:
            return parity.check_quantized(
                reference, probe.ask(path, settings.train.threads, vocab=False), q, probe, thresholds
            )

        _quantize(result, out, qtype, judge, settings.train.threads, emit)
    report.seconds = times["parity"]
    verdict = "passed" if report.passed else "FAILED: " + "; ".join(report.failures())
    emit(StageFinished(parity.STAGE, summary=f"{result.gguf.name}: parity {verdict}", seconds=report.seconds))
    return result


def _check_f16(
    hf_dir: Path, f16: Path, answers: Sequence[Example], lora: Lora | None, settings: Settings
) -> tuple[ParityReport, parity.Probes, ChildResult]:
    """The f16 file (and the GGUF LoRA, if any) against the HF model; the f16 child's
    answers are kept as the reference quantized files are judged against."""
    threads = settings.train.threads
    probe = parity.probes(load_tokenizer(hf_dir), answers)
    reference = probe.ask(f16, threads)
    hf_logits = parity.hf_logits(hf_dir, probe.logit_ids)
    report = ParityReport(parity.check_f16(hf_logits, probe, reference, settings.export.min_logit_cosine))
    report.checks.append(parity.check_llama_server(probe, f16, threads))  # what the endpoint will feed the model
    if lora is not None:
        with_lora = probe.ask(lora.base, threads, lora.adapter, vocab=False, answers=False)
        report.checks += parity.check_adapter(hf_logits, with_lora)
    return report, probe, reference


def _quantize(result: ExportResult, out: Path, qtype: str, judge: Judge, threads: int | None, emit: Emit) -> None:
    result.attempts = choose(result.gguf, out, qtype, judge, threads, emit)
    chosen = result.attempts[-1]
    result.gguf, result.qtype = out / chosen.file, chosen.qtype
    result.parity.checks += chosen.checks
    result.seconds["quantize"] = sum(a.quantize_seconds for a in result.attempts)
    result.seconds["parity"] += sum(a.check_seconds for a in result.attempts)


def export_run(
    home: Home, run_id: str, settings: Settings, qtype: str | None = None, emit: Emit = ignore, adapter: bool = False
) -> ExportResult:
    run = home.run(run_id)
    if not run.root.is_dir():
        raise ExportError(f"{run.root}: no such run; 'appliance train' prints the run id")
    qtype = qtype or settings.export.quant
    base_dir = home.base(settings.base.name)
    t = time.monotonic()
    merge(base_dir, run.adapter, run.merged, emit)
    merge_s = time.monotonic() - t
    train_info = read_json(run.train_json) if run.train_json.exists() else {}
    snapshot_id = train_info.get("snapshot")
    lora, adapter_s = None, {}
    if adapter:
        t = time.monotonic()
        lora = Lora(
            convert_lora(base_dir, run.adapter, run.gguf / ADAPTER_NAME, emit=emit), base_f16(home, settings, emit)
        )
        adapter_s = {"adapter": time.monotonic() - t}
    result = export_model(
        run.merged,
        run.gguf,
        qtype,
        gguf_metadata(settings.base.name, run.id, snapshot_id),
        settings,
        emit,
        validation_answers(home, snapshot_id, run.merged, settings),
        lora,
    )
    result.run_id = run.id
    result.adapter = lora.adapter if lora else None
    result.seconds = {"merge": merge_s, **adapter_s, **result.seconds}
    _record(run, result, qtype)
    return result


def base_f16(home: Home, settings: Settings, emit: Emit = ignore) -> Path:
    """The base's own f16 GGUF (written when the home was created; rebuilt if missing)."""
    name = settings.base.name
    return convert(
        home.base(name), home.top.run("base").gguf / F16_NAME, "f16", gguf_metadata(name, "base", None), emit
    )


def validation_answers(home: Home, snapshot_id: str | None, hf_dir: Path, settings: Settings) -> list[Example]:
    """The snapshot's validation conversations (documents have no answers), rendered as
    in training, at most ``export.recall_examples`` of them; none without a snapshot."""
    if not snapshot_id or settings.export.recall_examples == 0:
        return []
    tokenizer = load_tokenizer(hf_dir)
    examples = []
    chats = [r for r in records(home, load(home, snapshot_id).val) if r.kind == "chat"]
    for record in chats[: settings.export.recall_examples]:
        try:
            examples.append(render(tokenizer, record, settings.data.max_tokens, "truncate"))
        except RenderError:
            continue  # a record training skipped too
    return examples


def _record(run: RunDir, result: ExportResult, requested: str) -> None:
    write_json_atomic(
        run.parity,
        {
            "gguf": result.gguf.name,
            "quant": result.qtype,
            **result.parity.to_dict(),
            "quantization": {"requested": requested, "attempts": [a.to_dict() for a in result.attempts]},
            "adapter": result.adapter.name if result.adapter else None,
        },
    )
    meta = read_json(run.meta) if run.meta.exists() else {}
    meta["export"] = {
        "gguf": result.gguf.name,
        "quant": result.qtype,
        "requested": requested,
        "tried": [a.qtype for a in result.attempts],
        "seconds": result.seconds,
        "parity_passed": result.parity.passed,
        "adapter": result.adapter.name if result.adapter else None,
        "appliance": __version__,
    }
    write_json_atomic(run.meta, meta)


def require_parity(result: ExportResult) -> None:
    if not result.parity.passed:
        raise ParityError(
            f"{result.gguf}: parity check failed ({'; '.join(result.parity.failures())}); the model was not registered"
        )
