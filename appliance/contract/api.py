"""The engine interface the CLI and the TUI use: a Protocol and plain data types.

This module must stay importable without torch, transformers, llama_cpp or textual
(tests/test_boundaries.py checks it in a fresh interpreter): front ends depend on
this contract, not on the machinery behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.contract.events import Emit, ignore


@dataclass(frozen=True)
class ModelVersion:
    version: str
    created: float
    quant: str
    size: int
    sha256: str
    run: str | None
    snapshot: str | None
    current: bool
    metrics: dict[str, Any] = field(default_factory=dict)  # validation loss, gate verdict (lineage)


@dataclass(frozen=True)
class Status:
    home: Path
    current: str | None
    versions: int
    documents: int
    records: int
    inbox_files: int
    endpoint: str
    runs: list[str] = field(default_factory=list)
    # the daemon's view (appliance run): all optional, empty when no daemon has run
    job: dict[str, Any] | None = None  # the running job: id, kind, stage, progress
    queue: list[dict[str, Any]] = field(default_factory=list)
    current_metrics: dict[str, Any] = field(default_factory=dict)  # validation loss, gate numbers
    server: dict[str, Any] = field(default_factory=dict)  # address, health, daemon pid
    inbox: dict[str, Any] = field(default_factory=dict)  # new, ingested, quarantined, watching
    # stored documents the current version was not trained on: read, not yet learned (None: unknown)
    unlearned: int | None = None
    # per studied document: path, sha256, facts, questions (study questions written), recall (current model)
    knowledge: list[dict[str, Any]] = field(default_factory=list)


KNOWN_RECALL = 0.5  # a document's facts count as known once the model answers half its held-out questions


@dataclass(frozen=True)
class Document:
    """A source document in a collection's store."""

    path: str  # relative to the collection's inbox folder, where it was first seen
    sha256: str
    format: str
    records: int
    collection: str = ""
    learned: bool = False  # the current version was trained on it
    # what the study stage found in it and wrote from it (None: not studied, e.g. a conversation file)
    facts: int | None = None
    questions: int | None = None
    recall: float | None = None  # share of its held-out questions the current model answered (None: not asked)

    @property
    def unknown(self) -> bool:
        """It states facts the current model does not know yet: not asked, or under half answered."""
        return bool(self.facts) and (self.recall is None or self.recall < KNOWN_RECALL)


@dataclass(frozen=True)
class QuarantinedFile:
    """A file the ingest refused, moved to the quarantine folder beside its reasons."""

    file: str  # its path in the inbox, as it was
    reasons: list[str]
    collection: str = ""
    quarantined_at: float | None = None
    moved_to: str | None = None  # its name in the quarantine folder; None: it could not be moved


