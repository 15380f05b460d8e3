"""A collection's passage index (SQLite FTS5, ranked by BM25): what the endpoint answers from.

One index file per collection holds the passages of the collection's documents. It is
derived data: the store is the truth, so an index that is missing, corrupt or of another
schema version is never repaired or migrated in place. Each of those cases raises
:class:`IndexCorrupt`, and the caller rebuilds it from the store with :meth:`Index.rebuild`.

* ``documents``: one row per indexed document (sha256 of its bytes, inbox path, passage
  count), so counts and listings never scan passages.
* ``passages``: each passage's text, by document and ordinal.
* ``passages_fts``: FTS5 over ``passages.text`` with external content, kept in step by
  triggers in the writer's own transaction. External content rather than contentless:
  the text is stored once, search reads it back by rowid, and deleting rows from a
  contentless table needs ``contentless_delete`` (SQLite 3.43; the team's machines run 3.40).

Writes touch only the changed document's rows and FTS5 merges its segments a little at a
time (automerge), so adding a document costs about the same whatever the size of the
index (benchmarks/index_update.py). Nothing here runs ``optimize`` except a full rebuild.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.contract.errors import DataError
from appliance.data.sentences import split_sentences
from appliance.home import sqlitedb
from appliance.home.fsutil import fsync_dir

SCHEMA_VERSION = 3  # bump on any change (the tokenizer included): older files are then rebuilt
# unicode61 folds case for every script and, with remove_diacritics 2, matches "cafe" to
# "café"; porter stems English words on top ("reimbursed" finds "reimbursement"). On the
# 19 paraphrased handbook questions in tests/test_index.py (17 passages of three sentences),
# recall@3 was 1.00 with porter and 0.84 without it (recall@1 0.95 and 0.79), so porter stays;
# over the 48 passages of one sentence it is still 1.00 with porter. Other scripts pass
# through porter unchanged (diacritics are removed from Latin letters only); Chinese and
# Japanese text has no spaces, so a run of such characters matches only as a whole.
TOKENIZER = "porter unicode61 remove_diacritics 2"
SCHEMA = (
    """CREATE TABLE documents (
        sha256 TEXT PRIMARY KEY,
        path TEXT NOT NULL,                 -- relative to the inbox
        passages INTEGER NOT NULL,
        indexed_at REAL NOT NULL
    )""",
    "CREATE INDEX documents_by_path ON documents(path)",
    """CREATE TABLE passages (
        id INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        ordinal INTEGER NOT NULL,
        text TEXT NOT NULL,
        tokens INTEGER NOT NULL,            -- words as the index splits them (not model tokens)
        UNIQUE (sha256, ordinal)
    )""",
    f"""CREATE VIRTUAL TABLE passages_fts USING fts5(
        text, content='passages', content_rowid='id', tokenize='{TOKENIZER}'
    )""",
    """CREATE TRIGGER passages_added AFTER INSERT ON passages BEGIN
        INSERT INTO passages_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    # FTS5 must be told the old text to remove a row's terms; a passage's vector goes with it
    """CREATE TRIGGER passages_removed AFTER DELETE ON passages BEGIN
        INSERT INTO passages_fts(passages_fts, rowid, text) VALUES ('delete', old.id, old.text);
        DELETE FROM vectors WHERE id = old.id;
    END""",
    # Dense vectors of passages from the embedding model IT configured ([grounding]
    # embedding_model), float32 little-endian, filled by the endpoint in the background.
    """CREATE TABLE vectors (
        id INTEGER PRIMARY KEY,             -- the passage's id
        model TEXT NOT NULL,                -- which embedding model made it (file name, size, mtime)
        vector BLOB NOT NULL
    )""",
)  # passages are never updated in place (a new version is a delete and an insert): no UPDATE trigger

# Queries are cut down before they reach FTS5: a long paste costs no more than a paragraph.
MAX_QUERY_CHARS = 4_000
MAX_TERMS = 64
WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, as unicode61 splits text
STOP_WORDS = frozenset(
    """
a about after all also am an and any are as at be been before but by can could did do does
for from had has have how i if in into is it its me my no not of on or our shall should so
than that the their them then there these they this to was we were what when where which
who whom why will with would you your
""".split()
)
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
CJK_SENTENCE_END = re.compile(r"(?<=[。！？])\s+")  # split_sentences knows Latin punctuation only
# One sentence a passage: on the team's handbook the answering sentence is among the 3
# retrieved for 0.80 of paraphrased probes (0.83 for passages of three sentences) in a third
# of the prompt, and the 135M default, trained and served so, answered 0.40 of the probes
# from its sources against 0.26 (benchmarks/RESULTS.md, run I), with less time to first token.
PASSAGE_SENTENCES = 1
PASSAGE_WORDS = 200  # longest passage split_passages makes
CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT (and its extended codes), SQLITE_NOTADB


