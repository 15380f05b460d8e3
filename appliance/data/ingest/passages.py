"""The collection's passage index kept in step with its store (issue 18).

The store is the truth; the index (``store/passages.db``, :mod:`appliance.data.index`) holds
the passages of every prose document that is some inbox path's current version. :func:`sync`
compares the two document lists and adds or removes only the difference, so it costs the
changed documents' passages, not the collection's size: ingest calls it after every batch,
and ``forget`` removes a document's passages in the same step that removes its records. A
missing or corrupt index is rebuilt whole from the store (:func:`rebuild`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from appliance.data.index import Index, IndexCorrupt, split_passages
from appliance.data.ingest import pdf, word
from appliance.data.ingest.kept import document_text
from appliance.data.ingest.store import Store
from appliance.home.paths import Home

log = logging.getLogger("appliance.index")
# The formats ingest reads as prose (conversations are answers, not sources to cite).
DOCUMENT_FORMATS = ("text", "markdown", pdf.FORMAT, word.FORMAT)
CURRENT_DOCUMENTS = f"""
    SELECT v.sha256, v.path FROM versions v JOIN documents d ON d.sha256 = v.sha256
    WHERE v.status = 'current' AND d.status = 'active'
      AND d.format IN ({",".join("?" * len(DOCUMENT_FORMATS))})
    ORDER BY v.path"""


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)  # inbox paths
    removed: list[str] = field(default_factory=list)
    passages_added: int = 0
    passages_removed: int = 0
    rebuilt: str | None = None  # why the whole index was written again


def current_documents(store: Store) -> dict[str, str]:
    """sha256 -> inbox path of every prose document some path holds now."""
    return dict(store.db.execute(CURRENT_DOCUMENTS, DOCUMENT_FORMATS).fetchall())


def passages_of(home: Home, sha256: str, store: Store | None = None) -> list[str]:
    text, _ = document_text(home, sha256, store)
    return split_passages(text) if text else []


def sync(home: Home, store: Store | None = None) -> SyncReport:
    """Bring the index in line with the store: O(changed documents)."""
    if store is None:
        with Store(home.store_db) as own:
            return sync(home, own)
    wanted = current_documents(store)
    try:
        index = Index(home.passage_index, create=not home.passage_index.exists())
    except IndexCorrupt as problem:
        return rebuild(home, store, problem.reason)
    report = SyncReport()
    with index:
        try:
            have = {doc.sha256: doc.path for doc in index.documents()}
            for sha, path in have.items():
                if sha not in wanted:
                    report.passages_removed += index.remove_document(sha)
                    report.removed.append(path)
            for sha, path in wanted.items():
                if sha not in have:
                    report.passages_added += index.add_document(sha, path, passages_of(home, sha, store))
                    report.added.append(path)
        except IndexCorrupt as problem:
            index.close()
            return rebuild(home, store, problem.reason)
    return report


def rebuild(home: Home, store: Store | None = None, reason: str = "asked for", quiet: bool = False) -> SyncReport:
    """Write the whole index again from the store, in place of the old one in one rename (a log
    line says why unless ``quiet``)."""
    if store is None:
        with Store(home.store_db) as own:
            return rebuild(home, own, reason, quiet)
    if not quiet:
        log.warning("passage index %s: %s; rebuilding it from the store", home.passage_index, reason)
    wanted = current_documents(store)
    triples = [(sha, path, passages_of(home, sha, store)) for sha, path in wanted.items()]
    Index.rebuild(home.passage_index, triples).close()
    return SyncReport(added=list(wanted.values()), passages_added=sum(len(t[2]) for t in triples), rebuilt=reason)


def remove(home: Home, sha256: str) -> int:
    """Forget's step, after the store has let the document go: how many passages it had in the
    index, which is then written afresh from the store. Not a row delete: FTS5 keeps a deleted
    row's words in its segments until they merge, and a forgotten document's words must not
    stay in the file; a fresh file holds nothing of it (O(index), as forget's VACUUM of the
    store is). Readers open the index per query, so the next one reads the new file."""
    had = 0
    if home.passage_index.exists():
        try:
            with Index(home.passage_index) as index:
                had = next((d.passages for d in index.documents() if d.sha256 == sha256), 0)
        except IndexCorrupt:
            pass  # rebuilt below all the same
    if had or home.passage_index.exists():
        rebuild(home, reason=f"forget {sha256[:12]}", quiet=True)
    return had


def counts(home: Home) -> dict[str, int] | None:
    """Documents and passages in the index, or None when there is none (yet)."""
    if not home.passage_index.exists():
        return None
    try:
        with Index(home.passage_index) as index:
            return index.count()
    except IndexCorrupt:
        return None
