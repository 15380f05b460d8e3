"""One job through the stages: snapshot -> train -> export -> gate -> promote.

:func:`run_job` starts (or resumes) a job after its last complete stage, as the
journal says. Every stage is idempotent: it reuses complete outputs (training
resumes from its last checkpoint under the run id the journal remembered before
training began; export reuses merged/converted files; promotion checks the
registry's history for this job), so redoing an interrupted stage is always safe,
and a stage is marked complete only once its outputs are on disk and fsynced.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from appliance.home import audit, registry
from appliance.home.config import Settings
from appliance.contract.errors import ApplianceError, DataError
from appliance.contract.events import Emit, Event, Message, Progress, ignore
from appliance.home.fsutil import read_json, sha256_file
from appliance.home.journal import Job, Journal, iter_stages
from appliance.home.paths import Home

log = logging.getLogger("appliance.engine.pipeline")


class DiskError(ApplianceError):
    title = "Disk space"


class Stopped(Exception):
    """The daemon was asked to stop; the job resumes from its last complete stage next time."""


@dataclass
class Context:
    home: Home
    journal: Journal
    settings: Settings
    emit: Emit = ignore
    stop: threading.Event = field(default_factory=threading.Event)


def check_disk(home: Home, settings: Settings, stage: str) -> None:
    free = shutil.disk_usage(home.root).free
    need = settings.disk.min_free_gb * 1e9
    if free < need:
        raise DiskError(f"{home.root}: only {free / 1e9:.1f} GB free, the {stage} stage needs at least "
                        f"{settings.disk.min_free_gb:g} GB (disk.min_free_gb); free some space or lower the "
                        f"threshold; the job resumes where it stopped")


def run_job(ctx: Context, job: Job) -> Job:
    """Run ``job`` to its end (done, refused or failed); raise Stopped or DiskError to pause it."""
    ctx = replace(ctx, home=ctx.home.top.scoped(job.collection))  # the job's collection: its data, runs, models
    for stage in iter_stages(job.stage):
        if ctx.stop.is_set():
            raise Stopped(stage)
        check_disk(ctx.home, ctx.settings, stage)
        if stage == "promote" and _waits_for_review(ctx, job):
            return _open_review(ctx, job)  # [gate] promotion = "review": the votes finish the job
        ctx.journal.stage_started(job.id, stage)
        emit = _job_emit(ctx, job.id, stage)
        try:
            fields = STAGES[stage](ctx, ctx.journal.get(job.id), emit)
        except (Stopped, DiskError):
            raise
        except ApplianceError as exc:
            return _fail(ctx, job, stage, str(exc))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # the disk filled up mid-stage: pause, do not fail
                raise DiskError(f"{ctx.home.root}: the disk filled up during the {stage} stage; free some "
                                "space; the job resumes where it stopped") from None
            log.exception("job %s: %s failed", job.id, stage)
            return _fail(ctx, job, stage, f"unexpected error: {exc}")
        except Exception as exc:  # a bug must not crash-loop the daemon on the same job
            log.exception("job %s: %s failed", job.id, stage)
            return _fail(ctx, job, stage, f"unexpected error: {type(exc).__name__}: {exc}")
        job = ctx.journal.stage_complete(job.id, stage, **fields)
        if stage == "gate" and not (job.result or {}).get("passed"):
            audit.append(ctx.home, "job_refused", job=job.id, run=job.run_id, failed=job.result.get("failed"))
            if job.kind == "forget" and job.document:
                from appliance.engine.forget import fall_back

                fall_back(ctx.home, job.document, job.id)  # the forgotten document must leave the served model
            return ctx.journal.finish(job.id, "refused", job.result.get("verdict"))
    return ctx.journal.finish(job.id, "done")


def _waits_for_review(ctx: Context, job: Job) -> bool:
    from appliance.engine.review import waits

    return waits(ctx.home, ctx.settings, job)


def _open_review(ctx: Context, job: Job) -> Job:
    from appliance.engine.review import open_review

    try:
        return open_review(ctx, job)
    except ApplianceError as exc:
        return _fail(ctx, job, "review", str(exc))


def _fail(ctx: Context, job: Job, stage: str, error: str) -> Job:
    ctx.emit(Message(stage, f"job {job.id} failed at {stage}: {error}", level="error"))
    audit.append(ctx.home, "job_failed", job=job.id, stage=stage, kind=job.kind)
    return ctx.journal.finish(job.id, "failed", f"{stage}: {error}")


def _job_emit(ctx: Context, job_id: int, stage: str) -> Emit:
    """Forward events, keep the journal's progress current, and stop at the next step when asked."""
    def emit(event: Event) -> None:
        ctx.emit(event)
        if isinstance(event, Progress):
            ctx.journal.progress(job_id, {"stage": stage, "completed": event.completed, "total": event.total,
                                          "metrics": event.metrics})
            if ctx.stop.is_set() and stage == "train":
                raise Stopped(stage)  # training resumes from its last checkpoint
    return emit


# --- stages ---------------------------------------------------------------------------------------