class IndexCorrupt(DataError):
    """The index file is missing, unreadable or of another schema: rebuild it from the store."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"passage index {path}: {reason}; rebuild it from the collection's store")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Hit:
    sha256: str
    path: str
    ordinal: int
    text: str
    score: float  # BM25, positive, higher is better


@dataclass(frozen=True)
class IndexedDocument:
    sha256: str
    path: str
    passages: int


def query_terms(query: str) -> list[str]:
    """The question's distinct words, lower-cased, stop words dropped unless nothing else is left."""
    words = list(dict.fromkeys(w.lower() for w in WORD.findall(query[:MAX_QUERY_CHARS])))
    return ([w for w in words if w not in STOP_WORDS] or words)[:MAX_TERMS]


def match_expression(query: str) -> str:
    """An FTS5 MATCH expression that matches any of the question's words.

    Each word is quoted as an FTS5 string and holds only letters and digits, so nothing a
    person types (quotes, NEAR, AND/OR/NOT, *, ^, :, column filters) is read as syntax.
    """
    return " OR ".join(f'"{term}"' for term in query_terms(query))


FUSION_DEPTH = 20  # passages each ranking brings to the fusion
Nearest = Callable[["Index", str], list[Hit]]  # the passages nearest a question by vectors, best first


def retrieve(
    index: Index, query: str, k: int, dense: Nearest | None = None, floor: float = 0.0
) -> tuple[list[Hit], str]:
    """BM25's best passages (scoring above ``floor``), fused with the nearest by vectors where
    there are any, and how they were found: the endpoint and the RAFT conversations both
    retrieve through here, so the model is trained on what it is served."""
    lexical = [h for h in index.search(query, limit=FUSION_DEPTH if dense else k) if h.score > floor]
    nearest = dense(index, query) if dense else []
    if not nearest:
        return lexical[:k], "bm25"
    return fuse([lexical, nearest], k), "bm25+dense"


