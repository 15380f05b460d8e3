"""Opening the appliance's SQLite files while another connection holds the lock (as after a
kill -9, when the restarted daemon recovers the journal and the TUI polls it): the open
waits and succeeds, in WAL mode, or fails only when the lock outlasts the budget."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from appliance.home import sqlitedb


def locked_file(path: Path) -> sqlite3.Connection:
    """A rollback-journal database with an exclusive lock held on it (switching it to WAL needs that lock)."""
    seed = sqlite3.connect(path)
    seed.execute("CREATE TABLE t(x)")
    seed.commit()
    seed.close()
    holder = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_an_open_waits_for_the_lock_and_ends_in_wal_mode(tmp_path: Path):
    holder = locked_file(tmp_path / "jobs.db")
    threading.Timer(0.5, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    db = sqlitedb.connect(tmp_path / "jobs.db")
    assert time.monotonic() - started >= 0.4  # it waited for the holder
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.close()
    holder.close()


def test_a_lock_that_outlasts_the_budget_fails_with_sqlites_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    holder = locked_file(tmp_path / "jobs.db")
    monkeypatch.setattr(sqlitedb, "BUSY_S", 0.3)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlitedb.connect(tmp_path / "jobs.db")
    holder.close()


def test_a_locked_error_is_retried_and_others_are_not():
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")

    sqlitedb.retry_locked(flaky, budget_s=5)
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("no such table: t")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        sqlitedb.retry_locked(broken, budget_s=5)
    assert len(calls) == 4  # tried once
