"""``appliance run``: the daemon. Watch the inbox, turn new data into a gated new version, serve it.

* One engine per home: an exclusive ``flock`` on ``run/engine.lock`` (released by
  the kernel when the process dies, even by ``kill -9``).
* The inbox watcher ingests stable files; new records queue a train job. Bursts
  coalesce in the journal: while a train job waits, more data joins it, so data
  arriving during a run queues exactly one follow-up run.
* The main loop takes jobs from the journal (an interrupted one first, resumed
  after its last complete stage) and runs them through :mod:`appliance.engine.pipeline`.
  Other processes talk to the daemon through the journal: ``retrain`` queues a
  job, ``forget`` queues a forget job, ``pause``/``resume`` set a flag the loop
  polls every ``daemon.poll_seconds``.
* Events: every progress event is appended to ``logs/events.jsonl`` (one JSON
  object a line, with a ``seq``); a client in another process tails the file
  (:func:`read_events`). ``run/daemon.json`` holds the pid, the endpoint address
  and the inbox counters.
* systemd: ``READY=1`` over ``$NOTIFY_SOCKET`` once serving and watching;
  SIGTERM finishes the current stage, or, in training, stops at the next step (the
  run resumes from its last checkpoint), then exits 0.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from appliance.contract.errors import HomeError
from appliance.contract.events import Emit, Event, Message
from appliance.data.ingest import Ingestors
from appliance.data.ingest.store import Store
from appliance.data.watch import InboxWatcher, list_inbox
from appliance.engine.pipeline import Context, DiskError, Stopped, run_job
from appliance.engine.review import approved_waiting, locked
from appliance.home import audit
from appliance.home.catalog import display, stores
from appliance.home.config import Settings, load
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.journal import AWAITING_REVIEW, Job, Journal
from appliance.home.paths import Home

log = logging.getLogger("appliance.engine.daemon")
PAUSED_KEY = "watch_paused"


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket, if there is one (a datagram on AF_UNIX)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode("utf-8"))
    return True


class HomeLock:
    """An exclusive lock on the home for this process's life."""

    def __init__(self, home: Home):
        self.path = home.lock
        self.fd: int | None = None

    def acquire(self) -> HomeLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise HomeError(
                f"{self.path.parent.parent}: another appliance engine is running on this home "
                f"(pid {holder}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_locked(home: Home) -> bool:
    """Whether some process holds the home's engine lock (a daemon is running)."""
    if not home.lock.exists():
        return False
    fd = os.open(home.lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class EventLog:
    """Append events as JSON lines; a reader in another process tails the file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        self.write(event.to_dict())

    def write(self, data: dict[str, Any]) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(data, default=str) + "\n")


def read_events(home: Home, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events written after byte ``offset``, and the offset to pass next time."""
    path = home.events_log
    if not path.exists():
        return [], 0
    with open(path, "rb") as handle:
        if offset > path.stat().st_size:
            offset = 0  # the log was rotated
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # a line being written stays for next time
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


class Daemon:
    def __init__(
        self,
        root: Path,
        serve: bool = True,
        once: bool = False,
        host: str | None = None,
        port: int | None = None,
        emit: Emit | None = None,
    ):
        self.home = Home(root)
        if not self.home.is_initialised():
            raise HomeError(f"{root}: not an appliance home; run 'appliance init --home {root}' first")
        self.serve, self.once, self.host, self.port = serve, once, host, port
        self.settings: Settings = load(self.home.config)
        self.stop = threading.Event()
        self.events = EventLog(self.home.events_log)
        self.extra_emit = emit
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "started": time.time(),
            "endpoint": None,
            "watching": False,
            "inbox": {"batches": 0, "accepted": 0, "files": 0, "quarantined": 0, "duplicates": 0},
        }
        self._watcher: Any = None
        self._ingestor: Any = None
        self._server: Any = None

    # --- life cycle ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self.events(event)
        if self.extra_emit:
            self.extra_emit(event)

    def request_stop(self, *_: Any) -> None:
        self.stop.set()

    def run(self) -> int:
        lock = HomeLock(self.home).acquire()
        journal = Journal(self.home.jobs_db)
        try:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self.request_stop)
                signal.signal(signal.SIGINT, self.request_stop)
            audit.append(self.home, "daemon_start", pid=os.getpid(), serve=self.serve)
            self._queue_unsnapshotted(journal)
            self._start_server()
            if self.once:
                self._ingest_all()
            else:
                self._sync_watching(journal)
            self._save_state()
            sd_notify("READY=1")
            self.emit(Message("daemon", "ready"))
            return self._loop(journal)
        finally:
            sd_notify("STOPPING=1")
            self._stop_watching()
            if self._server is not None:
                self._server.stop()
            if self._ingestor is not None:
                self._ingestor.close()
            journal.close()
            self.home.daemon_state.unlink(missing_ok=True)
            lock.release()

    def _loop(self, journal: Journal) -> int:
        ctx = Context(self.home, journal, self.settings, self.emit, self.stop)
        while not self.stop.is_set():
            if not self.once:
                self._sync_watching(journal)
            job = journal.next_job()
            if job is None and (approved := approved_waiting(self.home)):
                self._promote_approved(ctx, approved[0])
                continue
            if job is None:
                if self.once:
                    break
                self.stop.wait(self.settings.daemon.poll_seconds)
                continue
            try:
                self.emit(Message("daemon", f"job {job.id} ({job.kind}) from stage {job.next_stage()}"))
                done = run_job(ctx, job)
                self.emit(Message("daemon", f"job {done.id} {done.state}" + (f": {done.error}" if done.error else "")))
            except Stopped:
                self.emit(Message("daemon", f"stopping; job {job.id} resumes at its next start"))
                break
            except DiskError as exc:
                self.emit(Message("daemon", str(exc), level="error"))
                if self.once:
                    raise
                self.stop.wait(60)
        return 0

    def _promote_approved(self, ctx: Context, job: Job) -> None:
        """A job whose review was approved but whose promotion did not run (the voter's process
        stopped after the deciding vote): promoted now, under the review's lock as a vote would."""
        with locked(self.home.top.scoped(job.collection), job.run_id or ""):
            job = ctx.journal.get(job.id)
            if job.state == AWAITING_REVIEW:  # not promoted by a voter meanwhile
                done = run_job(ctx, job)
                self.emit(
                    Message(
                        "daemon",
                        f"job {done.id} {done.state} after its review" + (f": {done.error}" if done.error else ""),
                    )
                )

    def _queue_unsnapshotted(self, journal: Journal) -> None:
        """Data ingested but never snapshotted (a kill between an ingest and its enqueue) gets its job,
        in each collection."""
        if not self.settings.daemon.retrain_after_ingest or journal.active():
            return
        queued = {job.collection for job in journal.queue()}
        for collection, scope in stores(self.home):
            if collection in queued:
                continue
            with Store(scope.store_db) as store:
                head = store.head_snapshot()
                pending = store.last_seq() > (head["seq"] if head else 0) and store.counts()["records"] > 0
            if pending:
                job, _ = journal.enqueue("train", reason="data ingested since the last snapshot", collection=collection)
                self.emit(
                    Message(
                        "daemon", f"queued job {job.id} ({display(collection)}): data ingested since the last snapshot"
                    )
                )

    # --- the endpoint -----------------------------------------------------------------------
    def _start_server(self) -> None:
        if not self.serve:
            return
        from appliance.serving.server import Server  # the endpoint's web stack loads only when it serves

        self._server = Server(self.home, self.settings, self.host, self.port).start()
        self.state["endpoint"] = f"{self._server.url}/v1"
        audit.append(self.home, "server_start", url=self.state["endpoint"])

    # --- the inbox ----------------------------------------------------------------------------
    def _sync_watching(self, journal: Journal) -> None:
        paused = journal.get_meta(PAUSED_KEY) == "1"
        if paused and self._watcher is not None:
            self._stop_watching()
            self._save_state()
        elif not paused and self._watcher is None:
            self._watcher = InboxWatcher(
                self.home.inbox, self._on_stable, self.settings.watch, on_error=self._on_error
            ).start()  # starts with a full rescan
            self.state["watching"] = True
            self._save_state()

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
            self.state["watching"] = False

    def _on_error(self, exc: BaseException) -> None:
        log.error("inbox: %s", exc)
        self.emit(Message("ingest", f"inbox: {exc}", level="error"))

    def _ingest_all(self) -> None:
        paths, ignored = list_inbox(self.home.inbox)  # every collection's files
        self._on_stable(paths, ignored)

    def _on_stable(self, paths: list[Path], ignored: int = 0) -> None:
        if self._ingestor is None:
            self._ingestor = Ingestors(self.home, self.settings, self.emit)
        before = store_seqs(self.home)
        report = self._ingestor.run(paths, ignored)
        added = record_ingest(self.home, before, report)
        counters = self.state["inbox"]
        counters["batches"] += 1
        counters["accepted"] += report.accepted
        counters["files"] += report.files
        counters["duplicates"] += report.duplicates
        counters["quarantined"] += len(report.quarantined)
        self._save_state()
        if not self.settings.daemon.retrain_after_ingest:
            return
        for collection, count in added.items():  # each collection trains only on its own data
            if not count:
                continue
            with Journal(self.home.jobs_db) as journal:
                job, new = journal.enqueue("train", reason=f"{count} new record(s)", collection=collection)
            self.emit(
                Message(
                    "daemon",
                    f"{'queued' if new else 'added to queued'} job {job.id} "
                    f"({display(collection)}): {count} new record(s)",
                )
            )

    def _save_state(self) -> None:
        write_json_atomic(self.home.daemon_state, {**self.state, "saved": time.time()})


