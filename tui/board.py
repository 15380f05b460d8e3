"""What the window knows and how it says it: the board one poll gathers, the running stage as the
event stream describes it, and the plain-language sentences the screens show. No engine calls here
(tui/client.py makes them) and no HTTP (tui/endpoint.py)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from appliance.contract.api import ModelVersion, Status
from appliance.contract.events import Event, Message, Progress, StageFinished, StageStarted
from appliance.contract.names import parse

# The pipeline as people see it, in order (architecture.md, "Data flow").
STAGES = ("watch", "ingest", "snapshot", "train", "export", "gate", "serve")

# Engine stage names -> the row's stage. Export is several engine steps.
STAGE_OF = {
    "watch": "watch",
    "ingest": "ingest",
    "snapshot": "snapshot",
    "train": "train",
    "merge": "export",
    "convert": "export",
    "quantize": "export",
    "parity": "export",
    "export": "export",
    "gate": "gate",
    "eval": "gate",
    "study": "train",
    "promote": "serve",
    "serve": "serve",
    "registry": "serve",
}

STALE_SECONDS = 120.0  # a stage silent this long, with no job in the journal, is not shown as running
EVENT_TYPES: dict[str, type[Event]] = {cls.__name__: cls for cls in (StageStarted, Progress, Message, StageFinished)}


def to_event(data: dict[str, Any]) -> Event | None:
    """An event from its JSON form (``Event.to_dict``: kind, stage, at, fields)."""
    cls = EVENT_TYPES.get(str(data.get("kind")))
    if cls is None or "stage" not in data:
        return None
    fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
    try:
        return cls(**fields)
    except TypeError:
        return None


@dataclass
class StageProgress:
    """The running stage as the event stream describes it."""

    stage: str  # one of STAGES
    engine_stage: str  # the engine's own name (quantize, parity, ...)
    description: str = ""
    completed: float = 0.0
    total: float | None = None
    started: float = field(default_factory=time.time)
    metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    last: float = field(default_factory=time.time)  # when the stage last reported

    def eta_seconds(self, now: float | None = None) -> float | None:
        if "eta_s" in self.metrics:
            return float(self.metrics["eta_s"])
        if not self.total or self.completed <= 0:
            return None
        elapsed = (now or time.time()) - self.started
        return elapsed / self.completed * (self.total - self.completed)


class Tracker:
    """The events this window saw (its own stages' and the engine's log), and what they say runs.
    Thread-safe: stages report from workers while the poll reads."""

    def __init__(self, max_events: int = 2000):
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._progress: StageProgress | None = None
        self._train_loss: list[float] = []
        self._val_loss: list[float] = []
        self._last_gate: str | None = None  # the gate's last verdict, in its own words
        self._last_error: str | None = None  # the last stage failure the engine reported

    def record(self, event: Event) -> None:
        """The ``emit`` callback for stages the TUI runs, and the sink for pulled events."""
        with self._lock:
            self._events.append(event)
            stage = STAGE_OF.get(event.stage)
            if isinstance(event, Message) and event.level == "error":
                self._last_error = event.text
            if stage is None:
                return
            if isinstance(event, StageStarted):
                if stage == "train" and (self._progress is None or self._progress.stage != "train"):
                    self._train_loss, self._val_loss = [], []
                self._progress = StageProgress(
                    stage, event.stage, event.description, 0.0, event.total, event.at, last=event.at
                )
            elif isinstance(event, Progress):
                self._progressed(stage, event)
            elif isinstance(event, StageFinished):
                if stage == "gate":
                    self._last_gate = event.summary
                if self._progress and self._progress.engine_stage == event.stage:
                    self._progress.finished = True

    def _progressed(self, stage: str, event: Progress) -> None:
        p = self._progress
        if p is None or p.engine_stage != event.stage or p.finished:
            p = self._progress = StageProgress(stage, event.stage, started=event.at, last=event.at)
        p.completed, p.total = event.completed, event.total if event.total is not None else p.total
        p.last = event.at
        p.metrics = dict(event.metrics)
        if stage == "train":
            if "loss" in event.metrics:
                self._train_loss.append(float(event.metrics["loss"]))
            if "val_loss" in event.metrics:
                self._val_loss.append(float(event.metrics["val_loss"]))

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def losses(self) -> tuple[list[float], list[float]]:
        with self._lock:
            return list(self._train_loss), list(self._val_loss)

    def notes(self) -> dict[str, Any]:
        with self._lock:
            return {"last_gate": self._last_gate, "last_error": self._last_error}

    def running(self, job: dict[str, Any] | None) -> StageProgress | None:
        """What runs: the engine's job (the journal's word) in the event stream's words, else a stage this
        window started (an ingest now) that reported recently."""
        progress = job_progress(job)
        with self._lock:
            own = self._progress
            if progress is not None:
                if own is not None and STAGE_OF.get(own.engine_stage) == progress.stage:
                    progress.description = progress.description or own.description  # "Learning from 40 examples"
                    progress.started = own.started
                return progress
            if own is None or own.finished or time.time() - own.last >= STALE_SECONDS:
                return None  # a daemon killed mid-stage leaves no StageFinished: an old start is not running
            return StageProgress(**{**vars(own), "metrics": dict(own.metrics)})


def job_progress(job: dict[str, Any] | None) -> StageProgress | None:
    """The running job as the engine's status names it (stage, progress, since)."""
    if not isinstance(job, dict) or STAGE_OF.get(str(job.get("stage"))) is None:
        return None
    stage = str(job["stage"])
    progress = job.get("progress")
    info: dict[str, Any] = progress if isinstance(progress, dict) else {}
    if info.get("stage") and info["stage"] != stage and STAGE_OF.get(info["stage"]) != STAGE_OF[stage]:
        info = {}
    total = info.get("total")
    words = "Retraining without the forgotten document" if job.get("kind") == "forget" and stage == "train" else ""
    return StageProgress(
        STAGE_OF[stage],
        stage,
        words,
        float(info.get("completed") or 0),
        float(total) if total else None,
        float(job.get("since") or time.time()),
        dict(info.get("metrics") or {}),
    )