class Engine(Protocol):
    """Every operation a person can ask for. Errors are ``appliance.contract.errors.ApplianceError``."""

    home: Path
    collection: str  # the collection this engine acts on ("" the shared one; appliance/contract/names.py)

    def status(self) -> Status: ...

    def ingest(self, emit: Emit = ignore) -> dict[str, Any]:
        """Scan the inbox once; report accepted, duplicates, quarantined."""

    def train(
        self, snapshot: str | None = None, max_steps: int | None = None, emit: Emit = ignore, run_id: str | None = None
    ) -> str:
        """Cut (or reuse) a snapshot and train an adapter; return the run id. With the
        id of an interrupted run, resume it from its last checkpoint."""

    def export(self, run: str, quant: str | None = None, emit: Emit = ignore, adapter: bool = False) -> ModelVersion:
        """Merge, convert, quantize and parity-check a run; register it as a new (not current) version.
        ``adapter``: also export the LoRA adapter as GGUF (a collection served as an adapter always does)."""

    def models(self) -> list[ModelVersion]: ...

    def promote(self, version: str) -> None: ...

    def rollback(self) -> str: ...

    # --- the daemon's commands and views (appliance run). A running daemon and any other
    # process share the home: commands go through the SQLite job journal (the daemon polls
    # it), events through logs/events.jsonl (one JSON object a line, tailed by offset).

    def retrain(self) -> dict[str, Any]:
        """Queue a training run on the current data (coalesced with one already queued); the job as a dict."""

    def forget(self, document: str) -> dict[str, Any]:
        """Remove a document (inbox path, file or sha256) everywhere and queue the retrain without it."""

    def pause_watching(self) -> None: ...

    def resume_watching(self) -> None: ...

    def events(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Events written after byte ``offset`` of the event log, and the next offset (poll it)."""

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]: ...

    def audit_entries(self) -> list[dict[str, Any]]: ...

    def verify_audit(self) -> dict[str, Any]:
        """{"ok", "entries", "bad_line", "reason"}."""

    def lineage(self, version: str) -> dict[str, Any] | None: ...

    def sources(self) -> list[Document]:
        """The source documents in the store, each marked learned or not by the current version."""

    def quarantined(self) -> list[QuarantinedFile]:
        """The files in the quarantine folder, each with the reasons it was refused, newest first."""

    def eval_report(self, run: str) -> dict[str, Any] | None: ...

    def evaluate(self, run: str, emit: Emit = ignore) -> dict[str, Any]:
        """Run the promotion gate for a run against the current model; writes and returns eval.json."""

    # --- the practitioner's tools

    def advise(self) -> list[dict[str, str]]:
        """The data advisor on the current data (and the latest run's curve): dicts with
        "level" ("warning" or "ok"), "code" and a plain-words "message"."""

    def set_method(self, method: str) -> str:
        """Choose how the next runs train ([train] method: auto, qlora, lora, dora, adalora,
        ia3, full); validated like config.toml; returns the method now configured."""

    def correct(self, messages: list[dict[str, str]], answer: str) -> str:
        """Save a person's correction (the conversation up to the question, and the right
        answer) as a new conversation file in the inbox; returns its path."""

    def reviews(self) -> list[dict[str, Any]]:
        """Candidates waiting for human review ([gate] promotion = "review"): run, job, approvals,
        approvals_needed, voted, and items (index, question, context, answer_a, answer_b). Which
        answer is the candidate's is given ("reveal") only to a reviewer who has voted."""

    def vote(
        self, run: str, approve: bool, comment: str = "", preferences: dict[int, str] | None = None
    ) -> dict[str, Any]:
        """This OS user's vote on a candidate (once each; audited), with optional per-item
        preferences ("a"/"b"); returns state, job_state, approvals and "reveal" (which was which).
        Enough approvals promote it; a rejection refuses the job and keeps the current model."""

    # --- collections and API keys. Every method checks the caller's key: its role (chat <
    # contributor < approver < admin, appliance/home/keys.py COMMAND_ROLES) and that it sees the
    # engine's collection; a refusal is appliance.contract.errors.AccessError.

    def collections(self) -> list[dict[str, Any]]:
        """Every collection the caller's key sees, the shared one first: name, display, model_id,
        current (version or None), mode ("merged" or "adapter"), documents, records, inbox_files,
        index ({documents, passages} of its passage index, or None before the first ingest)."""

    def ask(self, question: str, grounding: bool = True, secret: str | None = None) -> dict[str, Any]:
        """The collection's current model answers ``question`` through the endpoint (the daemon's,
        else one started for it), as the caller (``secret``, else the caller's key): answer, model,
        sources (document, sha256, passage, score, id cited as [id]) and grounding (used, reason)."""

    def scoped(self, collection: str) -> Engine:
        """The same engine, for the same key, on another collection ("" or "shared": the shared one)."""

    def api_key(self) -> str | None:
        """The home's admin key (its api_key file) for the endpoint, or None when unreadable; a front end
        uses the caller's own key ($APPLIANCE_API_KEY, names.KEY_ENV) first."""

    def whoami(self) -> dict[str, Any]:
        """The caller's key: name, role, collections (display names; None = every collection)."""

    def keys(self) -> list[dict[str, Any]]:
        """Every key: name, role, collections, created, revoked (a time or None); never secrets."""

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        """Create a key (admin); returns its secret, which is stored only hashed: show it once."""

    def revoke_key(self, name: str) -> None:
        """Revoke a key (admin): refused from the next request or command on. The last admin key stays."""


def open_engine(home: Path, key: Any = None, collection: str = "") -> Engine:
    """The in-process engine for a home (heavy modules load only when a stage runs), acting for
    ``key`` (an appliance.home.keys.Key; None: the caller's, see appliance.home.keys.caller_key), on
    ``collection`` ("" the shared one; see appliance/home/catalog.py)."""
    from appliance.engine.local import LocalEngine

    return LocalEngine(home, collection, key=key)