def store_seqs(home: Home) -> dict[str, int]:
    """Each collection's store position (to see what an ingest added)."""
    seqs = {}
    for collection, scope in stores(home):
        with Store(scope.store_db) as store:
            seqs[collection] = store.last_seq()
    return seqs


def record_ingest(home: Home, before: dict[str, int], report: Any) -> dict[str, int]:
    """Audit what an ingest changed (document hashes, never content); return the records
    newly active in each collection."""
    added = {}
    for collection in {*before, *report.collections, home.collection}:
        scope = home.top.scoped(collection)
        if not scope.store_db.exists():
            continue
        with Store(scope.store_db) as store:
            delta = store.changes_since(before.get(collection, 0))
        for sha in delta.documents_added:
            audit.append(scope, "ingest", document=sha)
        added[collection] = len(delta.added)
    for q in report.quarantined:
        audit.append(home.top, "quarantine", file=q.file, reasons=len(q.reasons))
    return added


def paused(home: Home) -> bool:
    with Journal(home.jobs_db) as journal:
        return journal.get_meta(PAUSED_KEY) == "1"


def set_paused(home: Home, value: bool) -> None:
    with Journal(home.jobs_db) as journal:
        journal.set_meta(PAUSED_KEY, "1" if value else "0")
    audit.append(home, "pause_watching" if value else "resume_watching")


def daemon_state(home: Home) -> dict[str, Any] | None:
    if not home.daemon_state.exists() or not is_locked(home):
        return None
    try:
        return read_json(home.daemon_state)
    except (OSError, ValueError):
        return None


__all__ = ["Daemon", "sd_notify", "read_events", "record_ingest", "store_seqs", "set_paused", "paused", "daemon_state"]
