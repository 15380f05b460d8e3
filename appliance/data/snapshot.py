"""Stage 3, snapshot: an immutable manifest of the records a run trains on.

A manifest is stored as a parent pointer plus the records added and retired since
that parent (taken from the store's change log), so cutting one costs work
proportional to the change, not to the data. Every ``CHAIN_LIMIT`` cuts, or when
the validation fraction changes, a full manifest is written instead, so loading
never walks a long chain.

The id is a hash of the record set (an order-free sum of the record hashes, kept
up to date through the deltas), so the same data always gives the same snapshot.
Which records are held out for validation depends only on each record's hash, so
a record never moves between train and validation as data grows.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.contract.errors import DataError
from appliance.data.ingest.records import Record
from appliance.data.ingest.store import Store
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.paths import Home, RunDir

CHAIN_LIMIT = 50
SETSUM_MOD = 1 << 256


@dataclass(frozen=True)
class Snapshot:
    id: str
    train: list[str]
    val: list[str]
    path: Path
    manifest: Path


def is_validation(record_hash: str, fraction: float) -> bool:
    return int(record_hash[:8], 16) / 0xFFFFFFFF < fraction


def cut(home: Home, val_fraction: float) -> Snapshot:
    """Cut a snapshot of every active record (or find the identical one) and load it."""
    return load(home, cut_id(home, val_fraction))


def cut_id(home: Home, val_fraction: float) -> str:
    """Write the manifest for the data as it is now, unless it exists; return its id."""
    with Store(home.store_db) as store:
        head = store.head_snapshot()
        with store.transaction(write=False):  # the changes and their sequence number, consistently
            if _extends(home, head, val_fraction):
                manifest = _delta_manifest(store, head, val_fraction)  # type: ignore[arg-type]
            else:
                manifest = _full_manifest(store, val_fraction)
        _check_usable(home, manifest["stats"])
        path = home.manifest(manifest["id"])
        if not path.exists():
            write_json_atomic(path, manifest)
        store.remember_snapshot(
            manifest["id"],
            manifest["parent"],
            manifest["store_seq"],
            manifest["depth"],
            val_fraction,
            manifest["setsum"],
            manifest["stats"],
        )
    return manifest["id"]


def load(home: Home, snapshot_id: str) -> Snapshot:
    """The full record lists, rebuilt from the chain of manifests and checked against the id's sum."""
    chain = _chain(home, snapshot_id)
    top = chain[-1]
    if "train" in top:  # a full manifest from before deltas (schema 1)
        return Snapshot(top["id"], top["train"], top["val"], home.snapshot(snapshot_id), home.manifest(snapshot_id))
    members = _replay(chain, "records", "added", "retired", key=None)
    if f"{_setsum(members):064x}" != top["setsum"]:
        raise DataError(
            f"snapshot {snapshot_id}: its manifests do not add up to its record set; "
            f"a file under {home.snapshots} was edited or lost"
        )
    ordered = sorted(members)
    fraction = top["val_fraction"]
    val = [h for h in ordered if is_validation(h, fraction)]
    train = [h for h in ordered if not is_validation(h, fraction)]
    return Snapshot(snapshot_id, train, val, home.snapshot(snapshot_id), home.manifest(snapshot_id))


def stats(home: Home, snapshot_id: str) -> dict[str, Any]:
    """Records, train/validation, tokens, per format, and per source document."""
    chain = _chain(home, snapshot_id)
    sources = _replay(chain, "sources", "sources_added", "sources_retired", key="sha256")
    return {**chain[-1]["stats"], "by_source": sorted(sources.values(), key=lambda s: (s["path"], s["sha256"]))}


def records(home: Home, hashes: list[str]) -> list[Record]:
    with Store(home.store_db) as store:
        return store.records(hashes)


# --- cutting --------------------------------------------------------------------------------


def _extends(home: Home, head: dict[str, Any] | None, val_fraction: float) -> bool:
    """Whether the next manifest can be a delta on ``head``."""
    return (
        head is not None
        and head["depth"] < CHAIN_LIMIT
        and head["val_fraction"] == val_fraction
        and home.manifest(head["id"]).exists()
    )


def _full_manifest(store: Store, val_fraction: float) -> dict[str, Any]:
    seq = store.last_seq()
    hashes = store.active_record_hashes()
    documents = store.active_documents()
    counted = _count(Counter(), store.record_facts(hashes), +1, val_fraction)
    setsum = _setsum(hashes)
    return {
        **_header(setsum, counted, len(documents), val_fraction, seq, parent=None, depth=0),
        "records": hashes,
        "sources": store.document_facts(documents),
    }