def fuse(rankings: list[list[Hit]], limit: int, k: int = 60) -> list[Hit]:
    """Reciprocal rank fusion (Cormack et al. 2009): each passage scores the sum of 1/(k + rank)
    over the rankings that hold it, so BM25 and dense retrieval need no common score scale."""
    scores: dict[tuple[str, int], float] = {}
    first: dict[tuple[str, int], Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = (hit.sha256, hit.ordinal)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
            first.setdefault(key, hit)
    ordered = sorted(scores, key=lambda key: (-scores[key], first[key].path, key[1]))[:limit]
    return [Hit(first[key].sha256, first[key].path, key[1], first[key].text, round(scores[key], 6)) for key in ordered]


def split_passages(text: str, sentences: int = PASSAGE_SENTENCES) -> list[str]:
    """Paragraphs cut into runs of ``sentences`` sentences (at most PASSAGE_WORDS words); a
    heading or label (a short paragraph with no sentence end) joins the paragraph under it."""
    out: list[str] = []
    carry = ""
    for block in re.split(r"\n\s*\n", text):
        block = f"{carry} " + " ".join(re.sub(r"(?m)^\s*#+\s", "", block).split())  # markdown heading marks
        carry = ""
        if not SENTENCE_END.search(block.strip() + " ") and len(block.split()) <= 20:
            carry = block.strip()
            continue
        parts = [part for s in split_sentences(block.strip()) for part in CJK_SENTENCE_END.split(s)]
        for i in range(0, len(parts), sentences):
            words = " ".join(parts[i : i + sentences]).split()
            out.extend(" ".join(words[j : j + PASSAGE_WORDS]) for j in range(0, len(words), PASSAGE_WORDS))
    return out + ([carry] if carry else [])


@contextmanager
def _guarded(path: Path) -> Iterator[None]:
    """SQLite's corruption errors become IndexCorrupt; locks, full disks and the like stay as they are."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        if getattr(error, "sqlite_errorcode", 0) & 0xFF in CORRUPT_CODES:
            raise IndexCorrupt(path, str(error)) from error
        raise


class Index:
    def __init__(self, path: Path, any_thread: bool = False, create: bool = False):
        """Open the index at ``path``; ``create`` makes a new one where there is none (otherwise a
        missing file is IndexCorrupt: a collection that has a store but no index needs a rebuild).
        ``any_thread``: the caller guarantees one thread at a time (a long-lived ingestor)."""
        self.path = path
        if not create and not path.exists():
            raise IndexCorrupt(path, "missing")
        path.parent.mkdir(parents=True, exist_ok=True)
        with _guarded(path):
            # secure_delete: a superseded passage's text must not linger in free pages
            self.db = sqlitedb.connect(path, any_thread, lambda db: db.execute("PRAGMA secure_delete=ON"))
        try:
            with _guarded(path):
                self._upgrade(create)
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing writes: a document's old passages go in the same commit its new ones come."""
        with _guarded(self.path):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # some errors (a full disk, an interrupt) roll back by themselves
                    self.db.execute("ROLLBACK")
                raise

    def _upgrade(self, create: bool) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        tables = self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if version or tables or not create:
            raise IndexCorrupt(
                self.path, f"schema version {version}, not {SCHEMA_VERSION}" if version else "not a passage index"
            )
        with self.transaction():  # (executescript would commit: it cannot run inside one)
            for statement in SCHEMA:
                self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- writing ---------------------------------------------------------------------------
    def add_document(self, sha256: str, path: str, passages: list[str]) -> int:
        """Index a document's passages, replacing any this sha256 had (the same content may be re-added)."""
        with self.transaction():
            self._remove(sha256)
            self._insert(sha256, path, passages)
        return len(passages)

    def supersede(self, path: str, sha256: str, passages: list[str]) -> int:
        """A new version of the file at ``path``: earlier versions' passages go, this one's come,
        in one transaction. Returns how many passages were removed."""
        with self.transaction():
            old = [
                row[0]
                for row in self.db.execute("SELECT sha256 FROM documents WHERE path=? AND sha256 != ?", (path, sha256))
            ]
            removed = sum(self._remove(sha) for sha in old)
            self._remove(sha256)
            self._insert(sha256, path, passages)
        return removed

    def remove_document(self, sha256: str) -> int:
        """Forget a document; returns how many passages went (0 if it was not indexed)."""
        with self.transaction():
            return self._remove(sha256)

    def _remove(self, sha256: str) -> int:
        removed = self.db.execute("DELETE FROM passages WHERE sha256=?", (sha256,)).rowcount
        self.db.execute("DELETE FROM documents WHERE sha256=?", (sha256,))
        return removed

    def _insert(self, sha256: str, path: str, passages: list[str]) -> None:
        self.db.executemany(
            "INSERT INTO passages(sha256, path, ordinal, text, tokens) VALUES (?,?,?,?,?)",
            ((sha256, path, i, text, len(WORD.findall(text))) for i, text in enumerate(passages)),
        )
        self.db.execute("INSERT INTO documents VALUES (?,?,?,?)", (sha256, path, len(passages), time.time()))

    # --- reading ---------------------------------------------------------------------------
    def search(self, query: str, limit: int = 5, documents: set[str] | None = None) -> list[Hit]:
        """The passages that best match the question's words, best first; ``documents``
        restricts the search to those sha256s. Any text is a valid query."""
        expression = match_expression(query)
        if not expression or limit <= 0 or (documents is not None and not documents):
            return []
        sql = (
            "SELECT p.sha256, p.path, p.ordinal, p.text, bm25(passages_fts) AS rank "
            "FROM passages_fts JOIN passages p ON p.id = passages_fts.rowid WHERE passages_fts MATCH ?"
        )
        params: list[object] = [expression]
        if documents is not None:  # one JSON parameter: no limit on bound variables
            sql += " AND p.sha256 IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(sorted(documents)))
        sql += " ORDER BY rank, p.path, p.ordinal LIMIT ?"
        params.append(min(int(limit), 1_000))
        with _guarded(self.path):
            rows = self.db.execute(sql, params).fetchall()
        return [Hit(sha, path, ordinal, text, -rank) for sha, path, ordinal, text, rank in rows]

    # --- dense vectors (optional: only where an embedding model is configured) --------------
    def unembedded(self, model: str, limit: int = 64) -> list[tuple[int, str]]:
        """(id, text) of passages with no vector from ``model`` yet."""
        sql = (
            "SELECT p.id, p.text FROM passages p LEFT JOIN vectors v ON v.id = p.id AND v.model = ? "
            "WHERE v.id IS NULL ORDER BY p.id LIMIT ?"
        )
        with _guarded(self.path):
            return self.db.execute(sql, (model, limit)).fetchall()

    def embed_missing(self, model: str, embed: Callable[[list[str]], Any], batch: int = 64) -> None:
        """Vectors from ``embed`` (texts -> vectors) for every passage with none from ``model`` yet."""
        while todo := self.unembedded(model, batch):
            vectors = embed([text for _, text in todo])
            self.put_vectors(model, [(pid, np.asarray(v)) for (pid, _), v in zip(todo, vectors)])

    def put_vectors(self, model: str, rows: list[tuple[int, np.ndarray]]) -> None:
        """Store vectors (a passage deleted meanwhile is skipped: its vector would be an orphan)."""
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO vectors(id, model, vector) SELECT ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM passages WHERE id = ?)",
                ((pid, model, np.asarray(v, dtype="<f4").tobytes(), pid) for pid, v in rows),
            )

    def nearest(self, model: str, vector: np.ndarray, limit: int = 5) -> list[Hit]:
        """The passages whose vectors are closest to ``vector`` (cosine), best first.

        A scan in numpy, written by hand: the sqlite-vec extension would index the vectors,
        but it is one more native library to ship and a collection's few thousand passages
        scan in milliseconds."""
        with _guarded(self.path):
            rows = self.db.execute("SELECT id, vector FROM vectors WHERE model = ?", (model,)).fetchall()
        if not rows or limit <= 0:
            return []
        matrix = np.stack([np.frombuffer(row[1], dtype="<f4") for row in rows])
        query = np.asarray(vector, dtype=np.float32)
        scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * (np.linalg.norm(query) or 1.0) + 1e-12)
        best = np.argsort(-scores, kind="stable")[:limit]
        # Texts only for the best few: a scan reads vectors, not every passage's text.
        ids = [rows[i][0] for i in best]
        with _guarded(self.path):
            found = {
                row[0]: row[1:]
                for row in self.db.execute(
                    f"SELECT id, sha256, path, ordinal, text FROM passages WHERE id IN ({','.join('?' * len(ids))})",
                    ids,
                )
            }
        hits = []
        for i in best:
            if (row := found.get(rows[i][0])) is not None:  # None: deleted since the scan
                sha256, path, ordinal, text = row
                hits.append(Hit(sha256, path, ordinal, text, float(scores[i])))
        return hits

    def count(self) -> dict[str, int]:
        with _guarded(self.path):
            docs, passages = self.db.execute("SELECT COUNT(*), COALESCE(SUM(passages), 0) FROM documents").fetchone()
        return {"documents": docs, "passages": passages}

    def documents(self) -> list[IndexedDocument]:
        with _guarded(self.path):
            rows = self.db.execute("SELECT sha256, path, passages FROM documents ORDER BY path, sha256").fetchall()
        return [IndexedDocument(*row) for row in rows]

    def verify(self) -> None:
        """Read every page (O(index): at start-up, not per request); raises IndexCorrupt."""
        with _guarded(self.path):
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise IndexCorrupt(self.path, "; ".join(problems[:3]))
            self.db.execute("INSERT INTO passages_fts(passages_fts, rank) VALUES ('integrity-check', 1)")

    # --- rebuilding from the store -------------------------------------------------------------
    @classmethod
    def rebuild(cls, path: Path, documents: Iterable[tuple[str, str, list[str]]], any_thread: bool = False) -> Index:
        """Write a fresh index from (sha256, path, passages) triples and put it in place of
        whatever is at ``path`` in one rename. Close every other connection to it first."""
        tmp = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
        for stale in _with_sidecars(tmp):
            stale.unlink(missing_ok=True)
        with cls(tmp, create=True) as fresh, fresh.transaction():
            for sha256, rel, passages in documents:
                fresh._remove(sha256)
                fresh._insert(sha256, rel, passages)
            # a rebuild is O(index) anyway: merge all segments into one for the fastest reads
            fresh.db.execute("INSERT INTO passages_fts(passages_fts) VALUES ('optimize')")
        # closing the last connection checkpointed the WAL into the file and removed it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for stale in _with_sidecars(path)[1:]:  # an old WAL would be replayed onto the new file
            stale.unlink(missing_ok=True)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return cls(path, any_thread=any_thread)


def _with_sidecars(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
