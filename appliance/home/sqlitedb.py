"""Opening the appliance's SQLite files (the job journal, the record store, the passage
index) one way: WAL mode, so readers never wait for the writer; ``synchronous=FULL``, so a
committed transaction survives a power cut; and up to ``BUSY_S`` of waiting for a lock.

SQLite does not run its busy handler for every lock an open can meet: after a process was
killed mid-write, the next opener rebuilds the WAL index under an exclusive lock, and a
concurrent ``PRAGMA journal_mode`` fails with "database is locked" at once, whatever the
timeout (seen when the TUI or a test polls the journal while the daemon restarts after a
kill -9). So the opening statements are retried until ``BUSY_S`` runs out. Written by hand:
the standard library has no retry, and it is a few lines.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

BUSY_S = 30.0
RETRY_S = 0.05  # first pause between tries; doubled up to 1 s


def connect(
    path: Path, any_thread: bool = False, setup: Callable[[sqlite3.Connection], object] | None = None
) -> sqlite3.Connection:
    """A connection in WAL mode with FULL sync, autocommit (explicit transactions), and
    ``setup`` run on it under the same retry."""
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_S, check_same_thread=not any_thread)
    try:
        retry_locked(lambda: _open(db, setup))
    except BaseException:
        db.close()
        raise
    return db


def _open(db: sqlite3.Connection, setup: Callable[[sqlite3.Connection], object] | None) -> None:
    if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":  # WAL persists in the file
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    if setup is not None:
        setup(db)


def retry_locked(work: Callable[[], None], budget_s: float | None = None) -> None:
    """``work`` again while SQLite answers "database is locked" or "busy", for ``budget_s``
    (default ``BUSY_S``)."""
    deadline = time.monotonic() + (BUSY_S if budget_s is None else budget_s)
    pause = RETRY_S
    while True:
        try:
            work()
            return
        except sqlite3.OperationalError as problem:
            text = str(problem).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
