"""The TUI's one door to the engine: a thin adapter over ``appliance.contract.api.Engine``.

Everything here runs off the UI thread (in Textual thread workers) and returns plain
data. Newer engine capabilities (issue 7: richer status, an event stream, retrain,
forget, pause/resume, audit entries, lineage, eval reports; issue 10: the data advisor and
corrections) are called only when the engine has them (``getattr``); when it does not,
the adapter returns ``None`` and the screens say "not available yet" instead of failing.

The endpoint is reached over real HTTP (httpx): ``GET /health`` for health and
``POST /v1/chat/completions`` with ``stream: true`` (server-sent events) for chat. The
API key is ``APPLIANCE_API_KEY`` when set (the caller's own key, issue 11), else the
engine's (``engine.api_key()``), else the home's ``api_key`` file (architecture.md, "The
home directory": ``<home>/api_key``, 0600).

Collections and keys (issue 11): ``collections()`` lists the inbox's collections (one
shared collection for an engine without them), ``scoped(name)`` is a client over the
engine bound to one collection (the Data and Models screens read through it), and
``whoami``/``keys``/``add_key``/``revoke_key`` are the key administration.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from appliance.contract.api import Engine, ModelVersion, Status
from appliance.contract.errors import ApplianceError
from appliance.contract.events import Event, Message, Progress, StageFinished, StageStarted

# The pipeline as people see it, in order (architecture.md, "Data flow").
STAGES = ("watch", "ingest", "snapshot", "train", "export", "gate", "serve")

# Engine stage names -> the row's stage. Export is several engine steps.
STAGE_OF = {"watch": "watch", "ingest": "ingest", "snapshot": "snapshot", "train": "train",
            "merge": "export", "convert": "export", "quantize": "export", "parity": "export", "export": "export",
            "gate": "gate", "eval": "gate", "promote": "serve", "serve": "serve", "registry": "serve"}

NOT_AVAILABLE = "not available yet"
ROLES = ("chat", "contributor", "approver", "admin")   # each includes the ones before (appliance/home/keys.py)
KEY_ENV = "APPLIANCE_API_KEY"                          # the caller's own key, before the home's admin key
STALE_SECONDS = 120.0  # a stage silent this long, with no job in the journal, is not shown as running
EVENT_TYPES = {cls.__name__: cls for cls in (StageStarted, Progress, Message, StageFinished)}


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


class EndpointError(ApplianceError):
    title = "Endpoint"


def read_api_key(home: Path) -> str | None:
    """The endpoint's key from ``<home>/api_key`` (written 0600 by ``appliance init``).

    Used only when the engine does not hand the key out itself. None when the file is
    missing or unreadable (for example another user's home): chat then says so.
    """
    try:
        key = (Path(home) / "api_key").read_text().strip()
    except OSError:
        return None
    return key or None


@dataclass
class StageProgress:
    """The running stage as the event stream describes it."""

    stage: str                    # one of STAGES
    engine_stage: str             # the engine's own name (quantize, parity, ...)
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


@dataclass
class Board:
    """Everything the dashboard shows, gathered in one poll."""

    status: Status | None
    models: list[ModelVersion]
    progress: StageProgress | None
    train_loss: list[float]
    val_loss: list[float]
    inbox: dict[str, Any]            # new, ingested, quarantined (None: unknown), paused, files
    gate: dict[str, Any] | None      # the current version's gate numbers, when the engine reports them
    endpoint: str
    health: str
    paused: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    collections: list[dict[str, Any]] | None = None   # None: the engine has no collections (only shared)
    identity: dict[str, Any] | None = None            # whoami(): name, role, collections; None: unknown

    @property
    def is_admin(self) -> bool:
        return bool(self.identity) and self.identity.get("role") == "admin"

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
                return f"{_count(new, 'new document')} waiting in the inbox."
            return "Idle — nothing is running. Drop documents into the inbox to teach the model more."
        left = eta_words(p.eta_seconds())
        if p.stage == "train":
            subject = p.description.split(",")[0].strip() if p.description else "Learning from your documents"
            if p.total:
                return f"{subject} — step {int(p.completed)} of {int(p.total)}{', ' + left if left else ''}"
            return subject
        what = {"watch": "Watching the inbox", "ingest": "Reading new documents", "snapshot": "Preparing the data",
                "export": "Packing the new model for serving", "gate": "Checking the new model against the current one",
                "serve": "Switching the endpoint to the new model"}[p.stage]
        detail = p.description or what
        if p.total:
            detail += f" — {int(p.completed)} of {int(p.total)}"
        return detail + (f", {left}" if left else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        return f"about {_count(minutes, 'minute')} left"
    return f"about {seconds / 3600:.1f} hours left"


def display(collection: str) -> str:
    """'shared' for the top level of the inbox, else the collection's own name (appliance/home/catalog.py)."""
    return collection or "shared"


def model_id(collection: str) -> str:
    return f"appliance/{collection}" if collection else "appliance"


def sees(identity: dict[str, Any] | None, collection: str) -> bool:
    """Whether a key (whoami's answer) may use a collection; an unknown key or one naming none sees all."""
    allowed = (identity or {}).get("collections")
    return allowed is None or collection in allowed


def collection_row(raw: Any) -> dict[str, Any]:
    """One engine collection (design: name, display, model_id, current, mode, documents, records,
    inbox_files) with every field present, so the screens need no defaults of their own."""
    c = _plain(raw) if not isinstance(raw, dict) else dict(raw)
    name = str(c.get("name") or "")
    return {"name": name, "display": str(c.get("display") or display(name)),
            "model_id": str(c.get("model_id") or model_id(name)), "current": c.get("current"),
            "mode": str(c.get("mode") or ("adapter" if name else "merged")),
            "documents": c.get("documents"), "records": c.get("records"), "inbox_files": c.get("inbox_files")}


def parse_collections(text: str) -> list[str] | None:
    """'cardiology, shared' -> ['cardiology', '']; empty -> None (every collection). The engine checks the names."""
    names = [n.strip().strip("/") for n in text.replace(";", ",").split(",") if n.strip()]
    if not names:
        return None
    return list(dict.fromkeys("" if n == "shared" else n for n in names))


def _first(obj: Any, *names: str) -> Callable[..., Any] | None:
    for name in names:
        fn = getattr(obj, name, None)
        if callable(fn):
            return fn
    return None


def _field(obj: Any, *names: str) -> Any:
    """The first of these attributes (or dict keys) that ``obj`` has, else None."""
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


class Client:
    """Wraps an engine for the TUI: thread-safe event log, optional capabilities, HTTP."""

    def __init__(self, engine: Engine, health_timeout: float = 1.0, max_events: int = 2000):
        self.engine = engine
        self.health_timeout = health_timeout
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._progress: StageProgress | None = None
        self._train_loss: list[float] = []
        self._val_loss: list[float] = []
        self._offset = 0   # where the next read of the engine's event log starts
        self.last_ingest: dict[str, Any] | None = None
        self.ingests = 0   # ingests this window ran: the Data screen re-reads the advice after each
        self._last_gate: str | None = None    # the gate's last verdict, in its own words
        self._last_error: str | None = None   # the last stage failure the engine reported
        self.collection: str = str(getattr(engine, "collection", "") or "")
        self._scoped: dict[str, Client] = {}  # one client per collection: its ingest report and counters stay

    # --- events -----------------------------------------------------------------------
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
                self._progress = StageProgress(stage, event.stage, event.description, 0.0, event.total, event.at,
                                               last=event.at)
            elif isinstance(event, Progress):
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
            elif isinstance(event, StageFinished):
                if stage == "gate":
                    self._last_gate = event.summary
                if self._progress and self._progress.engine_stage == event.stage:
                    self._progress.finished = True

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def _pull_events(self) -> None:
        """Events the engine itself reports (a daemon's stages, tailed from its event log)."""
        pull = _first(self.engine, "events")
        if pull is None:
            return
        result = pull(self._offset)
        if isinstance(result, tuple):  # (events, next offset): the api's contract
            fresh, self._offset = result
        else:
            fresh = result
        for item in fresh or []:
            event = item if isinstance(item, Event) else to_event(item)
            if event is not None:
                self.record(event)

    # --- reading ------------------------------------------------------------------------
    def board(self) -> Board:
        self._pull_events()
        status = self.engine.status()
        models = self.engine.models()
        from_status = self._status_progress(status)
        progress = from_status or None
        with self._lock:
            own = self._progress
            if progress is None and own is not None and not own.finished and \
                    (from_status is False or time.time() - own.last < STALE_SECONDS):
                # No job in the journal, but a stage this window started (ingest now) is running.
                progress = StageProgress(**vars(own))
                progress.metrics = dict(progress.metrics)
            train, val = list(self._train_loss), list(self._val_loss)
            notes = {"last_gate": self._last_gate, "last_error": self._last_error}
        current = next((m for m in models if m.current), None)
        inbox = self.inbox_counts(status)
        collections = self._optional(self.collections) if self.can("collections") else None
        return Board(status, models, progress, train, val, inbox, self.gate(current, status),
                     self.endpoint(status), self.health(status), bool(inbox.get("paused")) or None, notes,
                     collections, self._optional(self.whoami))

    @staticmethod
    def _optional(read: Callable[[], Any]) -> Any:
        """A view the board can do without: the engine's refusal (a revoked key, say) leaves it unknown
        instead of failing the whole poll; the screen that needs it says why when asked."""
        try:
            return read()
        except ApplianceError:
            return None

    def _status_progress(self, status: Status) -> StageProgress | None | bool:
        """The running job as the engine's status names it (issue 7's ``job``).

        Returns False when the status has no such field (an older engine): then the
        event stream alone says what runs.
        """
        if not hasattr(status, "job"):
            return False
        job = status.job
        if not isinstance(job, dict) or STAGE_OF.get(str(job.get("stage"))) is None:
            return None
        stage = str(job["stage"])
        info = job.get("progress") if isinstance(job.get("progress"), dict) else {}
        if info.get("stage") and info["stage"] != stage and STAGE_OF.get(info["stage"]) != STAGE_OF[stage]:
            info = {}
        total = info.get("total")
        words = "Retraining without the forgotten document" if job.get("kind") == "forget" and stage == "train" else ""
        p = StageProgress(STAGE_OF[stage], stage, words, float(info.get("completed") or 0),
                          float(total) if total else None, float(job.get("since") or time.time()),
                          dict(info.get("metrics") or {}))
        with self._lock:  # the event stream knows the stage's own words ("Learning from 40 examples")
            if self._progress is not None and STAGE_OF.get(self._progress.engine_stage) == p.stage:
                p.description = p.description or self._progress.description
                p.started = self._progress.started
        return p

    def inbox_counts(self, status: Status) -> dict[str, Any]:
        inbox = _field(status, "inbox")
        if isinstance(inbox, dict) and inbox:
            return {**inbox, "files": status.inbox_files}
        quarantined = None if self.last_ingest is None else len(self.last_ingest.get("quarantined", []))
        return {"new": None, "ingested": status.documents, "quarantined": quarantined, "files": status.inbox_files}

    def endpoint(self, status: Status | None = None) -> str:
        status = status or self.engine.status()
        return status.endpoint

    def health(self, status: Status | None = None) -> str:
        """'answering (vN)', 'not running' or the HTTP problem, from a real GET /health.

        The daemon's own view is used when a daemon runs; otherwise the endpoint may
        still be up ('appliance serve'), so the window asks it directly.
        """
        server = _field(status, "server") if status is not None else None
        if isinstance(server, dict) and server.get("daemon_pid") and isinstance(server.get("health"), str):
            return "answering" if server["health"] == "ok" else server["health"]
        base = self.endpoint(status).removesuffix("/").removesuffix("/v1")
        try:
            r = httpx.get(f"{base}/health", timeout=self.health_timeout)
        except httpx.HTTPError:
            return "not running"
        if r.status_code != 200:
            return f"unhealthy (HTTP {r.status_code})"
        try:
            model = r.json().get("model")
        except ValueError:
            model = None
        return f"answering ({model})" if model else "answering"

    def gate(self, current: ModelVersion | None, status: Status | None = None) -> dict[str, Any] | None:
        """The served version's gate report (eval.json), or the numbers the status carries."""
        if current is None:
            return None
        report = self.eval_report(current.run) if current.run else None
        if report:
            return report
        metrics = _field(status, "current_metrics") if status is not None else None
        if isinstance(metrics, dict) and isinstance(metrics.get("gate"), dict):
            return {"checks": metrics["gate"]}
        return None

    def eval_report(self, run: str) -> dict[str, Any] | None:
        fn = _first(self.engine, "eval_report")
        if fn is None:
            return None
        try:
            return _plain(fn(run))
        except ApplianceError:
            return None

    def version_details(self, version: ModelVersion) -> dict[str, Any]:
        """Validation loss, probe score and document count for the Models table, when known."""
        lineage = None
        try:
            lineage = self.lineage(version.version)
        except ApplianceError:
            pass
        gate = (lineage or {}).get("gate") or (self.eval_report(version.run) if version.run else None) or {}
        checks = {c.get("name"): c for c in gate.get("checks", []) if isinstance(c, dict)}
        val = (checks.get("validation_loss") or {}).get("value")
        known = getattr(version, "metrics", None) or {}  # the engine's own summary (ModelVersion.metrics)
        loss = next((x for x in (val.get("candidate") if isinstance(val, dict) else None,
                                 known.get("gate_val_loss"), known.get("best_val_loss"),
                                 ((lineage or {}).get("training") or {}).get("best_val_loss"))
                     if isinstance(x, (int, float))), None)
        probes = (checks.get("general_probes") or {}).get("value")
        score = f"{answered(probes['candidate'], probes['questions'])}/{probes['questions']}" if isinstance(probes, dict) and \
            "candidate" in probes and "questions" in probes else None
        docs = (lineage or {}).get("documents")
        method, reason = training_method(known, lineage)
        return {"val_loss": loss, "probes": score, "documents": len(docs) if isinstance(docs, list) else None,
                "passed": gate.get("passed", known.get("gate_passed")), "method": method, "method_reason": reason,
                "answers": gate.get("metrics") if isinstance(gate.get("metrics"), dict) else None}

    def advise(self) -> list[dict[str, str]] | None:
        """The data advisor's findings (issue 10), warnings first; None when the engine has no advisor."""
        fn = _first(self.engine, "advise")
        if fn is None:
            return None
        items = [a for a in (_plain(x) for x in fn() or []) if isinstance(a, dict)]
        advice = [{"level": str(a.get("level", "ok")), "code": str(a.get("code", "")),
                   "message": str(a.get("message", ""))} for a in items]
        return sorted(advice, key=lambda a: a["level"] != "warning")  # stable: the engine's order within a level

    def lineage(self, version: str) -> dict[str, Any] | None:
        fn = _first(self.engine, "lineage")
        return None if fn is None else _plain(fn(version))

    def audit(self) -> list[dict[str, Any]] | None:
        fn = _first(self.engine, "audit_entries")
        if fn is None:
            return None
        return [_plain(e) for e in fn()]

    def jobs(self) -> list[dict[str, Any]] | None:
        """The job journal's recent jobs (the daemon's work), when the engine keeps one."""
        fn = _first(self.engine, "jobs")
        return None if fn is None else [_plain(j) for j in fn()]

    def sources(self) -> tuple[list[dict[str, Any]], str] | None:
        """Source documents with record counts, and where the list comes from.

        The engine has no document listing yet; the served version's lineage names
        the documents it was trained on, which is what people ask about.
        """
        fn = _first(self.engine, "sources", "documents")
        if fn is not None:
            return list(_plain(fn())), "all documents"
        current = next((m for m in self.engine.models() if m.current), None)
        if current is None or _first(self.engine, "lineage") is None:
            return None
        lineage = self.lineage(current.version)
        if not lineage or not isinstance(lineage.get("documents"), list):
            return None
        return lineage["documents"], f"documents {current.version} was trained on"

    def quarantined(self) -> list[dict[str, Any]] | None:
        """Quarantined files with reasons: from the engine when it lists them, else the last ingest
        this window ran (the engine reports only their number so far)."""
        fn = _first(self.engine, "quarantined", "quarantine")
        if fn is not None:
            return [_plain(q) for q in fn()]
        if self.last_ingest is not None:
            return list(self.last_ingest.get("quarantined", []))
        return None

    # --- acting ---------------------------------------------------------------------
    def ingest(self) -> dict[str, Any]:
        report = self.engine.ingest(self.record)
        self.last_ingest = dict(report)
        self.ingests += 1
        return report

    def retrain(self) -> str:
        """Retrain now: the engine's own retrain when it has one, else train and export in-process."""
        fn = _first(self.engine, "retrain")
        if fn is not None:
            job = _plain(fn())
            said = f"Retraining queued as job {job.get('id', '?')}" if isinstance(job, dict) else "Retraining queued"
            server = _field(self.engine.status(), "server")
            if isinstance(server, dict) and not server.get("daemon_pid"):
                said += "; it starts when the daemon runs ('appliance run')"
            return said + "."
        run = self.engine.train(emit=self.record)
        version = self.engine.export(run, emit=self.record)
        return f"run {run} became version {version.version}; promote it from the Models screen"

    def promote(self, version: str) -> None:
        self.engine.promote(version)

    def rollback(self) -> str:
        return self.engine.rollback()

    def can(self, capability: str) -> bool:
        names = {"forget": ("forget",), "pause": ("pause_watching",), "lineage": ("lineage",),
                 "collections": ("collections",), "keys": ("keys",), "whoami": ("whoami",),
                 "audit": ("audit_entries", "audit", "audit_log"), "retrain": ("retrain",),
                 "correct": ("correct",), "advise": ("advise",), "review": ("reviews",)}[capability]
        return _first(self.engine, *names) is not None

    def verify_audit(self) -> dict[str, Any]:
        fn = _first(self.engine, "verify_audit")
        if fn is None:
            raise ApplianceError(f"checking the audit chain is {NOT_AVAILABLE} in this engine")
        return dict(_plain(fn()))

    def set_watching(self, on: bool) -> None:
        fn = _first(self.engine, "resume_watching" if on else "pause_watching")
        if fn is None:
            raise ApplianceError(f"pausing and resuming the watcher is {NOT_AVAILABLE} in this engine")
        fn()

    def correct(self, messages: list[dict[str, str]], answer: str) -> str:
        """Hand a corrected answer to the engine, which writes it into the inbox as a correction
        (the TUI writes no files). Returns the inbox path the engine wrote."""
        fn = _first(self.engine, "correct")
        if fn is None:
            raise ApplianceError(f"saving corrections is {NOT_AVAILABLE} in this engine")
        return str(fn([dict(m) for m in messages], answer))

    def set_method(self, method: str) -> str:
        """How the next runs train ([train] method); the engine validates it like config.toml."""
        fn = _first(self.engine, "set_method")
        if fn is None:
            raise ApplianceError(f"choosing the training method here is {NOT_AVAILABLE}; set [train] method in "
                                 "config.toml")
        return str(fn(method))

    def forget(self, document: str) -> Any:
        fn = _first(self.engine, "forget")
        if fn is None:
            raise ApplianceError(f"forgetting a document is {NOT_AVAILABLE}; use 'appliance forget' when it ships")
        return fn(document)

    def reviews(self) -> list[dict[str, Any]] | None:
        """Candidates waiting for human review (issue 10); None when the engine has no review."""
        fn = _first(self.engine, "reviews")
        return None if fn is None else [_plain(r) for r in fn() or []]

    def vote(self, run: str, approve: bool, comment: str = "",
             preferences: dict[int, str] | None = None) -> dict[str, Any]:
        """This OS user's vote on a candidate; the engine's answer says which answer was which."""
        fn = _first(self.engine, "vote")
        if fn is None:
            raise ApplianceError(f"voting on a candidate is {NOT_AVAILABLE} in this engine")
        return dict(_plain(fn(run, approve, comment, dict(preferences or {}))))

    # --- collections and keys (issue 11) -------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        """Every collection, shared first; an engine without collections has the shared one only."""
        fn = _first(self.engine, "collections")
        if fn is None:
            status = self.engine.status()
            return [collection_row({"name": "", "current": status.current, "mode": "merged",
                                    "documents": status.documents, "records": status.records,
                                    "inbox_files": status.inbox_files})]
        return [collection_row(c) for c in fn() or []]

    def scoped(self, collection: str) -> Client:
        """A client over the engine bound to one collection (the same client for the one this is)."""
        if collection == self.collection:
            return self
        if collection not in self._scoped:
            fn = _first(self.engine, "scoped")
            if fn is None:
                raise ApplianceError(f"collections are {NOT_AVAILABLE} in this engine: it has only the shared one")
            self._scoped[collection] = Client(fn(collection), self.health_timeout)
        return self._scoped[collection]

    def for_caller(self) -> Client:
        """This client, or, for a key that may not use the shared collection, the client of its first
        collection: the shared collection's status would refuse such a key, and the window would show nothing."""
        try:
            me = self.whoami()
        except ApplianceError:
            return self   # the first poll says what is wrong with the key
        allowed = (me or {}).get("collections")
        if not allowed or "" in allowed or self.collection in allowed or _first(self.engine, "scoped") is None:
            return self
        return self.scoped(allowed[0])

    def whoami(self) -> dict[str, Any] | None:
        """The key this window acts with: name, role, collections (None: all); None for an engine without keys."""
        fn = _first(self.engine, "whoami")
        if fn is None:
            return None
        me = dict(_plain(fn()))
        allowed = me.get("collections")
        # The engine names collections for people ("shared" for the top level); the TUI's rows use "".
        return {"name": str(me.get("name", "?")), "role": str(me.get("role", "")),
                "collections": None if allowed is None else ["" if c in ("", "shared") else str(c) for c in allowed]}

    def keys(self) -> list[dict[str, Any]]:
        """Every key (never secrets or hashes): name, role, collections, created, revoked."""
        fn = _first(self.engine, "keys")
        if fn is None:
            raise ApplianceError(f"managing keys is {NOT_AVAILABLE} in this engine")
        return [dict(_plain(k)) for k in fn() or []]

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        """A new key; the secret it returns is the only copy there will ever be (the engine keeps its hash)."""
        fn = _first(self.engine, "add_key")
        if fn is None:
            raise ApplianceError(f"adding keys is {NOT_AVAILABLE} in this engine; use 'appliance keys add'")
        return str(fn(name, role, collections))

    def revoke_key(self, name: str) -> None:
        fn = _first(self.engine, "revoke_key")
        if fn is None:
            raise ApplianceError(f"revoking keys is {NOT_AVAILABLE} in this engine; use 'appliance keys revoke'")
        fn(name)

    # --- chat over HTTP ---------------------------------------------------------------
    def api_key(self) -> str | None:
        """The caller's own key (APPLIANCE_API_KEY) first, then the engine's, then the home's api_key file."""
        own = os.environ.get(KEY_ENV, "").strip()
        if own:
            return own
        fn = _first(self.engine, "api_key")
        if fn is not None:
            return fn()
        return read_api_key(self.engine.home)

    def stream_chat(self, messages: list[dict[str, str]], model: str = "appliance", max_tokens: int = 256,
                    timeout: float = 120.0) -> Iterator[str]:
        """Yield the answer's text pieces as the endpoint streams them (SSE)."""
        key = self.api_key()
        if not key:
            raise EndpointError(f"no API key: set {KEY_ENV} to your key, or run 'appliance init' to write "
                                f"{Path(self.engine.home) / 'api_key'}")
        url = self.endpoint().rstrip("/") + "/chat/completions"
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
        try:
            with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"},
                              timeout=httpx.Timeout(timeout, connect=3.0)) as response:
                if response.status_code != 200:
                    response.read()
                    raise EndpointError(f"the endpoint refused the question (HTTP {response.status_code}): "
                                        f"{_error_text(response)}")
                yield from _sse_text(response.iter_lines())
        except httpx.ConnectError:
            raise EndpointError(f"nothing answers at {url}; start it with 'appliance serve' or 'appliance run'") from None
        except httpx.HTTPError as exc:
            raise EndpointError(f"the endpoint stopped answering: {exc}") from None


def _sse_text(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            continue
        if "error" in chunk:
            raise EndpointError(f"the model stopped: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if piece:
                yield piece


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def training_method(metrics: dict[str, Any], lineage: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """How a version was trained (qlora, lora, dora, full, ...) and why, from the first place that says:
    the version's metrics, its lineage, or the lineage's training section (train.json's method/method_reason)."""
    lineage = lineage or {}
    training = lineage.get("training") if isinstance(lineage.get("training"), dict) else {}
    settings = training.get("settings") if isinstance(training.get("settings"), dict) else {}
    for where in (metrics, lineage, training, settings):
        method = where.get("method") if isinstance(where, dict) else None
        if isinstance(method, str) and method and method != "auto":
            reason = where.get("method_reason")
            return method, str(reason) if reason else None
    return None, None


def _plain(value: Any) -> Any:
    """Dataclasses and objects from the engine as plain dicts for display."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


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
