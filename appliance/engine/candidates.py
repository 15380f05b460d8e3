"""A gated run becomes a registered (not yet current) version; its intermediate files go.

Promotion and review both register the candidate here, once per run, so a version
waiting for reviewers is the same file that promotion later makes current.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from appliance.contract.errors import ApplianceError
from appliance.home import registry
from appliance.home.catalog import adapter_mode, base_model
from appliance.home.config import Settings
from appliance.home.fsutil import read_json
from appliance.home.journal import Job, Journal
from appliance.home.paths import Home
from appliance.quality.gate import candidate_gguf
from appliance.runtime.llamacpp_child import adapter_problem, problem


def register_candidate(home: Home, settings: Settings, journal: Journal, job: Job) -> dict[str, Any]:
    """Register the gated file as a new (not current) version, once; remember it in the journal."""
    run_id = job.run_id or ""
    existing = [v for v in registry.versions(home) if v.get("run") == run_id]
    if existing:
        record = existing[-1]
    else:
        run = home.run(run_id)
        gguf = candidate_gguf(home, run_id)
        if gguf is None:
            raise ApplianceError(f"run {run_id}: the gated file is missing; cannot promote it")
        parity = read_json(run.parity)
        info = read_json(run.train_json)
        fields = {
            "run": run_id,
            "snapshot": job.snapshot,
            "quant": parity.get("quant"),
            "base": settings.base.name,
            "best_val_loss": info.get("best_val_loss"),
            "parity": {"passed": parity.get("passed")},
            "job": job.id,
            "kind": job.kind,
            "collection": home.collection,
            "registered_at": time.time(),
        }
        if adapter_mode(home, settings):
            record = register_adapter(home, run.gguf / parity["adapter"], fields)
        else:
            record = registry.add(home, registry.next_version(home), gguf, fields, check=problem)
    journal.remember(job.id, version=record["version"])
    return record


def register_adapter(home: Home, adapter: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A collection's version as its GGUF LoRA adapter, tied to the base version it applies to."""
    base_version, base_file = base_model(home)
    base_record = registry.get(home.top, base_version)
    fields = {**fields, "quant": "adapter", "base_version": base_version, "base_sha256": base_record["sha256"]}
    return registry.add(
        home,
        registry.next_version(home),
        adapter,
        fields,
        name=registry.ADAPTER_FILE,
        check=lambda path: adapter_problem(base_file, path),
    )


def clean_intermediates(home: Home, run_id: str) -> None:
    """Checkpoints, merged weights and the f16 GGUF go once a run is gated; the chosen
    quantized file stays (hard-linked into models/ when registered, so no extra space)."""
    run = home.run(run_id)
    for folder in (run.checkpoints, run.merged):
        shutil.rmtree(folder, ignore_errors=True)
    for partial in run.root.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    parity = read_json(run.parity) if run.parity.exists() else {}
    keep = {parity.get("gguf"), parity.get("adapter")}  # the served file (and a collection's adapter)
    for path in run.gguf.glob("*.gguf") if run.gguf.is_dir() else []:
        if path.name not in keep:
            path.unlink(missing_ok=True)
