"""Incremental or full: how the next run trains (issue 20).

A run *continues* the current version's adapter on the records that arrived since that
version's snapshot plus a **replay** sample of the earlier ones, so the cost of learning
follows the change, not everything ever ingested. It *consolidates* (a full run from the
base on the whole snapshot) whenever continuing could be wrong or has gone on long enough:

* no current version trained by this appliance (the base, an imported version), or its
  adapter is missing or unreadable;
* the base, the method, the rank or the target modules changed (an adapter of another
  shape cannot be continued);
* records left the data since that version's snapshot: a document was forgotten (its
  facts must leave the weights, so training restarts from a version never trained on it)
  or superseded by a new version at the same path (continuing would keep the old answer);
* the chain of incremental runs reached ``[train] max_chain``;
* the job asks for it: ``forget``, or ``consolidate`` (queued when the gate refused an
  incremental candidate);
* the current version was trained with a method whose adapter is not a plain LoRA;
* the schedule: the last full run is older than ``[train] consolidate`` ("daily",
  "weekly"; "never" turns it off).

The decision and its reason go into ``train.json`` (``incremental``) and from there into
the lineage and the TUI.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.data import snapshot as snapshots
from appliance.data.ingest.store import Store
from appliance.home import registry
from appliance.home.config import Settings
from appliance.home.fsutil import read_json
from appliance.home.paths import Home

PERIODS = {"daily": 86_400.0, "weekly": 7 * 86_400.0}
FULL_KINDS = {
    "forget": "a forget job retrains from the base",
    "consolidate": "a consolidation (a full run from the base) was queued",
}
CONTINUABLE = ("qlora", "lora", "dora")  # methods whose adapter is a plain LoRA state dict
SHAPE = ("method", "lora_r", "lora_alpha", "target_modules", "dora")  # what an adapter's tensors depend on


@dataclass
class Plan:
    mode: str  # "incremental" | "full"
    reason: str
    parent: str | None = None  # the version continued
    parent_run: str | None = None
    chain: int = 0  # incremental runs since the last full one, this one included
    new: list[str] = field(default_factory=list)  # record hashes new since the parent's snapshot
    replay: list[str] = field(default_factory=list)  # earlier record hashes replayed
    new_documents: list[str] = field(default_factory=list)  # sha256s not in the parent's snapshot
    method: str | None = None  # the parent's (an adapter is continued with its own method)
    last_full_at: float | None = None  # when the chain's full run finished

    @property
    def incremental(self) -> bool:
        return self.mode == "incremental"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["new"] = len(self.new)  # counts in train.json; the replay's hashes in full (the sample is lineage)
        out["new_documents"] = len(self.new_documents)
        return out


def full(reason: str) -> Plan:
    return Plan("full", reason)


def plan(
    home: Home, snapshot: snapshots.Snapshot, settings: Settings, kind: str = "train", now: float | None = None
) -> Plan:
    """How a run of ``kind`` on ``snapshot`` trains."""
    t = settings.train
    if not t.incremental:
        return full("incremental training is off ([train] incremental = false)")
    if kind in FULL_KINDS:
        return full(FULL_KINDS[kind])
    parent = registry.current(home)
    if parent is None or parent == "base" or not home.version_json(parent).exists():
        return full("no trained version to continue")
    record = registry.get(home, parent)
    run_id, parent_snapshot = record.get("run"), record.get("snapshot")
    if not run_id or not parent_snapshot:
        return full(f"{parent} does not say which run and snapshot made it")
    run = home.run(run_id)
    if problem := _adapter_problem(run.adapter):
        return full(f"the adapter of {parent} {problem}")
    try:
        parent_info = read_json(run.train_json)
    except (OSError, ValueError):
        return full(f"the training record of {parent} is missing or unreadable")
    if parent_info.get("method") not in CONTINUABLE:
        return full(f"{parent} was trained with {parent_info.get('method')}, which is not continued")
    if changed := _shape_change(parent_info, settings):
        return full(f"{changed} changed since {parent}: an adapter of another shape cannot be continued")
    chain = int((parent_info.get("incremental") or {}).get("chain", 0)) + 1
    if chain > t.max_chain:
        return full(f"{t.max_chain} incremental runs since the last full one ([train] max_chain)")
    if due := _consolidation_due(home, parent_info, t.consolidate, now):
        return full(due)
    new, removed, earlier = _delta(home, parent_snapshot, snapshot)
    if removed:
        return full(
            f"{len(removed)} record(s) left the data since {parent} (a document forgotten or rewritten): "
            "training restarts from the base so no old answer stays"
        )
    if not new:
        return full(f"nothing new since {parent}")
    replay = replay_sample(home, earlier, len(new), settings, seed=chain)
    new_docs = sorted(_documents(home, snapshot.id) - _documents(home, parent_snapshot))
    last_full = (parent_info.get("incremental") or {}).get("last_full_at") or parent_info.get("finished_at")
    return Plan(
        "incremental",
        f"{len(new)} new record(s) since {parent}",
        parent,
        run_id,
        chain,
        new,
        replay,
        new_docs,
        parent_info.get("method"),
        last_full,
    )


def _documents(home: Home, snapshot_id: str) -> set[str]:
    return {s["sha256"] for s in snapshots.stats(home, snapshot_id)["by_source"]}


def study_keeper(home: Home, how: Plan, settings: Settings) -> Callable[[list[tuple[str, Any]]], list[tuple[str, Any]]]:
    """Which study material an incremental run trains: all of the new documents', and a
    replay of the others' sized as the records' replay is, taken in turn from each document."""
    fresh = set(how.new_documents)

    def keep(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        new = [item for item in items if item[0] in fresh]
        old = [item for item in items if item[0] not in fresh]
        size = min(len(old), max(settings.train.replay_min, round(settings.train.replay_ratio * len(new))))
        return new + stratified(old, size, random.Random(f"{settings.train.seed}:study:{how.chain}"))

    return keep


def stratified(items: list[tuple[str, Any]], size: int, rng: random.Random) -> list[tuple[str, Any]]:
    """``size`` of ``items`` taken in turn from each group (the first element), shuffled within."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for item in items:
        groups.setdefault(item[0], []).append(item)
    queues = [groups[g][:] for g in sorted(groups)]
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    chosen: list[tuple[str, Any]] = []
    while len(chosen) < size and any(queues):
        for queue in queues:
            if queue and len(chosen) < size:
                chosen.append(queue.pop())
    return chosen


