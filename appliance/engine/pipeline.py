"""One job through the stages: snapshot -> study -> train -> export -> gate -> promote.

:func:`run_job` starts (or resumes) a job after its last complete stage, as the
journal says. Every stage is idempotent: it reuses complete outputs (training
resumes from its last checkpoint under the run id the journal remembered before
training began; export reuses merged/converted files; promotion checks the
registry's history for this job), so redoing an interrupted stage is always safe,
and a stage is marked complete only once its outputs are on disk and fsynced.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.contract.errors import ApplianceError
from appliance.contract.events import Emit, Event, Message, Progress, ignore
from appliance.data import snapshot as snapshots
from appliance.data.study.stage import study
from appliance.engine import review

# register_adapter is named here for LocalEngine.export
from appliance.engine.candidates import clean_intermediates, register_adapter, register_candidate  # noqa: F401
from appliance.engine.forget import fall_back, remove_runs, retire_versions_with
from appliance.engine.lineage import adapter_hash, build_lineage
from appliance.home import audit, registry
from appliance.home.catalog import adapter_mode
from appliance.home.config import Settings
from appliance.home.fsutil import read_json
from appliance.home.journal import Job, Journal, iter_stages
from appliance.home.paths import Home
from appliance.quality.gate import evaluate

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
        raise DiskError(
            f"{home.root}: only {free / 1e9:.1f} GB free, the {stage} stage needs at least "
            f"{settings.disk.min_free_gb:g} GB (disk.min_free_gb); free some space or lower the "
            f"threshold; the job resumes where it stopped"
        )


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
                raise DiskError(
                    f"{ctx.home.root}: the disk filled up during the {stage} stage; free some "
                    "space; the job resumes where it stopped"
                ) from None
            log.exception("job %s: %s failed", job.id, stage)
            return _fail(ctx, job, stage, f"unexpected error: {exc}")
        except Exception as exc:  # a bug must not crash-loop the daemon on the same job
            log.exception("job %s: %s failed", job.id, stage)
            return _fail(ctx, job, stage, f"unexpected error: {type(exc).__name__}: {exc}")
        job = ctx.journal.stage_complete(job.id, stage, **fields)
        result = job.result or {}
        if stage == "gate" and not result.get("passed"):
            audit.append(ctx.home, "job_refused", job=job.id, run=job.run_id, failed=result.get("failed"))
            if job.kind == "forget" and job.document:
                fall_back(ctx.home, job.document, job.id)  # the forgotten document must leave the served model
            return ctx.journal.finish(job.id, "refused", result.get("verdict"))
    return ctx.journal.finish(job.id, "done")


def _waits_for_review(ctx: Context, job: Job) -> bool:
    return review.waits(ctx.home, ctx.settings, job)


def _open_review(ctx: Context, job: Job) -> Job:
    try:
        return review.open_review(ctx.home, ctx.settings, ctx.journal, job)
    except ApplianceError as exc:
        return _fail(ctx, job, "review", str(exc))


def vote(
    home: Home,
    settings: Settings,
    run_id: str,
    approve: bool,
    comment: str = "",
    preferences: dict[int, str] | None = None,
) -> dict[str, Any]:
    """A reviewer's vote; the approval that completes a review promotes its candidate here,
    through the promote stage (registry swap, lineage, audit, pruning)."""

    def promote(data: dict[str, Any]) -> None:
        with Journal(home.jobs_db) as journal:
            job = run_job(Context(home, journal, settings), journal.get(data["job"]))
        if job.state != "done":
            raise review.ReviewError(f"run {data['run']}: approved, but the promotion failed: {job.error}")

    return review.record_vote(home, settings, run_id, approve, comment, preferences, on_approved=promote)


def _fail(ctx: Context, job: Job, stage: str, error: str) -> Job:
    ctx.emit(Message(stage, f"job {job.id} failed at {stage}: {error}", level="error"))
    audit.append(ctx.home, "job_failed", job=job.id, stage=stage, kind=job.kind)
    return ctx.journal.finish(job.id, "failed", f"{stage}: {error}")


def _job_emit(ctx: Context, job_id: int, stage: str) -> Emit:
    """Forward events, keep the journal's progress current, and stop at the next step when asked."""

    def emit(event: Event) -> None:
        ctx.emit(event)
        if isinstance(event, Progress):
            ctx.journal.progress(
                job_id, {"stage": stage, "completed": event.completed, "total": event.total, "metrics": event.metrics}
            )
            if ctx.stop.is_set() and stage == "train":
                raise Stopped(stage)  # training resumes from its last checkpoint

    return emit


# --- stages ---------------------------------------------------------------------------------------


