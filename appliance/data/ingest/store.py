"""The content-addressed record store (SQLite, WAL) under ``store/``.

* ``records`` are keyed by the sha256 of their canonical content, so the same
  example arriving from two files is stored once.
* ``documents`` are keyed by the sha256 of a file's bytes; ``doc_records`` links
  each record to every document that contained it.
* ``versions`` says which content each inbox path has had. The newest is
  ``current``; a changed file supersedes its earlier version (both are kept).
  A deleted file keeps its current version: removing a file from the inbox does
  not remove its data (only an explicit forget does).
* Reference counts keep "active" exact without scans: a document is active while
  some path's current version is it; a record is active (``refs`` > 0) while some
  active document holds it. Each 0 <-> 1 transition is appended to ``changes``,
  so a snapshot is cut from the changes since its parent, in work proportional
  to them (see appliance/data/snapshot.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.data.ingest.records import Record
from appliance.home import sqlitedb

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    sha256 TEXT PRIMARY KEY,
    path TEXT NOT NULL,                      -- where it was first seen
    format TEXT NOT NULL,
    size INTEGER NOT NULL,
    records INTEGER NOT NULL,                -- distinct records it holds
    status TEXT NOT NULL DEFAULT 'inactive', -- active | inactive (| forgotten)
    ingested_at REAL NOT NULL,
    tokens INTEGER                           -- NULL: not counted (no base tokenizer then)
);
CREATE TABLE IF NOT EXISTS versions (
    path TEXT NOT NULL,                      -- relative to the inbox
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL,                    -- current | superseded
    seen_at REAL NOT NULL,
    PRIMARY KEY (path, sha256)
);
CREATE INDEX IF NOT EXISTS versions_by_document ON versions(sha256, status);
CREATE TABLE IF NOT EXISTS files (           -- what each path looked like when last read
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    inode INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    format TEXT NOT NULL DEFAULT '',
    tokens INTEGER,
    refs INTEGER NOT NULL DEFAULT 0          -- active documents holding it
);
CREATE TABLE IF NOT EXISTS doc_records (
    doc_sha256 TEXT NOT NULL,
    record_hash TEXT NOT NULL,
    PRIMARY KEY (doc_sha256, record_hash)
);
CREATE INDEX IF NOT EXISTS doc_records_by_record ON doc_records(record_hash);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item TEXT NOT NULL,                      -- record | document
    key TEXT NOT NULL,
    change TEXT NOT NULL                     -- added | retired
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    parent TEXT,
    seq INTEGER NOT NULL,                    -- the last change it includes
    depth INTEGER NOT NULL,                  -- deltas since the last full manifest
    val_fraction REAL NOT NULL,
    setsum TEXT NOT NULL,
    stats TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_seq ON snapshots(seq, created);
"""

# The walking skeleton's store (schema 1) had no versions, reference counts or
# change log; these statements rebuild them from what it had.
MIGRATE_FROM_1 = """
ALTER TABLE documents ADD COLUMN tokens INTEGER;
UPDATE documents SET status = 'inactive' WHERE status = 'superseded';
ALTER TABLE files ADD COLUMN inode INTEGER NOT NULL DEFAULT 0;
ALTER TABLE records ADD COLUMN format TEXT NOT NULL DEFAULT '';
ALTER TABLE records ADD COLUMN tokens INTEGER;
ALTER TABLE records ADD COLUMN refs INTEGER NOT NULL DEFAULT 0;
INSERT OR IGNORE INTO versions
    SELECT path, sha256, CASE status WHEN 'active' THEN 'current' ELSE 'superseded' END, ingested_at FROM documents;
UPDATE records SET refs = (SELECT COUNT(*) FROM doc_records r JOIN documents d ON d.sha256 = r.doc_sha256
                           WHERE r.record_hash = records.hash AND d.status = 'active');
INSERT INTO changes(item, key, change) SELECT 'document', sha256, 'added' FROM documents WHERE status = 'active';
INSERT INTO changes(item, key, change) SELECT 'record', hash, 'added' FROM records WHERE refs > 0;
"""

BATCH = 500  # SQLite's limit on bound parameters is 999 on older builds


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    inode: int
    sha256: str


@dataclass
class Added:
    new: int = 0  # records not in the store before
    duplicates: int = 0  # records already there (or repeated in the file)
    superseded: str | None = None  # sha256 of the version this one replaced at its path


@dataclass
class Delta:
    """Net change since a change sequence number."""

    seq: int
    added: list[str]
    retired: list[str]
    documents_added: list[str]
    documents_retired: list[str]


