"""A document's text as ingest extracted it: the study stage and the passage index read it.

Ingest keeps each prose document's whole text in ``store/texts/<sha256>.txt``. A home
ingested before the text was kept has only the chunk records: they are joined here in the
order ingest stored them, each neighbour's shared overlap written once.
"""

from __future__ import annotations

from appliance.data.ingest.store import Store
from appliance.home.paths import Home

# Two chunk records of one document share up to chunk_overlap tokens; a shorter common run
# of characters between neighbours is taken for chance, not for the overlap.
MIN_OVERLAP_CHARS = 16


def document_text(home: Home, sha256: str, store: Store | None = None) -> tuple[str | None, str]:
    """The document's text and where it came from: "text" (kept), "chunks" (joined) or "none"."""
    kept = home.document_text(sha256)
    if kept.is_file():
        return kept.read_text(encoding="utf-8"), "text"
    if store is None:
        with Store(home.store_db) as own:
            return document_text(home, sha256, own)
    hashes = [
        row[0]
        for row in store.db.execute("SELECT record_hash FROM doc_records WHERE doc_sha256=? ORDER BY rowid", (sha256,))
    ]
    bodies = [r.body.get("text") for r in store.records(hashes) if r.kind == "text"]
    chunks = [c for c in bodies if isinstance(c, str) and c.strip()]  # a forgotten record has no text
    return (join_chunks(chunks), "chunks") if chunks else (None, "none")


def join_chunks(chunks: list[str]) -> str:
    text = ""
    for piece in chunks:
        shared = _overlap(text, piece)
        text = text + piece[shared:] if shared else (f"{text}\n\n{piece}" if text else piece)
    return text


def _overlap(text: str, piece: str) -> int:
    """The longest end of ``text`` that ``piece`` starts with (0 when shorter than MIN_OVERLAP_CHARS)."""
    for size in range(min(len(text), len(piece)), MIN_OVERLAP_CHARS - 1, -1):
        if text.endswith(piece[:size]):
            return size
    return 0
