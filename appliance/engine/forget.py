"""``appliance forget DOCUMENT``: remove a document and every copy of its content, then retrain without it.

Right away (:func:`forget`):

* the store: the document's row and its links deleted, and the content of every
  record no other document holds replaced by a tombstone (hash, format and token
  count stay, for the next snapshot's statistics), with SQLite's ``secure_delete``
  (freed space is zeroed); then the WAL is checkpointed and the database vacuumed,
  so no old page keeps the text;
  retiring the document first logs its records' retirement, so the next snapshot
  is cut without them (records another document also holds stay: they are that
  document's content too);
* its passages in the collection's passage index (the index is written afresh from the
  store, so not even FTS5's merged-away segments keep its words): no grounded answer
  retrieves or cites it from the next request on;
* the inbox file(s) whose content it is, and any quarantined copy (by hash);
* the document's kept text and its study material (``store/texts``, ``store/study``), so the
  next run trains on no conversation written from it;
* every run whose snapshot included it (checkpoints, adapter, merged weights,
  GGUF files: all learned from it);
* every version trained on it that is not the current one (retired: files deleted,
  marked so no promote or rollback can bring it back);
* a ``forget`` job is queued: new snapshot, training from the base, the gate's
  non-regression checks (a forget run need not beat the current model), promotion,
  and then the current version, if it was trained on the document, is retired too
  (:func:`retire_versions_with`). If the gate refuses the retrain, the newest
  version not trained on the document (at worst ``base``) is promoted instead
  (:func:`fall_back`): a forgotten document never stays in the served model.

The audit log records the document's sha256 and counts, never its content or name.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from appliance.contract.errors import DataError
from appliance.data.ingest import passages
from appliance.data.ingest.store import Store
from appliance.engine.lineage import runs_with, versions_with
from appliance.home import audit, registry
from appliance.home.catalog import of_path, problem, stores
from appliance.home.fsutil import sha256_file
from appliance.home.journal import Journal
from appliance.home.paths import QUARANTINE_REASON, Home, quarantine_reason

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
TOMBSTONE = '{"forgotten": true}'


def resolve(home: Home, document: str) -> str:
    """The sha256 of ``document``: a sha256, an inbox path (relative or absolute) or any file."""
    if SHA_RE.match(document.lower()):
        return document.lower()
    with Store(home.store_db) as store:
        rel = _inbox_rel(home, document)
        if rel is not None:
            rows = store.db.execute(
                "SELECT sha256 FROM versions WHERE path=? ORDER BY status='current' DESC, seen_at DESC", (rel,)
            ).fetchall()
            if rows:
                return rows[0][0]
    path = Path(document).expanduser()
    if path.is_file():
        return sha256_file(path)
    raise DataError(f"{document}: no such document (give an inbox path, a file, or a sha256 from 'appliance audit')")


def _inbox_rel(home: Home, document: str) -> str | None:
    path = Path(document).expanduser()
    if not path.is_absolute():
        if not home.collection:
            return document
        path = home.top.inbox / document  # inbox paths are written from the top of the inbox
    try:
        return str(path.absolute().relative_to(home.inbox.absolute()))
    except ValueError:
        return None


def collection_of(home: Home, document: str) -> Home:
    """The collection ``document`` belongs to: the inbox folder of a path, else the first
    collection whose store holds the sha256 (collections never share a store)."""
    if home.collection:  # a collection's own view forgets within it
        return home
    path = Path(document).expanduser()
    inbox = home.top.inbox
    full = path if path.is_absolute() else inbox / document
    if not SHA_RE.match(document.lower()):
        try:
            name = of_path(home, full.absolute())
        except ValueError:
            return home
        return home.top.scoped(name) if problem(name) is None else home
    sha = document.lower()
    for _, scope in stores(home):
        with Store(scope.store_db) as store:
            if store.db.execute("SELECT 1 FROM versions WHERE sha256=? LIMIT 1", (sha,)).fetchone():
                return scope
    return home


def forget(home: Home, document: str, queue: bool = True) -> dict[str, Any]:
    """Remove ``document`` now and queue the retrain; return what was removed (hashes and counts)."""
    sha = resolve(home, document)
    held = _holds(home)
    if sha in held:
        raise DataError(f"document {sha[:12]} is under legal hold ({held[sha]}); it cannot be forgotten")
    removed = _remove_from_store(home, sha)
    passages_removed = passages.remove(home, sha)  # the same step: never retrievable once its records are gone
    files = _remove_files(home, sha, removed["paths"])
    studied = _remove_study(home, sha)
    _refuse_waiting_reviews(home, sha)
    runs = remove_runs(home, sha, keep=_open_runs(home))
    retired = retire_versions_with(home, sha, None)
    job_id = None
    with Journal(home.jobs_db) as journal:
        if queue and removed["known"]:
            job, _ = journal.enqueue("forget", reason=f"forget {sha[:12]}", document=sha, collection=home.collection)
            job_id = job.id
    report = {
        "document": sha,
        "known": removed["known"],
        "records_removed": removed["records"],
        "records_kept_shared": removed["shared"],
        "passages_removed": passages_removed,
        "files_removed": len(files),
        "study_files_removed": len(studied),
        "runs_removed": runs,
        "versions_retired": retired,
        "job": job_id,
    }
    if not (removed["known"] or files or studied or runs or retired):
        raise DataError(f"{document}: the store holds no such document and no copy of it was found")
    audit.append(home, "forget", **report)
    return report


def _holds(home: Home) -> dict[str, str]:
    """Legal holds: ``holds.txt`` in the home, one ``sha256 reason`` a line."""
    path = home.holds
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts and SHA_RE.match(parts[0]):
            out[parts[0]] = parts[1] if len(parts) > 1 else "legal hold"
    return out


def _remove_from_store(home: Home, sha: str) -> dict[str, Any]:
    store = Store(home.store_db)
    try:
        store.db.execute("PRAGMA secure_delete=ON")  # zero freed pages: the text must not linger in the file
        with store.transaction():
            row = store.db.execute("SELECT status FROM documents WHERE sha256=?", (sha,)).fetchone()
            if row is None:
                return {"known": False, "records": 0, "shared": 0, "paths": []}
            if row[0] == "active":
                store.set_document(sha, "forgotten", -1)  # logs the retirements the next snapshot needs
            paths = [r[0] for r in store.db.execute("SELECT path FROM versions WHERE sha256=?", (sha,))]
            mine = [r[0] for r in store.db.execute("SELECT record_hash FROM doc_records WHERE doc_sha256=?", (sha,))]
            store.db.execute("DELETE FROM doc_records WHERE doc_sha256=?", (sha,))
            shared = (
                {
                    r[0]
                    for r in store.db.execute(
                        f"SELECT DISTINCT record_hash FROM doc_records WHERE record_hash IN ({','.join('?' * len(mine))})",
                        mine,
                    )
                }
                if mine
                else set()
            )
            only = [h for h in mine if h not in shared]
            # the row stays as a tombstone with its hash, format and token count (the next snapshot's
            # statistics subtract them); its content is gone
            store.db.executemany("UPDATE records SET body=? WHERE hash=?", [(TOMBSTONE, h) for h in only])
            store.db.execute("DELETE FROM versions WHERE sha256=?", (sha,))
            store.db.execute("DELETE FROM files WHERE sha256=?", (sha,))
            store.db.execute("DELETE FROM documents WHERE sha256=?", (sha,))
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            store.db.execute("VACUUM")
        except sqlite3.OperationalError:
            pass  # another connection is reading; secure_delete already zeroed the pages
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"known": True, "records": len(only), "shared": len(shared), "paths": paths}
    finally:
        store.close()


def _remove_files(home: Home, sha: str, paths: list[str]) -> list[Path]:
    """Inbox files with this content, and quarantined copies (with their reason sidecars)."""
    removed = []
    candidates = [home.inbox / p for p in paths]
    if home.quarantine.is_dir():
        candidates += [p for p in home.quarantine.iterdir() if not p.name.endswith(QUARANTINE_REASON)]
    for path in candidates:
        try:
            if path.is_file() and not path.is_symlink() and sha256_file(path) == sha:
                sidecar = quarantine_reason(path)
                path.unlink()
                sidecar.unlink(missing_ok=True)
                removed.append(path)
        except OSError:
            continue
    return removed


def _remove_study(home: Home, sha: str) -> list[Path]:
    """The document's kept text and the study material generated from it."""
    removed = []
    for path in (home.document_text(sha), home.study_cache(sha)):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def remove_runs(home: Home, sha: str, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Delete the folders of runs whose snapshot included ``sha`` (except ``keep``: runs of jobs in
    flight, which the queued forget job removes when it promotes)."""
    gone = []
    for folder in runs_with(home, sha):
        if folder.name in keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        gone.append(folder.name)
    return gone


def _refuse_waiting_reviews(home: Home, sha: str) -> None:
    """A candidate waiting for reviewers that was trained on the document is refused first:
    its run is about to be deleted, and no vote may bring the document back."""
    doomed = {folder.name for folder in runs_with(home, sha)}
    with Journal(home.jobs_db) as journal:
        for job in journal.awaiting_review():
            if job.run_id in doomed:
                journal.finish(job.id, "refused", "a document it was trained on was forgotten")


def _open_runs(home: Home) -> set[str]:
    with Journal(home.jobs_db) as journal:
        return {j.run_id for j in journal.jobs(1000) if j.state in ("queued", "running") and j.run_id}


def retire_versions_with(home: Home, sha: str, job: int | None) -> list[str]:
    """Retire every version trained on ``sha`` except the current one (which a forget job replaces first)."""
    now = registry.current(home)
    retired = []
    for version in versions_with(home, sha):
        if version == now:
            continue
        registry.retire(home, version, f"trained on a forgotten document ({sha[:12]})")
        audit.append(home, "retire", version=version, document=sha, job=job)
        retired.append(version)
    return retired


def fall_back(home: Home, sha: str, job: int) -> str | None:
    """The retrain was refused: serve the newest version not trained on ``sha`` and retire the rest."""
    if registry.current(home) not in versions_with(home, sha):
        return None
    clean = [v["version"] for v in registry.versions(home) if v["version"] not in versions_with(home, sha)]
    if not clean:
        return None
    target = clean[-1]
    registry.promote(home, target, action="forget-fallback", job=job)
    audit.append(home, "promote", job=job, version=target, reason="forget fallback")
    retire_versions_with(home, sha, job)
    remove_runs(home, sha)
    return target
