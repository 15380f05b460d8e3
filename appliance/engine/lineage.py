"""What a version or a run was made from: its documents, its base, its adapter, its ``lineage.json``.

Promotion writes the lineage; forget asks which runs and versions learned from a
document. Both read the same facts here, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.contract.errors import DataError
from appliance.data.snapshot import run_snapshot, stats
from appliance.home import audit, registry
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, sha256_file
from appliance.home.journal import Job, Journal
from appliance.home.paths import Home


def adapter_hash(home: Home, run_id: str) -> str | None:
    path = home.run(run_id).adapter_weights
    return sha256_file(path) if path.exists() else None


def base_hash(home: Home, settings: Settings, journal: Journal) -> str:
    """sha256 over the base's weight files (cached in the journal by name, size and mtime)."""
    folder = home.base(settings.base.name)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf"))
    key = (
        "base:"
        + hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[
            :16
        ]
    )
    cached = journal.get_meta(key)
    if cached:
        return cached
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    journal.set_meta(key, digest.hexdigest())
    return digest.hexdigest()


def build_lineage(
    home: Home, settings: Settings, journal: Journal, job: Job, record: dict[str, Any], review: dict[str, Any] | None
) -> dict[str, Any]:
    """Everything that made this version, taken from the journal and the stages' outputs
    (``review``: the human review's outcome, if the version went through one)."""
    run_id = job.run_id or ""
    run = home.run(run_id)
    info = stats(home, job.snapshot or "")
    train_info = read_json(run.train_json)
    eval_report = read_json(run.eval) if run.eval.exists() else None
    times = {t["stage"] + ":" + t["state"]: t["at"] for t in journal.transitions(job.id) if t["stage"]}
    return {
        "version": record["version"],
        "job": job.id,
        "kind": job.kind,
        "run": run_id,
        "snapshot": job.snapshot,
        "collection": home.collection,
        "served_as": "adapter" if record.get("file") == registry.ADAPTER_FILE else "merged",
        "base_version": record.get("base_version"),
        "documents": [
            {"sha256": s["sha256"], "path": s["path"], "records": s.get("records")} for s in info["by_source"]
        ],
        "records": info["records"],
        "base": settings.base.name,
        "base_sha256": base_hash(home, settings, journal),
        "training": {
            "settings": train_info.get("settings"),
            "steps": train_info.get("steps"),
            "best_val_loss": train_info.get("best_val_loss"),
            "seconds": train_info.get("seconds"),
            "method": train_info.get("method"),
            "method_reason": train_info.get("method_reason"),
            # incremental: the version continued (parent), why, the chain length, the replay sample
            "incremental": train_info.get("incremental"),
        },
        "parent": (train_info.get("incremental") or {}).get("parent"),
        "adapter_sha256": adapter_hash(home, run_id),
        "gguf_sha256": record["sha256"],
        "quant": record.get("quant"),
        "gate": eval_report,
        "audit_head": audit.head(home),
        "times": times,
        "created": job.created,
        "promoted_at": time.time(),
        "review": review,
    }


def snapshot_documents(home: Home) -> Callable[[str], set[str]]:
    """sha256 of the source documents in a snapshot, by snapshot id (each snapshot read once)."""
    cache: dict[str, set[str]] = {}

    def docs(snapshot_id: str) -> set[str]:
        if snapshot_id not in cache:
            try:
                cache[snapshot_id] = {s["sha256"] for s in stats(home, snapshot_id)["by_source"]}
            except (DataError, OSError, KeyError):
                cache[snapshot_id] = set()
        return cache[snapshot_id]

    return docs


def version_documents(home: Home, version: str) -> set[str]:
    """sha256 of every source document a version was trained on (its lineage, else its snapshot)."""
    data = registry.lineage(home, version)
    if data is not None:
        return {d["sha256"] for d in data.get("documents", [])}
    snapshot_id = registry.get(home, version).get("snapshot")
    if not snapshot_id:
        return set()
    try:
        return {s["sha256"] for s in stats(home, snapshot_id)["by_source"]}
    except (DataError, OSError):
        return set()


def versions_with(home: Home, sha: str) -> list[str]:
    """Versions trained on document ``sha``, oldest first."""
    return [v["version"] for v in registry.versions(home) if sha in version_documents(home, v["version"])]


def runs_with(home: Home, document: str, snapshot_docs: Callable[[str], set[str]] | None = None) -> list[Path]:
    """Run folders whose snapshot included ``document``."""
    docs = snapshot_docs or snapshot_documents(home)
    found = []
    for folder in sorted(home.runs.iterdir()) if home.runs.is_dir() else []:
        snapshot_id = run_snapshot(home.run(folder.name))
        if snapshot_id and document in docs(snapshot_id):
            found.append(folder)
    return found
