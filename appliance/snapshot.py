"""Stage 3, snapshot: an immutable manifest of the records a run trains on.

The id is a hash of the record set, so cutting the same data twice gives the same
snapshot. Which records are held out for validation depends only on each record's
hash (not on order or on what else is in the set), so a record never moves between
train and validation as data grows.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .fsutil import read_json, write_json_atomic
from .ingest.records import Record
from .ingest.store import Store
from .paths import Home


@dataclass(frozen=True)
class Snapshot:
    id: str
    train: list[str]
    val: list[str]
    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"


def is_validation(record_hash: str, fraction: float) -> bool:
    return int(record_hash[:8], 16) / 0xFFFFFFFF < fraction


def cut(home: Home, val_fraction: float) -> Snapshot:
    """Cut a snapshot of every active record (or return the identical existing one)."""
    store = Store(home.store_db)
    try:
        hashes = store.active_record_hashes()
        if not hashes:
            raise DataError(f"{home.inbox}: no usable training data; add .jsonl chat files and run 'appliance ingest'")
        sources = store.sources_of(hashes)
    finally:
        store.close()
    snapshot_id = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]
    path = home.snapshot(snapshot_id)
    if (path / "manifest.json").exists():
        return load(home, snapshot_id)
    val = [h for h in hashes if is_validation(h, val_fraction)]
    train = [h for h in hashes if not is_validation(h, val_fraction)]
    if not train:
        raise DataError(f"{home.inbox}: every record fell into validation; add more data")
    write_json_atomic(path / "manifest.json", {
        "id": snapshot_id,
        "created": time.time(),
        "parent": _latest_id(home, exclude=snapshot_id),
        "val_fraction": val_fraction,
        "train": train,
        "val": val,
        "sources": sources,
        "stats": {"records": len(hashes), "train": len(train), "val": len(val), "documents": len(sources)},
    })
    return Snapshot(snapshot_id, train, val, path)


def load(home: Home, snapshot_id: str) -> Snapshot:
    manifest = home.snapshot(snapshot_id) / "manifest.json"
    if not manifest.exists():
        raise DataError(f"snapshot {snapshot_id}: not found under {home.snapshots}")
    data = read_json(manifest)
    return Snapshot(data["id"], data["train"], data["val"], manifest.parent)


def records(home: Home, hashes: list[str]) -> list[Record]:
    store = Store(home.store_db)
    try:
        return store.records(hashes)
    finally:
        store.close()


def _latest_id(home: Home, exclude: str) -> str | None:
    manifests = [p for p in home.snapshots.glob("*/manifest.json") if p.parent.name != exclude]
    if not manifests:
        return None
    return max(manifests, key=lambda p: p.stat().st_mtime).parent.name
