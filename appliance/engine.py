"""The in-process engine: the stages behind the ``api.Engine`` contract."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import registry
from . import snapshot as snapshots
from .api import ModelVersion, Status
from .config import Settings, load
from .errors import HomeError
from .events import Emit, ignore
from .paths import Home


class LocalEngine:
    def __init__(self, home: Path):
        self.home = home
        self.paths = Home(home)
        if not self.paths.is_initialised():
            raise HomeError(f"{home}: not an appliance home; run 'appliance init --home {home}' first")

    @property
    def settings(self) -> Settings:
        return load(self.paths.config)

    def status(self) -> Status:
        from .ingest import inbox_files
        from .ingest.store import Store

        store = Store(self.paths.store_db)
        try:
            counts = store.counts()
        finally:
            store.close()
        s = self.settings
        runs = sorted(p.name for p in self.paths.runs.iterdir() if p.is_dir()) if self.paths.runs.exists() else []
        return Status(self.home, registry.current(self.paths), len(registry.versions(self.paths)),
                      counts["documents"], counts["records"], len(inbox_files(self.paths.inbox)),
                      f"http://{s.serve.host}:{s.serve.port}/v1", runs)

    def ingest(self, emit: Emit = ignore) -> dict[str, Any]:
        from .ingest import ingest

        return ingest(self.paths, emit).to_dict()

    def train(self, snapshot: str | None = None, max_steps: int | None = None, emit: Emit = ignore,
              run_id: str | None = None) -> str:
        from .train import run_snapshot, train

        s = self.settings
        if run_id and not snapshot:
            snapshot = run_snapshot(self.paths.run(run_id))
        snap = snapshots.load(self.paths, snapshot) if snapshot else snapshots.cut(self.paths, s.data.val_fraction)
        return train(self.paths, snap, s, run_id=run_id, max_steps=max_steps, emit=emit).run_id

    def export(self, run: str, quant: str | None = None, emit: Emit = ignore, adapter: bool = False) -> ModelVersion:
        from .export import export_run, require_parity
        from .fsutil import read_json
        from .llamacpp_child import problem

        s = self.settings
        existing = [v for v in registry.versions(self.paths) if v.get("run") == run]
        if existing and not adapter:
            return self._version(existing[-1])
        result = export_run(self.paths, run, s, quant, emit, adapter=adapter)
        require_parity(result)
        if existing:
            return self._version(existing[-1])  # the model was registered before; this added the adapter
        train_info = read_json(self.paths.run(run).root / "train.json")
        record = registry.add(self.paths, registry.next_version(self.paths), result.gguf, {
            "run": run, "snapshot": train_info.get("snapshot"), "quant": result.qtype, "base": s.base.name,
            "best_val_loss": train_info.get("best_val_loss"), "parity": result.parity.to_dict(),
            "adapter": result.adapter.name if result.adapter else None,
            "registered_at": time.time()}, check=problem)
        return self._version(record)

    def models(self) -> list[ModelVersion]:
        return [self._version(v) for v in registry.versions(self.paths)]

    def promote(self, version: str) -> None:
        registry.get(self.paths, version)
        registry.promote(self.paths, version)

    def rollback(self) -> str:
        return registry.rollback(self.paths)

    def _version(self, record: dict[str, Any]) -> ModelVersion:
        return ModelVersion(record["version"], record["created"], record.get("quant", "?"), record.get("size", 0),
                            record["sha256"], record.get("run"), record.get("snapshot"),
                            record["version"] == registry.current(self.paths))


def as_dict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: as_dict(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list):
        return [as_dict(x) for x in obj]
    return obj
