"""The in-process engine: the stages behind the ``api.Engine`` contract."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.contract.api import Document, ModelVersion, QuarantinedFile, Status
from appliance.contract.errors import HomeError
from appliance.contract.events import Emit, ignore
from appliance.contract.names import read_api_key
from appliance.data import snapshot as snapshots
from appliance.home import registry
from appliance.home.config import Settings, load
from appliance.home.keys import Key, KeyStore, caller_key, caller_secret, guarded
from appliance.home.paths import Home


@guarded  # every public method checks the caller's key first (appliance/home/keys.py, COMMAND_ROLES)
class LocalEngine:
    def __init__(self, home: Path, collection: str = "", key: Key | None = None):
        """``key``: the caller (None: whoever this process runs as, see keys.caller_key)."""
        from appliance.home.catalog import problem

        self.home = home
        self.collection = collection
        self.paths = Home(Path(home)).scoped(collection)
        if not self.paths.is_initialised():
            raise HomeError(f"{home}: not an appliance home; run 'appliance init --home {home}' first")
        if (why := problem(collection)) is not None:
            raise HomeError(f"collection {collection!r}: {why}")
        self.key = key or caller_key(self.paths)

    # --- collections ----------------------------------------------------------------------------
    def scoped(self, collection: str) -> LocalEngine:
        """The same engine bound to another collection ("" or "shared": the shared one)."""
        from appliance.home.catalog import parse

        return type(self)(self.home, parse(collection), key=self.key)

    def collections(self) -> list[dict[str, Any]]:
        """Every collection with its model and data counts."""
        from appliance.data.ingest import inbox_files, passages
        from appliance.data.ingest.store import Store
        from appliance.home.catalog import display, model_id, names, served

        out = []
        for name in filter(self.key.sees, names(self.paths)):  # never a hint of the others
            scope = self.paths.scoped(name)
            counts = {"documents": 0, "records": 0}
            if scope.store_db.exists():
                with Store(scope.store_db) as store:
                    counts = store.counts()
            now = served(scope, name)
            out.append(
                {
                    "name": name,
                    "display": display(name),
                    "model_id": model_id(name),
                    "current": now.version if now else None,
                    "mode": now.mode if now else ("merged" if not name else self.settings.collection(name).serve),
                    "documents": counts["documents"],
                    "records": counts["records"],
                    "inbox_files": len(inbox_files(scope)),
                    "index": passages.counts(scope),
                }
            )
        return out

    def ask(self, question: str, grounding: bool = True, secret: str | None = None) -> dict[str, Any]:
        from appliance.engine.ask import ask
        from appliance.engine.daemon import daemon_state

        running = (daemon_state(self.paths) or {}).get("endpoint")
        secret = secret or caller_secret(self.paths)
        return ask(self.paths, self.settings, secret, question, self.collection, grounding, running)

    @property
    def settings(self) -> Settings:
        return load(self.paths.config)

    def status(self) -> Status:
        from appliance.data.ingest import inbox_files
        from appliance.data.ingest.store import Store

        with Store(self.paths.store_db) as store:
            counts = store.counts()
            unlearned = len(set(store.active_documents()) - self._learned())
        s = self.settings
        runs = sorted(p.name for p in self.paths.runs.iterdir() if p.is_dir()) if self.paths.runs.exists() else []
        from appliance.engine.daemon import daemon_state, paused

        daemon = daemon_state(self.paths)
        endpoint = (daemon or {}).get("endpoint") or f"http://{s.serve.host}:{s.serve.port}/v1"
        inbox = inbox_files(self.paths)
        job, queue = self._journal_view()
        return Status(
            self.home,
            registry.current(self.paths),
            len(registry.versions(self.paths)),
            counts["documents"],
            counts["records"],
            len(inbox),
            endpoint,
            runs,
            job=job,
            queue=queue,
            current_metrics=self._current_metrics(),
            server={
                "address": endpoint,
                "health": _health(endpoint) if daemon else "no daemon running",
                "daemon_pid": (daemon or {}).get("pid"),
            },
            inbox={
                "new": self._unread(inbox),
                "ingested": counts["documents"],
                "quarantined": _quarantined(self.paths.quarantine),
                "watching": bool(daemon and daemon.get("watching")),
                "paused": paused(self.paths) if self.paths.jobs_db.exists() else False,
                "since_start": (daemon or {}).get("inbox", {}),
            },
            unlearned=unlearned,
            knowledge=self._knowledge(),
        )

    def ingest(self, emit: Emit = ignore) -> dict[str, Any]:
        from appliance.data.ingest import ingest
        from appliance.engine.daemon import record_ingest, store_seqs

        before = store_seqs(self.paths)
        report = ingest(self.paths, emit)
        record_ingest(self.paths, before, report)
        return report.to_dict()

    def train(
        self, snapshot: str | None = None, max_steps: int | None = None, emit: Emit = ignore, run_id: str | None = None
    ) -> str:
        from appliance.training.launch import train_run  # torch: loaded when a run trains

        s = self.settings
        if run_id and not snapshot:
            snapshot = snapshots.run_snapshot(self.paths.run(run_id))
        snap = snapshots.load(self.paths, snapshot) if snapshot else snapshots.cut(self.paths, s.data.val_fraction)
        run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S")
        return train_run(self.paths, snap, s, run_id, "train", emit, max_steps=max_steps).run_id

    def export(self, run: str, quant: str | None = None, emit: Emit = ignore, adapter: bool = False) -> ModelVersion:
        from appliance.export.run import export_run, require_parity
        from appliance.home.catalog import adapter_mode
        from appliance.home.fsutil import read_json
        from appliance.runtime.llamacpp_child import problem

        s = self.settings
        served_as_adapter = adapter_mode(self.paths, s)  # a collection's version is its adapter
        existing = [v for v in registry.versions(self.paths) if v.get("run") == run]
        if existing and not adapter:
            return self._version(existing[-1])
        result = export_run(self.paths, run, s, quant, emit, adapter=adapter or served_as_adapter)
        require_parity(result)
        if existing:
            return self._version(existing[-1])  # the model was registered before; this added the adapter
        train_info = read_json(self.paths.run(run).train_json)
        fields = {
            "run": run,
            "snapshot": train_info.get("snapshot"),
            "quant": result.qtype,
            "base": s.base.name,
            "best_val_loss": train_info.get("best_val_loss"),
            "parity": result.parity.to_dict(),
            "adapter": result.adapter.name if result.adapter else None,
            "collection": self.collection,
            "registered_at": time.time(),
        }
        if served_as_adapter and result.adapter is not None:
            from appliance.engine.candidates import register_adapter

            return self._version(register_adapter(self.paths, result.adapter, fields))
        record = registry.add(self.paths, registry.next_version(self.paths), result.gguf, fields, check=problem)
        return self._version(record)

    def models(self) -> list[ModelVersion]:
        return [self._version(v) for v in registry.versions(self.paths)]

    def promote(self, version: str) -> None:
        from appliance.engine.review import ReviewError, waiting_version
        from appliance.home import audit

        record = registry.get(self.paths, version)
        if (run := waiting_version(self.paths, version)) is not None:  # a person's promote must not skip the vote
            raise ReviewError(
                f"{version} waits for review; approve it with 'appliance review approve {run}' "
                "or in the TUI's Review screen"
            )
        registry.promote(self.paths, version)
        audit.append(self.paths, "promote", version=version, sha256=record["sha256"], by="command")

    def rollback(self) -> str:
        from appliance.home import audit

        before = registry.current(self.paths)
        version = registry.rollback(self.paths)
        audit.append(self.paths, "rollback", version=version, **{"from": before})
        return version

    # --- the daemon's commands and views -----------------------------------------------------
    def retrain(self) -> dict[str, Any]:
        from appliance.home import audit
        from appliance.home.journal import Journal

        with Journal(self.paths.jobs_db) as journal:
            job, new = journal.enqueue("train", reason="asked for", collection=self.collection)
        if new:
            audit.append(self.paths, "retrain_requested", job=job.id)
        return job.to_dict()

    def forget(self, document: str) -> dict[str, Any]:
        from appliance.engine.forget import collection_of, forget

        return forget(collection_of(self.paths, document), document)

    def pause_watching(self) -> None:
        from appliance.engine.daemon import set_paused

        set_paused(self.paths, True)

    def resume_watching(self) -> None:
        from appliance.engine.daemon import set_paused

        set_paused(self.paths, False)

    def events(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        from appliance.engine.daemon import read_events

        return read_events(self.paths, offset)

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        from appliance.home.journal import Journal

        with Journal(self.paths.jobs_db) as journal:
            return [j.to_dict() for j in journal.jobs(limit)]

    def audit_entries(self) -> list[dict[str, Any]]:
        from appliance.home import audit

        return audit.entries(self.paths)

    def verify_audit(self) -> dict[str, Any]:
        from appliance.home import audit

        return audit.verify(self.paths).to_dict()

    def lineage(self, version: str) -> dict[str, Any] | None:
        registry.get(self.paths, version)
        return registry.lineage(self.paths, version)

    def sources(self) -> list[Document]:
        from appliance.data.ingest.store import Store

        learned = self._learned()
        with Store(self.paths.store_db) as store:
            facts = store.document_facts(store.active_documents())
        recall = self._current_recall().get("documents", {})
        return [
            Document(
                f["path"],
                f["sha256"],
                f["format"],
                f["records"],
                self.collection,
                f["sha256"] in learned,
                **self._studied(f["sha256"], recall.get(f["sha256"])),
            )
            for f in facts
        ]

    def _studied(self, sha: str, recall: dict[str, Any] | None) -> dict[str, Any]:
        """Facts found in a document and study questions written from it (its study cache), and
        the share of its held-out questions the current model answered when it was gated."""
        from appliance.home.fsutil import read_json

        try:
            cache = read_json(self.paths.study_cache(sha))
        except (OSError, ValueError):
            return {}
        asked = recall is not None and recall.get("questions")
        return {
            "facts": len(cache.get("statements", [])),
            "questions": len(cache.get("conversations", [])),
            "recall": recall.get("candidate") if recall is not None and asked else None,
        }

    def _current_recall(self) -> dict[str, Any]:
        """eval.json's recall from the gate that promoted the current version ({} when none)."""
        version = registry.current(self.paths)
        record = registry.get(self.paths, version) if version else {}
        report = self.eval_report(record["run"]) if record.get("run") else None
        return (report or {}).get("recall") or {}

    def quarantined(self) -> list[QuarantinedFile]:
        from appliance.home.fsutil import read_json

        folder = self.paths.quarantine  # sub-folders are other collections' quarantines
        found = []
        for sidecar in folder.glob("*.reason.json") if folder.is_dir() else []:
            try:
                data = read_json(sidecar)
            except (OSError, ValueError):
                continue
            moved_to = data.get("moved_to")
            if moved_to and not os.path.lexists(folder / moved_to):
                continue  # taken out of quarantine (fixed, or deleted): its reasons no longer apply
            found.append(
                QuarantinedFile(
                    str(data.get("file", sidecar.name.removesuffix(".reason.json"))),
                    [str(r) for r in data.get("reasons", [])],
                    self.collection,
                    data.get("quarantined_at"),
                    moved_to,
                )
            )
        return sorted(found, key=lambda q: q.quarantined_at or 0.0, reverse=True)

    def eval_report(self, run: str) -> dict[str, Any] | None:
        from appliance.quality.gate import load_report

        return load_report(self.paths, run)

    def evaluate(self, run: str, emit: Emit = ignore) -> dict[str, Any]:
        from appliance.quality.gate import evaluate

        return evaluate(self.paths, run, self.settings, emit=emit).to_dict()

    def advise(self) -> list[dict[str, str]]:
        from appliance.data.snapshot import cut_id
        from appliance.home.fsutil import read_json
        from appliance.quality.advise import advise_data, advise_run

        advice = advise_data(self.paths, cut_id(self.paths, self.settings.data.val_fraction))
        runs = sorted((r for r in self.paths.runs.glob("*/train.json")), key=lambda p: p.stat().st_mtime)
        if runs:
            advice += advise_run(read_json(runs[-1])["curve"])
        return [a.to_dict() for a in advice]

    def set_method(self, method: str) -> str:
        from appliance.home import audit
        from appliance.home.config import dump, load, validated
        from appliance.home.fsutil import write_text_atomic

        settings = load(self.paths.config)
        before = settings.train.method
        data = settings.model_dump(exclude_none=True)
        data["train"]["method"] = method
        checked = validated(data, "train.method")  # the same checks (and refusals) as config.toml
        write_text_atomic(self.paths.config, dump(checked), mode=0o600)
        audit.append(self.paths, "configure", key="train.method", value=checked.train.method, before=before)
        return checked.train.method

    def correct(self, messages: list[dict[str, str]], answer: str) -> str:
        from appliance.data.corrections import write_correction
        from appliance.home import audit
        from appliance.home.fsutil import sha256_file

        path = write_correction(self.paths, messages, answer)
        audit.append(self.paths, "correction", file=path.name, sha256=sha256_file(path))
        return str(path)

    def reviews(self) -> list[dict[str, Any]]:
        from appliance.engine.review import pending

        return pending(self.paths, self.settings)

    def vote(
        self, run: str, approve: bool, comment: str = "", preferences: dict[int, str] | None = None
    ) -> dict[str, Any]:
        from appliance.engine.pipeline import vote

        return vote(self.paths, self.settings, run, approve, comment, preferences)

    # --- keys ---------------------------------------------------------------------------------
    def api_key(self) -> str | None:
        return read_api_key(self.paths.top.root)

    def whoami(self) -> dict[str, Any]:
        return self.key.to_dict()

    def keys(self) -> list[dict[str, Any]]:
        return KeyStore(self.paths.top).list()

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        return KeyStore(self.paths.top).add(name, role, collections)

    def revoke_key(self, name: str) -> None:
        KeyStore(self.paths.top).revoke(name)

    def _journal_view(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        from appliance.home.journal import Journal

        if not self.paths.jobs_db.exists():
            return None, []
        with Journal(self.paths.jobs_db) as journal:
            active = journal.active()
            queue = [j.to_dict() for j in journal.queue()]
        if active is None:
            return None, queue
        return {
            "id": active.id,
            "kind": active.kind,
            "stage": active.current or active.next_stage(),
            "completed_stages": active.stage,
            "run": active.run_id,
            "progress": active.progress,
            "since": active.created,
        }, queue

    def _current_metrics(self) -> dict[str, Any]:
        version = registry.current(self.paths)
        if not version:
            return {}
        record = registry.get(self.paths, version)
        out: dict[str, Any] = {
            "version": version,
            "best_val_loss": record.get("best_val_loss"),
            "quant": record.get("quant"),
        }
        report = self.eval_report(record["run"]) if record.get("run") else None
        if report:
            out["gate"] = {c["name"]: c["value"] for c in report["checks"]}
            known = (report.get("recall") or {}).get("facts_known")
            if known:  # "knows 27 of 30 facts": facts with a held-out question answered, of those asked
                out["recall"] = {
                    "facts_known": known["candidate"],
                    "facts_asked": report["recall"]["facts_asked"],
                    "share": report["recall"]["candidate"],
                }
        return out

    def _knowledge(self) -> list[dict[str, Any]]:
        """Per studied document: facts, study questions and the current model's recall (for a key
        that may see the documents' names, as ``sources`` requires)."""
        from appliance.home.keys import COMMAND_ROLES

        if not self.key.can(COMMAND_ROLES["sources"]):
            return []
        return [
            {
                "path": d.path,
                "sha256": d.sha256,
                "facts": d.facts,
                "questions": d.questions,
                "recall": d.recall,
                "known": not d.unknown,
            }
            for d in self.sources()
            if d.facts is not None
        ]

    def _learned(self) -> set[str]:
        """sha256 of the documents the current version was trained on (its lineage, else its snapshot)."""
        from appliance.engine.lineage import version_documents

        version = registry.current(self.paths)
        return version_documents(self.paths, version) if version else set()

    def _unread(self, inbox: list[Path]) -> int:
        """Inbox files the store has not read in their present state."""
        from appliance.data.ingest.store import Store

        with Store(self.paths.store_db) as store:
            known = store.file_states()
        new = 0
        for path in inbox:
            rel = os.path.relpath(path, self.paths.inbox)
            state = known.get(rel)
            try:
                st = path.stat()
            except OSError:
                continue
            if state is None or state.size != st.st_size or state.mtime_ns != st.st_mtime_ns:
                new += 1
        return new

    def _version(self, record: dict[str, Any]) -> ModelVersion:
        lineage = registry.lineage(self.paths, record["version"]) or {}
        gate = lineage.get("gate") or {}
        loss = next((c["value"] for c in gate.get("checks", []) if c["name"] == "validation_loss"), None)
        metrics = {
            "best_val_loss": record.get("best_val_loss"),
            "gate_val_loss": loss.get("candidate") if isinstance(loss, dict) else None,
            "gate_passed": gate.get("passed"),
            "documents": len(lineage.get("documents", [])),
        }
        return ModelVersion(
            record["version"],
            record["created"],
            record.get("quant", "?"),
            record.get("size", 0),
            record["sha256"],
            record.get("run"),
            record.get("snapshot"),
            record["version"] == registry.current(self.paths),
            metrics,
        )


if TYPE_CHECKING:  # mypy confirms the in-process engine keeps the whole contract (tests/test_boundaries.py)
    from appliance.contract.api import Engine

    _contract: type[Engine] = LocalEngine


def _health(endpoint: str) -> str:
    import httpx

    try:
        response = httpx.get(endpoint.removesuffix("/v1") + "/health", timeout=1.0)
    except httpx.HTTPError as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok" if response.status_code < 500 else f"status {response.status_code}"


def _quarantined(folder: Path) -> int:
    # sub-folders are other collections' quarantines
    return (
        sum(1 for p in folder.iterdir() if p.is_file() and not p.name.endswith(".reason.json"))
        if folder.is_dir()
        else 0
    )


def as_dict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: as_dict(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list):
        return [as_dict(x) for x in obj]
    return obj
