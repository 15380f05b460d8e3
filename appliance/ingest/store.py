"""The content-addressed record store (SQLite, WAL) under ``store/``.

Records are keyed by the sha256 of their canonical content, so the same example
arriving from two files is stored once; ``doc_records`` links each record to every
source document (by the document's sha256) that contained it. A record stays
usable while at least one active document references it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from .records import Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    sha256 TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    format TEXT NOT NULL,
    size INTEGER NOT NULL,
    records INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',   -- active | superseded | forgotten
    ingested_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,                   -- relative to the inbox
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS doc_records (
    doc_sha256 TEXT NOT NULL,
    record_hash TEXT NOT NULL,
    PRIMARY KEY (doc_sha256, record_hash)
);
CREATE INDEX IF NOT EXISTS doc_records_by_record ON doc_records(record_hash);
"""


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- files seen in the inbox -------------------------------------------------
    def file_state(self, rel: str) -> tuple[int, int, str] | None:
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path=?", (rel,)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def remember_file(self, rel: str, size: int, mtime_ns: int, sha256: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?)", (rel, size, mtime_ns, sha256))

    def has_document(self, sha256: str) -> bool:
        return self.db.execute("SELECT 1 FROM documents WHERE sha256=?", (sha256,)).fetchone() is not None

    # --- adding a document ------------------------------------------------------------
    def add_document(self, sha256: str, rel: str, fmt: str, size: int,
                     records: Iterable[Record], supersedes: str | None) -> tuple[int, int]:
        """Store a document and its records in one transaction; return (new, duplicate)."""
        new = dup = 0
        self.db.execute("BEGIN IMMEDIATE")
        try:
            records = list(records)
            for record in records:
                cur = self.db.execute("INSERT OR IGNORE INTO records VALUES (?,?,?)",
                                      (record.hash, record.kind, json.dumps(record.body, ensure_ascii=False)))
                if cur.rowcount:
                    new += 1
                else:
                    dup += 1
                self.db.execute("INSERT OR IGNORE INTO doc_records VALUES (?,?)", (sha256, record.hash))
            self.db.execute("INSERT OR REPLACE INTO documents VALUES (?,?,?,?,?, 'active', ?)",
                            (sha256, rel, fmt, size, len(records), time.time()))
            if supersedes and supersedes != sha256:
                self.db.execute("UPDATE documents SET status='superseded' WHERE sha256=? AND status='active'",
                                (supersedes,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return new, dup

    # --- reading ---------------------------------------------------------------------
    def active_record_hashes(self) -> list[str]:
        rows = self.db.execute(
            "SELECT DISTINCT r.record_hash FROM doc_records r JOIN documents d ON d.sha256 = r.doc_sha256 "
            "WHERE d.status = 'active' ORDER BY r.record_hash").fetchall()
        return [row[0] for row in rows]

    def records(self, hashes: Iterable[str]) -> list[Record]:
        out = []
        for h in hashes:
            row = self.db.execute("SELECT kind, body FROM records WHERE hash=?", (h,)).fetchone()
            if row is None:
                raise KeyError(h)
            out.append(Record(row[0], json.loads(row[1])))
        return out

    def sources_of(self, hashes: Iterable[str]) -> list[dict[str, str]]:
        """The active documents (sha256, path) behind a set of records: a snapshot's lineage."""
        wanted = set(hashes)
        rows = self.db.execute(
            "SELECT DISTINCT d.sha256, d.path, r.record_hash FROM documents d "
            "JOIN doc_records r ON r.doc_sha256 = d.sha256 WHERE d.status='active'").fetchall()
        docs = {(sha, path) for sha, path, rec in rows if rec in wanted}
        return [{"sha256": sha, "path": path} for sha, path in sorted(docs)]

    def counts(self) -> dict[str, int]:
        docs = self.db.execute("SELECT COUNT(*) FROM documents WHERE status='active'").fetchone()[0]
        return {"documents": docs, "records": len(self.active_record_hashes())}