class Store:
    def __init__(self, path: Path, any_thread: bool = False):
        """``any_thread``: the caller guarantees one thread at a time (a long-lived ingestor)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlitedb.connect(path, any_thread)  # explicit transactions below
        self._upgrade()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[None]:
        """All-or-nothing writes; a read transaction sees one consistent state."""
        self.db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _upgrade(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        with self.transaction():  # (executescript would commit: it cannot run inside one)
            old = {row[1] for row in self.db.execute("PRAGMA table_info(documents)")}
            script = SCHEMA + (MIGRATE_FROM_1 if old and "tokens" not in old else "")
            for statement in script.split(";\n"):
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- files seen in the inbox -------------------------------------------------------
    def file_state(self, rel: str) -> FileState | None:
        row = self.db.execute("SELECT size, mtime_ns, inode, sha256 FROM files WHERE path=?", (rel,)).fetchone()
        return FileState(*row) if row else None

    def file_states(self) -> dict[str, FileState]:
        """Every path's last state in one query (a full scan of a large inbox)."""
        rows = self.db.execute("SELECT path, size, mtime_ns, inode, sha256 FROM files")
        return {row[0]: FileState(*row[1:]) for row in rows}

    def has_document(self, sha256: str) -> bool:
        return self.db.execute("SELECT 1 FROM documents WHERE sha256=?", (sha256,)).fetchone() is not None

    # --- adding a version of an inbox file -----------------------------------------------
    def put(
        self,
        rel: str,
        state: FileState,
        fmt: str = "",
        records: Sequence[Record] = (),
        tokens: Sequence[int | None] | None = None,
    ) -> Added:
        """Make ``state.sha256`` the current content of inbox path ``rel``, storing the
        document and its records first when the content is new. One transaction."""
        added = Added()
        with self.transaction():
            if not self.has_document(state.sha256):
                added.new, added.duplicates = self._insert_document(rel, state, fmt, records, tokens)
            added.superseded = self._make_current(rel, state.sha256)
            self.db.execute(
                "INSERT OR REPLACE INTO files(path, size, mtime_ns, inode, sha256) VALUES (?,?,?,?,?)",
                (rel, state.size, state.mtime_ns, state.inode, state.sha256),
            )
        return added

    def _insert_document(
        self, rel: str, state: FileState, fmt: str, records: Sequence[Record], tokens: Sequence[int | None] | None
    ) -> tuple[int, int]:
        counts = list(tokens) if tokens is not None else [None] * len(records)
        new = dup = 0
        for record, count in zip(records, counts):
            cur = self.db.execute(
                "INSERT OR IGNORE INTO records(hash, kind, body, format, tokens) VALUES (?,?,?,?,?)",
                (record.hash, record.kind, json.dumps(record.body, ensure_ascii=False), record.format or fmt, count),
            )
            self.db.execute("INSERT OR IGNORE INTO doc_records VALUES (?,?)", (state.sha256, record.hash))
            if cur.rowcount:
                new += 1
            else:
                dup += 1
                if count is not None:  # known now, perhaps not when first stored
                    self.db.execute("UPDATE records SET tokens=? WHERE hash=? AND tokens IS NULL", (count, record.hash))
        distinct = self.db.execute("SELECT COUNT(*) FROM doc_records WHERE doc_sha256=?", (state.sha256,)).fetchone()[0]
        total = None if None in counts else sum(c for c in counts if c is not None)
        self.db.execute(
            "INSERT INTO documents(sha256, path, format, size, records, ingested_at, tokens) VALUES (?,?,?,?,?,?,?)",
            (state.sha256, rel, fmt, state.size, distinct, time.time(), total),
        )
        return new, dup

    def _make_current(self, rel: str, sha256: str) -> str | None:
        row = self.db.execute("SELECT sha256 FROM versions WHERE path=? AND status='current'", (rel,)).fetchone()
        previous = row[0] if row else None
        if previous == sha256:
            return None
        if previous:
            self.db.execute("UPDATE versions SET status='superseded' WHERE path=? AND sha256=?", (rel, previous))
            self._recount_document(previous)
        self.db.execute("INSERT OR REPLACE INTO versions VALUES (?,?, 'current', ?)", (rel, sha256, time.time()))
        self._recount_document(sha256)
        return previous

    def _recount_document(self, sha256: str) -> None:
        """Activate or retire a document (and through it its records) as its current paths come and go."""
        current = self.db.execute(
            "SELECT COUNT(*) FROM versions WHERE sha256=? AND status='current'", (sha256,)
        ).fetchone()[0]
        status = self.db.execute("SELECT status FROM documents WHERE sha256=?", (sha256,)).fetchone()[0]
        if current and status == "inactive":
            self.set_document(sha256, "active", +1)
        elif not current and status == "active":
            self.set_document(sha256, "inactive", -1)

    def set_document(self, sha256: str, status: str, step: int) -> None:
        """Set a document's status and move its records' reference counts by ``step``, logging the
        records that become active or retired (what the next snapshot adds or drops)."""
        self.db.execute("UPDATE documents SET status=? WHERE sha256=?", (status, sha256))
        self._log("document", [sha256], "added" if step > 0 else "retired")
        self.db.execute(
            "UPDATE records SET refs = refs + ? WHERE hash IN (SELECT record_hash FROM doc_records WHERE doc_sha256=?)",
            (step, sha256),
        )
        # the records whose count just crossed zero, one way or the other
        edge = 1 if step > 0 else 0
        crossed = [
            row[0]
            for row in self.db.execute(
                "SELECT r.hash FROM records r JOIN doc_records d ON d.record_hash = r.hash "
                "WHERE d.doc_sha256=? AND r.refs=?",
                (sha256, edge),
            )
        ]
        self._log("record", crossed, "added" if step > 0 else "retired")

    def _log(self, item: str, keys: Iterable[str], change: str) -> None:
        self.db.executemany(
            "INSERT INTO changes(item, key, change) VALUES (?,?,?)", ((item, key, change) for key in keys)
        )

    # --- reading -----------------------------------------------------------------------------
    def last_seq(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def changes_since(self, seq: int) -> Delta:
        """The net change after ``seq``: what is active now and was not then, and the reverse."""
        first: dict[tuple[str, str], str] = {}
        last = seq
        for number, item, key, change in self.db.execute(
            "SELECT seq, item, key, change FROM changes WHERE seq > ? ORDER BY seq", (seq,)
        ):
            first.setdefault((item, key), change)
            last = number
        records = [key for (item, key) in first if item == "record"]
        documents = [key for (item, key) in first if item == "document"]
        live_records = self._active(records, "SELECT hash FROM records WHERE refs > 0 AND hash IN ({})")
        live_docs = self._active(documents, "SELECT sha256 FROM documents WHERE status='active' AND sha256 IN ({})")

        def net(keys: list[str], item: str, live: set[str]) -> tuple[list[str], list[str]]:
            added = sorted(k for k in keys if first[(item, k)] == "added" and k in live)
            retired = sorted(k for k in keys if first[(item, k)] == "retired" and k not in live)
            return added, retired

        added, retired = net(records, "record", live_records)
        docs_added, docs_retired = net(documents, "document", live_docs)
        return Delta(last, added, retired, docs_added, docs_retired)

    def _active(self, keys: list[str], query: str) -> set[str]:
        live: set[str] = set()
        for i in range(0, len(keys), BATCH):
            part = keys[i : i + BATCH]
            live.update(row[0] for row in self.db.execute(query.format(",".join("?" * len(part))), part))
        return live

    def active_record_hashes(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT hash FROM records WHERE refs > 0 ORDER BY hash")]

    def active_documents(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT sha256 FROM documents WHERE status='active' ORDER BY sha256")]

    def record_facts(self, hashes: Sequence[str]) -> list[tuple[str, str, int | None]]:
        """(hash, format, tokens) of each record."""
        return self._select(hashes, "SELECT hash, format, tokens FROM records WHERE hash IN ({})")

    def document_facts(self, shas: Sequence[str]) -> list[dict[str, Any]]:
        """What a snapshot's per-source statistics say of each document."""
        rows = self._select(shas, "SELECT sha256, path, format, records, tokens FROM documents WHERE sha256 IN ({})")
        return [dict(zip(("sha256", "path", "format", "records", "tokens"), row)) for row in sorted(rows)]

    def _select(self, keys: Sequence[str], query: str) -> list[tuple]:
        out: list[tuple] = []
        for i in range(0, len(keys), BATCH):
            part = list(keys[i : i + BATCH])
            out.extend(self.db.execute(query.format(",".join("?" * len(part))), part).fetchall())
        return out

    def records(self, hashes: Iterable[str]) -> list[Record]:
        out = []
        for h in hashes:
            row = self.db.execute("SELECT kind, body, format FROM records WHERE hash=?", (h,)).fetchone()
            if row is None:
                raise KeyError(h)
            out.append(Record(row[0], json.loads(row[1]), format=row[2]))
        return out

    def versions(self, rel: str) -> list[tuple[str, str]]:
        """(sha256, status) of every content the path has had, oldest first."""
        return [
            tuple(row)
            for row in self.db.execute("SELECT sha256, status FROM versions WHERE path=? ORDER BY seen_at", (rel,))
        ]

    def counts(self) -> dict[str, int]:
        docs = self.db.execute("SELECT COUNT(*) FROM documents WHERE status='active'").fetchone()[0]
        records = self.db.execute("SELECT COUNT(*) FROM records WHERE refs > 0").fetchone()[0]
        return {"documents": docs, "records": records}

    # --- snapshots (cut in appliance/data/snapshot.py) -----------------------------------------
    def head_snapshot(self) -> dict[str, Any] | None:
        """The snapshot cut from the most recent state of this store."""
        row = self.db.execute(
            "SELECT id, parent, seq, depth, val_fraction, setsum, stats FROM snapshots "
            "ORDER BY seq DESC, created DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        keys = ("id", "parent", "seq", "depth", "val_fraction", "setsum", "stats")
        head = dict(zip(keys, row))
        head["stats"] = json.loads(head["stats"])
        return head

    def remember_snapshot(
        self,
        snapshot_id: str,
        parent: str | None,
        seq: int,
        depth: int,
        val_fraction: float,
        setsum: str,
        stats: dict[str, Any],
    ) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO snapshots VALUES (?,?,?,?,?,?,?,?)",
            (snapshot_id, parent, seq, depth, val_fraction, setsum, json.dumps(stats), time.time()),
        )

    def forget_snapshot(self, snapshot_id: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))