def stage_snapshot(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    from appliance.data.snapshot import cut_id, stats

    snapshot_id = cut_id(ctx.home, ctx.settings.data.val_fraction)  # no usable data: DataError fails the job
    info = stats(ctx.home, snapshot_id)
    audit.append(ctx.home, "snapshot", job=job.id, snapshot=snapshot_id, records=info["records"],
                 documents=[s["sha256"] for s in info["by_source"]])
    return {"snapshot": snapshot_id}


def stage_train(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    from appliance.data import snapshot as snapshots
    from appliance.training.train import TrainInterrupted, train

    run_id = job.run_id
    if not run_id:  # remembered before any work, so a resumed job continues the same run
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}-j{job.id}"
        ctx.journal.remember(job.id, run_id=run_id)
    snap = snapshots.load(ctx.home, job.snapshot or "")
    try:
        result = train(ctx.home, snap, ctx.settings, run_id=run_id, emit=emit, stop=ctx.stop.is_set)
    except TrainInterrupted:
        raise Stopped("train") from None  # the checkpoint just written is where it resumes
    audit.append(ctx.home, "train", job=job.id, run=run_id, snapshot=snap.id, steps=result.steps,
                 adapter_sha256=adapter_hash(ctx.home, run_id))
    return {"run_id": run_id}


def stage_export(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    from appliance.export.run import export_run

    from appliance.home.catalog import adapter_mode

    run = ctx.home.run(job.run_id or "")
    adapter = adapter_mode(ctx.home, ctx.settings)  # a collection's adapter, served on the one base model
    done = run.parity.exists() and (run.gguf / read_json(run.parity)["gguf"]).exists()
    if done and adapter:
        done = bool(read_json(run.parity).get("adapter")) and (run.gguf / read_json(run.parity)["adapter"]).exists()
    if not done:
        export_run(ctx.home, run.id, ctx.settings, emit=emit, adapter=adapter)  # a failed parity is the gate's
    return {}


def stage_gate(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    from appliance.quality.gate import evaluate

    report = evaluate(ctx.home, job.run_id or "", ctx.settings, kind=job.kind, emit=emit)
    data = report.to_dict()
    audit.append(ctx.home, "gate", job=job.id, run=job.run_id, passed=report.passed, failed=data["failed"],
                 candidate_sha256=data["candidate"]["sha256"], current=data["current"]["version"])
    if not report.passed:
        clean_intermediates(ctx.home, job.run_id or "")
    return {"result": {"passed": report.passed, "verdict": report.verdict(), "failed": data["failed"]}}


def stage_promote(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    home, run_id = ctx.home, job.run_id or ""
    record = register_candidate(ctx, job)
    version = record["version"]
    if registry.lineage(home, version) is None:
        registry.write_lineage(home, version, build_lineage(ctx, ctx.journal.get(job.id), record))
    if not any(e.get("job") == job.id for e in registry._history(home)):
        registry.promote(home, version, job=job.id)
    if not audit.find(home, "promote", job=job.id):
        audit.append(home, "promote", job=job.id, version=version, sha256=record["sha256"], run=run_id)
    if job.kind == "forget" and job.document:
        from appliance.engine.forget import remove_runs, retire_versions_with

        retire_versions_with(home, job.document, job.id)
        remove_runs(home, job.document)  # runs that were in flight when the document was forgotten
    clean_intermediates(home, run_id)
    for gone in registry.prune(home, ctx.settings.daemon.keep_versions):
        audit.append(home, "prune", version=gone)
    return {"version": version}


def register_candidate(ctx: Context, job: Job) -> dict[str, Any]:
    """Register the gated file as a new (not current) version, once; remember it in the journal."""
    from appliance.quality.gate import candidate_gguf
    from appliance.runtime.llamacpp_child import problem

    from appliance.home.catalog import adapter_mode

    home, run_id = ctx.home, job.run_id or ""
    existing = [v for v in registry.versions(home) if v.get("run") == run_id]
    if existing:
        record = existing[-1]
    else:
        gguf = candidate_gguf(home, run_id)
        if gguf is None:
            raise ApplianceError(f"run {run_id}: the gated file is missing; cannot promote it")
        parity = read_json(home.run(run_id).parity)
        info = read_json(home.run(run_id).root / "train.json")
        fields = {"run": run_id, "snapshot": job.snapshot, "quant": parity.get("quant"), "base": ctx.settings.base.name,
                  "best_val_loss": info.get("best_val_loss"), "parity": {"passed": parity.get("passed")},
                  "job": job.id, "kind": job.kind, "collection": home.collection, "registered_at": time.time()}
        if adapter_mode(home, ctx.settings):
            record = register_adapter(home, home.run(run_id).gguf / parity["adapter"], fields)
        else:
            record = registry.add(home, registry.next_version(home), gguf, fields, check=problem)
    ctx.journal.remember(job.id, version=record["version"])
    return record


def register_adapter(home: Home, adapter: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A collection's version as its GGUF LoRA adapter, tied to the base version it applies to."""
    from appliance.home.catalog import adapter_problem, base_model

    base_version, base_file = base_model(home)
    base_record = registry.get(home.top, base_version)
    fields = {**fields, "quant": "adapter", "base_version": base_version, "base_sha256": base_record["sha256"]}
    return registry.add(home, registry.next_version(home), adapter, fields, name=registry.ADAPTER_FILE,
                        check=lambda path: adapter_problem(base_file, path))


STAGES: dict[str, Callable[[Context, Job, Emit], dict[str, Any]]] = {
    "snapshot": stage_snapshot, "train": stage_train, "export": stage_export, "gate": stage_gate,
    "promote": stage_promote}


# --- helpers --------------------------------------------------------------------------------------


def clean_intermediates(home: Home, run_id: str) -> None:
    """Checkpoints, merged weights and the f16 GGUF go once a run is gated; the chosen
    quantized file stays (hard-linked into models/ when registered, so no extra space)."""
    run = home.run(run_id)
    for folder in (run.checkpoints, run.merged):
        shutil.rmtree(folder, ignore_errors=True)
    for partial in run.root.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    parity = read_json(run.parity) if run.parity.exists() else {}
    keep = {parity.get("gguf"), parity.get("adapter")}  # the served file (and a collection's adapter)
    for path in run.gguf.glob("*.gguf") if run.gguf.is_dir() else []:
        if path.name not in keep:
            path.unlink(missing_ok=True)


def adapter_hash(home: Home, run_id: str) -> str | None:
    path = home.run(run_id).adapter / "adapter_model.safetensors"
    return sha256_file(path) if path.exists() else None


def base_hash(home: Home, settings: Settings, journal: Journal) -> str:
    """sha256 over the base's weight files (cached in the journal by name, size and mtime)."""
    folder = home.base(settings.base.name)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf"))
    key = "base:" + hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                         for p in files]).encode()).hexdigest()[:16]
    cached = journal.get_meta(key)
    if cached:
        return cached
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    journal.set_meta(key, digest.hexdigest())
    return digest.hexdigest()


def build_lineage(ctx: Context, job: Job, record: dict[str, Any]) -> dict[str, Any]:
    """Everything that made this version, taken from the journal and the stages' outputs."""
    from appliance.data.snapshot import stats

    home, run_id = ctx.home, job.run_id or ""
    info = stats(home, job.snapshot or "")
    train_info = read_json(home.run(run_id).root / "train.json")
    eval_report = read_json(home.run(run_id).eval) if home.run(run_id).eval.exists() else None
    times = {t["stage"] + ":" + t["state"]: t["at"] for t in ctx.journal.transitions(job.id) if t["stage"]}
    return {
        "version": record["version"], "job": job.id, "kind": job.kind, "run": run_id, "snapshot": job.snapshot,
        "collection": home.collection, "served_as": "adapter" if record.get("file") == registry.ADAPTER_FILE
        else "merged", "base_version": record.get("base_version"),
        "documents": [{"sha256": s["sha256"], "path": s["path"], "records": s.get("records")}
                      for s in info["by_source"]],
        "records": info["records"], "base": ctx.settings.base.name,
        "base_sha256": base_hash(home, ctx.settings, ctx.journal),
        "training": {"settings": train_info.get("settings"), "steps": train_info.get("steps"),
                     "best_val_loss": train_info.get("best_val_loss"), "seconds": train_info.get("seconds"),
                     "method": train_info.get("method"), "method_reason": train_info.get("method_reason")},
        "adapter_sha256": adapter_hash(home, run_id), "gguf_sha256": record["sha256"], "quant": record.get("quant"),
        "gate": eval_report, "audit_head": audit.head(home), "times": times, "created": job.created,
        "promoted_at": time.time(), "review": _review_summary(home, run_id),
    }


def _review_summary(home: Home, run_id: str) -> dict[str, Any] | None:
    from appliance.engine.review import summary

    return summary(home, run_id)


def version_documents(home: Home, version: str) -> set[str]:
    """sha256 of every source document a version was trained on (its lineage, else its snapshot)."""
    from appliance.data.snapshot import stats

    data = registry.lineage(home, version)
    if data is not None:
        return {d["sha256"] for d in data.get("documents", [])}
    snapshot_id = registry.get(home, version).get("snapshot")
    if not snapshot_id:
        return set()
    try:
        return {s["sha256"] for s in stats(home, snapshot_id)["by_source"]}
    except (DataError, OSError):
        return set()


def runs_with(home: Home, snapshot_docs: Callable[[str], set[str]], document: str) -> list[Path]:
    """Run folders whose snapshot included ``document``."""
    found = []
    for folder in sorted(home.runs.iterdir()) if home.runs.is_dir() else []:
        train_json = folder / "train.json"
        snapshot_id = read_json(train_json)["snapshot"] if train_json.exists() else None
        if snapshot_id is None:
            from appliance.training.train import run_snapshot

            snapshot_id = run_snapshot(home.run(folder.name))
        if snapshot_id and document in snapshot_docs(snapshot_id):
            found.append(folder)
    return found