def stage_snapshot(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    snapshot_id = snapshots.cut_id(ctx.home, ctx.settings.data.val_fraction)  # no usable data: DataError fails it
    info = snapshots.stats(ctx.home, snapshot_id)
    audit.append(
        ctx.home,
        "snapshot",
        job=job.id,
        snapshot=snapshot_id,
        records=info["records"],
        documents=[s["sha256"] for s in info["by_source"]],
    )
    return {"snapshot": snapshot_id}


def stage_study(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    """Study material for the snapshot's documents, cached per document (training reads the cache)."""
    material = study(ctx.home, job.snapshot or "", ctx.settings, emit)
    counts = material.counts()
    if counts["documents"]:
        audit.append(ctx.home, "study", job=job.id, snapshot=job.snapshot, generated=material.generated, **counts)
    return {}


def stage_train(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    from appliance.training.launch import train_run  # torch: loaded when a run trains
    from appliance.training.train import TrainInterrupted

    run_id = job.run_id
    if not run_id:  # remembered before any work, so a resumed job continues the same run
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}-j{job.id}"
        ctx.journal.remember(job.id, run_id=run_id)
    snap = snapshots.load(ctx.home, job.snapshot or "")
    try:
        result = train_run(ctx.home, snap, ctx.settings, run_id, job.kind, emit, ctx.stop.is_set)
    except TrainInterrupted:
        raise Stopped("train") from None  # the checkpoint just written is where it resumes
    audit.append(
        ctx.home,
        "train",
        job=job.id,
        run=run_id,
        snapshot=snap.id,
        steps=result.steps,
        adapter_sha256=adapter_hash(ctx.home, run_id),
    )
    return {"run_id": run_id}


def stage_export(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    from appliance.export.run import export_run  # the exporter's heavy libraries load when a run exports

    run = ctx.home.run(job.run_id or "")
    adapter = adapter_mode(ctx.home, ctx.settings)  # a collection's adapter, served on the one base model
    done = run.parity.exists() and (run.gguf / read_json(run.parity)["gguf"]).exists()
    if done and adapter:
        done = bool(read_json(run.parity).get("adapter")) and (run.gguf / read_json(run.parity)["adapter"]).exists()
    if not done:
        export_run(ctx.home, run.id, ctx.settings, emit=emit, adapter=adapter)  # a failed parity is the gate's
    return {}


def stage_gate(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    report = evaluate(ctx.home, job.run_id or "", ctx.settings, kind=job.kind, emit=emit)
    data = report.to_dict()
    audit.append(
        ctx.home,
        "gate",
        job=job.id,
        run=job.run_id,
        passed=report.passed,
        failed=data["failed"],
        candidate_sha256=data["candidate"]["sha256"],
        current=data["current"]["version"],
    )
    if not report.passed:
        clean_intermediates(ctx.home, job.run_id or "")
        _consolidate_after_refusal(ctx, job, emit)
    return {"result": {"passed": report.passed, "verdict": report.verdict(), "failed": data["failed"]}}


def _consolidate_after_refusal(ctx: Context, job: Job, emit: Emit) -> None:
    """An incremental candidate the gate refused is followed by one full run from the base."""
    train_json = ctx.home.run(job.run_id or "").train_json
    mode = (read_json(train_json).get("incremental") or {}).get("mode") if train_json.exists() else None
    if mode != "incremental":
        return
    queued, _ = ctx.journal.enqueue(
        "consolidate", reason=f"the gate refused incremental run {job.run_id}", collection=job.collection
    )
    emit(Message("gate", f"the incremental run was refused; queued job {queued.id}: a full run from the base"))


def stage_promote(ctx: Context, job: Job, emit: Emit) -> dict[str, Any]:
    home, run_id = ctx.home, job.run_id or ""
    record = register_candidate(home, ctx.settings, ctx.journal, job)
    version = record["version"]
    if registry.lineage(home, version) is None:
        registry.write_lineage(
            home,
            version,
            build_lineage(
                home, ctx.settings, ctx.journal, ctx.journal.get(job.id), record, review.summary(home, run_id)
            ),
        )
    if not any(e.get("job") == job.id for e in registry.history(home)):
        registry.promote(home, version, job=job.id)
    if not audit.find(home, "promote", job=job.id):
        audit.append(home, "promote", job=job.id, version=version, sha256=record["sha256"], run=run_id)
    if job.kind == "forget" and job.document:
        retire_versions_with(home, job.document, job.id)
        remove_runs(home, job.document)  # runs that were in flight when the document was forgotten
    clean_intermediates(home, run_id)
    for gone in registry.prune(home, ctx.settings.daemon.keep_versions):
        audit.append(home, "prune", version=gone)
    return {"version": version}


STAGES: dict[str, Callable[[Context, Job, Emit], dict[str, Any]]] = {
    "snapshot": stage_snapshot,
    "study": stage_study,
    "train": stage_train,
    "export": stage_export,
    "gate": stage_gate,
    "promote": stage_promote,
}