@dataclass
class Board:
    """Everything the dashboard shows, gathered in one poll."""

    status: Status
    models: list[ModelVersion]
    progress: StageProgress | None
    train_loss: list[float]
    val_loss: list[float]
    inbox: dict[str, Any]  # new, ingested, quarantined, paused, files, unlearned
    gate: dict[str, Any] | None  # the current version's gate numbers, when the engine reports them
    endpoint: str
    health: str
    paused: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    collections: list[dict[str, Any]] | None = None  # None: the engine refused to list them (the key)
    identity: dict[str, Any] | None = None  # whoami(): name, role, collections; None: refused

    @property
    def is_admin(self) -> bool:
        return self.identity is not None and self.identity.get("role") == "admin"

    def visible_collections(self) -> list[dict[str, Any]] | None:
        """The collections the caller's key may use (all when its key names none)."""
        if self.collections is None:
            return None
        return [c for c in self.collections if sees(self.identity, c["name"])]

    @property
    def current(self) -> ModelVersion | None:
        return next((m for m in self.models if m.current), None)

    @property
    def stage(self) -> str | None:
        return self.progress.stage if self.progress and not self.progress.finished else None

    def sentence(self) -> str:
        """The one plain-language line at the top of the dashboard."""
        p = self.progress
        if p is None or p.finished:
            if self.paused:
                return "Watching is paused; new documents wait in the inbox."
            new = self.inbox.get("new")
            if new:
                return f"{count(new, 'new document')} waiting in the inbox."
            return "Idle — nothing is running. Drop documents into the inbox to teach the model more."
        left = eta_words(p.eta_seconds())
        if p.stage == "train":
            subject = p.description.split(",")[0].strip() if p.description else "Learning from your documents"
            if p.total:
                return f"{subject} — step {int(p.completed)} of {int(p.total)}{', ' + left if left else ''}"
            return subject
        what = {
            "watch": "Watching the inbox",
            "ingest": "Reading new documents",
            "snapshot": "Preparing the data",
            "export": "Packing the new model for serving",
            "gate": "Checking the new model against the current one",
            "serve": "Switching the endpoint to the new model",
        }[p.stage]
        detail = p.description or what
        if p.total:
            detail += f" — {int(p.completed)} of {int(p.total)}"
        return detail + (f", {left}" if left else "")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def stored_words(documents: int | None, unlearned: int | None) -> str:
    """'12 document(s) learned', '3 document(s) stored, not yet learned', '12 document(s) stored, 2 not yet
    learned': a document read into the store is learned only once a promoted version was trained on it."""
    if documents is None:
        return "? document(s) stored"
    if unlearned is None:
        return f"{documents} document(s) stored"
    if not unlearned:
        return f"{documents} document(s) learned"
    if unlearned >= documents:
        return f"{documents} document(s) stored, not yet learned"
    return f"{documents} document(s) stored, {unlearned} not yet learned"


def answered(value: Any, questions: int) -> int:
    """Probe questions answered: the gate records the share (0.8), older reports the count (4)."""
    if isinstance(value, float) and 0.0 <= value <= 1.0 and questions:
        return round(value * questions)
    return int(value)


def eta_words(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return "less than a minute left"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {count(minutes, 'minute')} left"
    return f"about {seconds / 3600:.1f} hours left"


def sees(identity: dict[str, Any] | None, collection: str) -> bool:
    """Whether a key (whoami's answer) may use a collection; an unknown key or one naming none sees all."""
    allowed = (identity or {}).get("collections")
    return allowed is None or collection in allowed


def parse_collections(text: str) -> list[str] | None:
    """'cardiology, shared' -> ['cardiology', '']; empty -> None (every collection). The engine checks the names."""
    names = [n.strip().strip("/") for n in text.replace(";", ",").split(",") if n.strip()]
    if not names:
        return None
    return list(dict.fromkeys(parse(n) for n in names))


def training_method(metrics: dict[str, Any], lineage: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """How a version was trained (qlora, lora, dora, full, ...) and why, from the first place that says:
    the version's metrics, its lineage, or the lineage's training section (train.json's method/method_reason)."""
    lineage = lineage or {}
    raw = lineage.get("training")
    training: dict[str, Any] = raw if isinstance(raw, dict) else {}
    raw = training.get("settings")
    settings: dict[str, Any] = raw if isinstance(raw, dict) else {}
    for where in (metrics, lineage, training, settings):
        if not isinstance(where, dict):
            continue
        method = where.get("method")
        if isinstance(method, str) and method and method != "auto":
            reason = where.get("method_reason")
            return method, str(reason) if reason else None
    return None, None


def message_event_text(event: Event) -> str:
    """One line for the activity table."""
    if isinstance(event, Message):
        return event.text
    if isinstance(event, StageStarted):
        return f"started: {event.description}" if event.description else "started"
    if isinstance(event, StageFinished):
        return f"finished: {event.summary}" if event.summary else "finished"
    if isinstance(event, Progress):
        total = f" of {int(event.total)}" if event.total else ""
        return f"{int(event.completed)}{total}"
    return event.kind