def _delta_manifest(store: Store, head: dict[str, Any], val_fraction: float) -> dict[str, Any]:
    delta = store.changes_since(head["seq"])
    counted = Counter(_flatten(head["stats"]))
    counted = _count(counted, store.record_facts(delta.added), +1, val_fraction)
    counted = _count(counted, store.record_facts(delta.retired), -1, val_fraction)
    setsum = (int(head["setsum"], 16) + _setsum(delta.added) - _setsum(delta.retired)) % SETSUM_MOD
    documents = head["stats"]["documents"] + len(delta.documents_added) - len(delta.documents_retired)
    return {
        **_header(setsum, counted, documents, val_fraction, delta.seq, parent=head["id"], depth=head["depth"] + 1),
        "added": delta.added,
        "retired": delta.retired,
        "sources_added": store.document_facts(delta.documents_added),
        "sources_retired": delta.documents_retired,
    }


def _header(
    setsum: int, counted: Counter, documents: int, val_fraction: float, seq: int, parent: str | None, depth: int
) -> dict[str, Any]:
    records = counted["records"]
    snapshot_id = hashlib.sha256(f"{setsum:064x}/{records}/{val_fraction!r}".encode()).hexdigest()[:16]
    by_format = {key[len("format:") :]: n for key, n in sorted(counted.items()) if key.startswith("format:") and n}
    return {
        "id": snapshot_id,
        "created": time.time(),
        "parent": parent,
        "depth": depth,
        "store_seq": seq,
        "val_fraction": val_fraction,
        "setsum": f"{setsum:064x}",
        "stats": {
            "records": records,
            "train": records - counted["val"],
            "val": counted["val"],
            "tokens": counted["tokens"],
            "untokenized": counted["untokenized"],
            "documents": documents,
            "by_format": by_format,
        },
    }


def _count(counted: Counter, facts: list[tuple[str, str, int | None]], sign: int, val_fraction: float) -> Counter:
    """Add (sign +1) or take away (-1) records' contribution to the statistics."""
    for record_hash, fmt, tokens in facts:
        counted["records"] += sign
        counted["val"] += sign * is_validation(record_hash, val_fraction)
        counted[f"format:{fmt or 'unknown'}"] += sign
        if tokens is None:
            counted["untokenized"] += sign
        else:
            counted["tokens"] += sign * tokens
    return counted


def _flatten(stats: dict[str, Any]) -> dict[str, int]:
    """A parent's stats back into the counters ``_count`` updates."""
    flat = {key: stats[key] for key in ("records", "val", "tokens", "untokenized")}
    flat.update({f"format:{fmt}": n for fmt, n in stats["by_format"].items()})
    return flat


def _setsum(hashes: Any) -> int:
    return sum(int(h, 16) for h in hashes) % SETSUM_MOD


def _check_usable(home: Home, stats: dict[str, Any]) -> None:
    if not stats["records"]:
        raise DataError(f"{home.inbox}: no usable training data; add files to the inbox and run 'appliance ingest'")
    if not stats["train"]:
        raise DataError(f"{home.inbox}: every record fell into validation; add more data")


# --- loading ----------------------------------------------------------------------------------


def _chain(home: Home, snapshot_id: str) -> list[dict[str, Any]]:
    """Manifests from the last full one to ``snapshot_id``, oldest first."""
    chain: list[dict[str, Any]] = []
    current: str | None = snapshot_id
    while current is not None:
        manifest = home.manifest(current)
        if not manifest.exists():
            missing = "not found" if current == snapshot_id else f"its parent {current} is missing"
            raise DataError(f"snapshot {snapshot_id}: {missing} under {home.snapshots}")
        data = read_json(manifest)
        chain.append(data)
        if "records" in data or "train" in data or len(chain) > CHAIN_LIMIT + 1:
            break
        current = data["parent"]
    return chain[::-1]


def _replay(chain: list[dict[str, Any]], full: str, added: str, retired: str, key: str | None) -> Any:
    """Apply a chain's deltas to its full manifest: a set of hashes (key None) or a dict by ``key``."""
    items: dict[str, Any] = {}
    for manifest in chain:
        if full in manifest:
            items = {(entry if key is None else entry[key]): entry for entry in manifest[full]}
        for entry in manifest.get(added, []):
            items[entry if key is None else entry[key]] = entry
        for gone in manifest.get(retired, []):
            items.pop(gone, None)
    return set(items) if key is None else items


def run_snapshot(run: RunDir) -> str | None:
    """The snapshot an existing run trains on (a resumed run keeps its own data): its
    ``train.json``, else its latest complete checkpoint's state."""
    if run.train_json.exists():
        return read_json(run.train_json)["snapshot"]
    found = run.checkpoint_dirs()
    return read_json(run.checkpoint_state(found[-1]))["snapshot"] if found else None
