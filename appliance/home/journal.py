"""The durable job journal (``jobs.db``, SQLite in WAL mode with ``synchronous=FULL``).

The journal is the one source of truth for what is complete. A job (train or
forget) walks the stages in :data:`STAGES`; each stage is recorded as started and,
only after its outputs are written and fsynced (stages write through staging
folders and atomic renames), as complete. After a ``kill -9`` or a power cut the
next start finds the job still ``running`` and resumes it after its last complete
stage.

Other processes (the CLI, the TUI) read the journal and add commands to it (a
retrain, a pause of the inbox watcher); a running daemon polls it. SQLite's
locking makes this safe across processes without a socket.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.home import sqlitedb

STAGES = ("snapshot", "study", "train", "export", "gate", "promote")
KINDS = ("train", "forget", "consolidate")  # consolidate: a full run from the base (training/incremental.py)
# queued -> running -> done | refused (the gate kept the current model) | failed
# With [gate] promotion = "review": running -> awaiting_review (gated, registered, not current;
# the daemon does not pick it up) -> done (approved and promoted) | refused (rejected by a reviewer)
OPEN_STATES = ("queued", "running")
AWAITING_REVIEW = "awaiting_review"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                  -- train | forget
    state TEXT NOT NULL,                 -- queued | running | done | refused | failed
    stage TEXT NOT NULL DEFAULT '',      -- the last complete stage ('' before the first)
    current TEXT NOT NULL DEFAULT '',    -- the stage now running
    snapshot TEXT, run_id TEXT, version TEXT,
    document TEXT,                       -- forget: the document's sha256
    collection TEXT NOT NULL DEFAULT '', -- the collection whose data and models it works on ('' shared)
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL,
    error TEXT, result TEXT, progress TEXT
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    stage TEXT NOT NULL,
    state TEXT NOT NULL,                 -- started | complete | failed | job:<state>
    at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    state: str
    stage: str
    current: str
    snapshot: str | None
    run_id: str | None
    version: str | None
    document: str | None
    reason: str
    created: float
    updated: float
    error: str | None
    result: dict[str, Any] | None
    progress: dict[str, Any] | None
    collection: str = ""

    def next_stage(self) -> str | None:
        """The first stage not yet complete, or None when all are."""
        done = STAGES.index(self.stage) + 1 if self.stage else 0
        return STAGES[done] if done < len(STAGES) else None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


COLUMNS = (
    "id",
    "kind",
    "state",
    "stage",
    "current",
    "snapshot",
    "run_id",
    "version",
    "document",
    "reason",
    "created",
    "updated",
    "error",
    "result",
    "progress",
    "collection",
)


class Journal:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlitedb.connect(path, any_thread=True)  # a committed transition survives a power cut
        for statement in SCHEMA.split(";\n"):
            if statement.strip():
                self.db.execute(statement)
        self._upgrade()
        self._progress_at = 0.0

    def _upgrade(self) -> None:
        """A journal from before collections gains the column (its jobs were the shared collection's)."""
        names = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "collection" not in names:
            try:
                self.db.execute("ALTER TABLE jobs ADD COLUMN collection TEXT NOT NULL DEFAULT ''")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -----------------------------------------------------------------
    def _tx(self) -> _Tx:
        return _Tx(self.db)

    # --- jobs ---------------------------------------------------------------------------
    def enqueue(
        self, kind: str, reason: str = "", document: str | None = None, collection: str = ""
    ) -> tuple[Job, bool]:
        """Queue a job; return it and whether it is new.

        Bursts coalesce: while a train job for a collection is queued (not yet started),
        asking for another returns that one, so data arriving during a run queues
        exactly one follow-up run. A forget job always queues (it names its document).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        with self._tx():
            if kind in ("train", "consolidate"):
                row = self.db.execute(
                    "SELECT id FROM jobs WHERE kind=? AND state='queued' AND collection=? ORDER BY id LIMIT 1",
                    (kind, collection),
                ).fetchone()
                if row:
                    return self.get(row[0]), False
            now = time.time()
            cur = self.db.execute(
                "INSERT INTO jobs(kind, state, reason, document, collection, created, updated) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (kind, reason, document, collection, now, now),
            )
            job_id = int(cur.lastrowid or 0)
            self._transition(job_id, "", "job:queued", reason)
        return self.get(job_id), True

    def get(self, job_id: int) -> Job:
        row = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    def jobs(self, limit: int = 50) -> list[Job]:
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def active(self) -> Job | None:
        """The job that was running (interrupted if no daemon holds the lock)."""
        row = self.db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE state='running' ORDER BY id LIMIT 1"
        ).fetchone()
        return _job(row) if row else None

    def queue(self) -> list[Job]:
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE state='queued' ORDER BY id")
        return [_job(r) for r in rows]

    def next_job(self) -> Job | None:
        """An interrupted job first (resume), else the oldest queued one, now marked running."""
        with self._tx():
            job = self.active()
            if job is not None:
                self._transition(job.id, job.next_stage() or "", "job:resumed")
                return job
            queued = self.queue()
            if not queued:
                return None
            job = queued[0]
            self.db.execute("UPDATE jobs SET state='running', updated=? WHERE id=?", (time.time(), job.id))
            self._transition(job.id, "", "job:running")
        return self.get(job.id)

    def stage_started(self, job_id: int, stage: str) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE jobs SET current=?, progress=NULL, updated=? WHERE id=?", (stage, time.time(), job_id)
            )
            self._transition(job_id, stage, "started")

    def stage_complete(self, job_id: int, stage: str, **fields: Any) -> Job:
        """Mark ``stage`` complete, with the identifiers it produced (snapshot, run_id, version).

        Callers do this only after the stage's outputs are fsynced, so a complete
        stage is never redone and an incomplete one is always redone.
        """
        allowed = {"snapshot", "run_id", "version", "result"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [json.dumps(v) if k == "result" else v for k, v in fields.items()]
        with self._tx():
            self.db.execute(
                f"UPDATE jobs SET stage=?, current='', updated=?{', ' + sets if sets else ''} WHERE id=?",
                (stage, time.time(), *values, job_id),
            )
            self._transition(job_id, stage, "complete", json.dumps(fields, default=str) if fields else "")
        return self.get(job_id)

    def remember(self, job_id: int, **fields: Any) -> Job:
        """Record an identifier before the stage that fills it completes (the run id a
        resumed training must reuse)."""
        allowed = {"snapshot", "run_id", "version"}
        assert set(fields) <= allowed, fields
        with self._tx():
            self.db.execute(
                f"UPDATE jobs SET {', '.join(f'{k}=?' for k in fields)}, updated=? WHERE id=?",
                (*fields.values(), time.time(), job_id),
            )
        return self.get(job_id)

    def finish(self, job_id: int, state: str, error: str | None = None, result: dict[str, Any] | None = None) -> Job:
        assert state in ("done", "refused", "failed"), state
        with self._tx():
            self.db.execute(
                "UPDATE jobs SET state=?, current='', error=?, result=COALESCE(?, result), updated=? WHERE id=?",
                (state, error, json.dumps(result) if result is not None else None, time.time(), job_id),
            )
            self._transition(job_id, "", f"job:{state}", error or "")
        return self.get(job_id)

    def await_review(self, job_id: int, detail: str = "") -> Job:
        """Park a gated job until reviewers decide; :meth:`next_job` never picks it up."""
        with self._tx():
            self.db.execute(
                "UPDATE jobs SET state=?, current='', updated=? WHERE id=?", (AWAITING_REVIEW, time.time(), job_id)
            )
            self._transition(job_id, "", f"job:{AWAITING_REVIEW}", detail)
        return self.get(job_id)

    def awaiting_review(self) -> list[Job]:
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE state=? ORDER BY id", (AWAITING_REVIEW,))
        return [_job(r) for r in rows]

    def progress(self, job_id: int, info: dict[str, Any], every: float = 1.0) -> None:
        """Where the running stage is (for status); at most one write a second, not a transition."""
        now = time.monotonic()
        if now - self._progress_at < every:
            return
        self._progress_at = now
        self.db.execute("UPDATE jobs SET progress=? WHERE id=?", (json.dumps(info, default=str), job_id))

    def transitions(self, job_id: int | None = None) -> list[dict[str, Any]]:
        query = "SELECT seq, job, stage, state, at, detail FROM transitions"
        rows = self.db.execute(
            query + (" WHERE job=? ORDER BY seq" if job_id is not None else " ORDER BY seq"),
            (job_id,) if job_id is not None else (),
        )
        return [dict(zip(("seq", "job", "stage", "state", "at", "detail"), r)) for r in rows]

    def _transition(self, job_id: int, stage: str, state: str, detail: str = "") -> None:
        self.db.execute(
            "INSERT INTO transitions(job, stage, state, at, detail) VALUES (?,?,?,?,?)",
            (job_id, stage, state, time.time(), detail),
        )

    # --- small key/value facts (audit head, watcher paused) -------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.nested = db.in_transaction

    def __enter__(self) -> None:
        if not self.nested:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.nested:
            return
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _job(row: tuple) -> Job:
    data = dict(zip(COLUMNS, row))
    for key in ("result", "progress"):
        data[key] = json.loads(data[key]) if data[key] else None
    return Job(**data)


def open_journal(path: Path) -> Journal:
    return Journal(path)


def iter_stages(after: str) -> Iterator[str]:
    start = STAGES.index(after) + 1 if after else 0
    yield from STAGES[start:]