def _adapter_problem(adapter: Path) -> str | None:
    if not (adapter / "adapter_config.json").is_file():
        return "is missing"
    if not any(adapter.glob("adapter_model.*")):
        return "has no weights"
    try:
        read_json(adapter / "adapter_config.json")
    except (OSError, ValueError):
        return "is unreadable"
    return None


def _shape_change(parent_info: dict[str, Any], settings: Settings) -> str | None:
    if parent_info.get("base") != settings.base.name:
        return "the base model"
    before = parent_info.get("settings") or {}
    now = settings.train.model_dump()
    if parent_info.get("method") != _method_of(parent_info, settings):
        return "the training method"
    for key in SHAPE[1:]:
        if before.get(key) != now.get(key):
            return f"train.{key}"
    return None


def _method_of(parent_info: dict[str, Any], settings: Settings) -> str:
    """The method this run would use: the configured one, or the parent's when "auto" chose it."""
    configured = settings.train.method
    return parent_info.get("method", "") if configured == "auto" else configured


def _consolidation_due(home: Home, parent_info: dict[str, Any], period: str, now: float | None) -> str | None:
    if period not in PERIODS:
        return None
    last_full = (parent_info.get("incremental") or {}).get("last_full_at") or parent_info.get("finished_at")
    if last_full is None:
        return None
    if (now or time.time()) - float(last_full) >= PERIODS[period]:
        return f"the {period} consolidation is due ([train] consolidate = {period!r})"
    return None


def _delta(home: Home, parent_snapshot: str, snapshot: snapshots.Snapshot) -> tuple[list[str], list[str], list[str]]:
    """Training records new since the parent's snapshot, records gone since, and the earlier ones kept."""
    before = snapshots.load(home, parent_snapshot)
    old = set(before.train) | set(before.val)
    now = set(snapshot.train) | set(snapshot.val)
    new = [h for h in snapshot.train if h not in old]
    earlier = [h for h in snapshot.train if h in old]
    return new, sorted(old - now), earlier


def replay_sample(home: Home, earlier: list[str], n_new: int, settings: Settings, seed: int) -> list[str]:
    """Up to ``replay_ratio`` x the new records from the earlier ones (at least ``replay_min``),
    taken in turn from each document so every earlier document is represented; the seed
    moves along the chain, so successive runs replay different records."""
    t = settings.train
    size = min(len(earlier), max(t.replay_min, round(t.replay_ratio * n_new)))
    if size <= 0:
        return []
    by_doc = _by_document(home, earlier)
    items = [(doc, h) for doc, hashes in by_doc.items() for h in sorted(hashes)]
    chosen = [h for _, h in stratified(items, size, random.Random(f"{settings.train.seed}:{seed}"))]
    return sorted(chosen)


def _by_document(home: Home, hashes: list[str]) -> dict[str, list[str]]:
    """Records grouped by the (first) document holding them."""
    wanted = set(hashes)
    out: dict[str, list[str]] = {}
    with Store(home.store_db) as store:
        for record_hash, doc in store.db.execute("SELECT record_hash, doc_sha256 FROM doc_records"):
            if record_hash in wanted:
                out.setdefault(doc, []).append(record_hash)
                wanted.discard(record_hash)
    if wanted:  # study material and the like belong to no stored document
        out.setdefault("", []).extend(sorted(wanted))
    return out
