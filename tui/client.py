"""The TUI's one door to the engine: the screens' calls on ``appliance.contract.api.Engine``.

Everything here runs off the UI thread (in Textual thread workers) and returns plain data
(the contract's dataclasses, dicts). What the window knows between polls (events, the running
stage, the loss curve) is tui/board.py's; chat and health go over HTTP in tui/endpoint.py, with
the caller's own key ($APPLIANCE_API_KEY) first, else the engine's (the home's admin key file).

``scoped(name)`` is a client over the engine bound to one collection (the Data and Models screens
read through it); ``for_caller`` picks the collection a key that may not use the shared one opens on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from appliance.contract.api import Document, Engine, ModelVersion, QuarantinedFile, Status
from appliance.contract.errors import ApplianceError
from appliance.contract.names import KEY_ENV, KEY_FILE, parse
from tui import endpoint
from tui.board import Board, Tracker, answered, to_event, training_method
from tui.endpoint import Answer, EndpointError

T = TypeVar("T")


class Client:
    """Wraps an engine for the TUI: the window's event tracker, the engine's answers shaped for the screens."""

    def __init__(self, engine: Engine, health_timeout: float = 1.0, max_events: int = 2000):
        self.engine = engine
        self.health_timeout = health_timeout
        self.tracker = Tracker(max_events)
        self._offset = 0  # where the next read of the engine's event log starts
        self.last_ingest: dict[str, Any] | None = None
        self.ingests = 0  # ingests this window ran: the Data screen re-reads the advice after each
        self.collection = engine.collection
        self._scoped: dict[str, Client] = {}  # one client per collection: its ingest report and counters stay

    # --- events -----------------------------------------------------------------------
    def record(self, event: Any) -> None:
        """The ``emit`` callback for stages the TUI runs."""
        self.tracker.record(event)

    def events(self) -> list[Any]:
        return self.tracker.events()

    def _pull_events(self) -> None:
        """Events the engine itself reports (a daemon's stages, tailed from its event log)."""
        fresh, self._offset = self.engine.events(self._offset)
        for item in fresh:
            if (event := to_event(item)) is not None:
                self.tracker.record(event)

    # --- reading ------------------------------------------------------------------------
    def board(self) -> Board:
        self._pull_events()
        status = self.engine.status()
        models = self.engine.models()
        train, val = self.tracker.losses()
        current = next((m for m in models if m.current), None)
        inbox = {
            "ingested": status.documents,
            **status.inbox,
            "files": status.inbox_files,
            "unlearned": status.unlearned,
        }
        return Board(
            status,
            models,
            self.tracker.running(status.job),
            train,
            val,
            inbox,
            self.gate(current, status),
            status.endpoint,
            self.health(status),
            bool(inbox.get("paused")) or None,
            self.tracker.notes(),
            _optional(self.collections),
            _optional(self.whoami),
        )

    def models(self) -> list[ModelVersion]:
        return self.engine.models()

    def endpoint(self, status: Status | None = None) -> str:
        return (status or self.engine.status()).endpoint

    def health(self, status: Status | None = None) -> str:
        """The daemon's view when a daemon runs; otherwise the endpoint may still be up ('appliance serve'),
        so the window asks it directly."""
        status = status or self.engine.status()
        server = status.server
        if server.get("daemon_pid") and isinstance(server.get("health"), str):
            return "answering" if server["health"] == "ok" else server["health"]
        return endpoint.health(status.endpoint, self.health_timeout)

    def gate(self, current: ModelVersion | None, status: Status | None = None) -> dict[str, Any] | None:
        """The served version's gate report (eval.json), or the numbers the status carries."""
        if current is None:
            return None
        report = self.eval_report(current.run) if current.run else None
        if report:
            return report
        metrics = status.current_metrics if status is not None else {}
        return {"checks": metrics["gate"]} if isinstance(metrics.get("gate"), dict) else None

    def eval_report(self, run: str) -> dict[str, Any] | None:
        return _optional(lambda: self.engine.eval_report(run))

    def version_details(self, version: ModelVersion) -> dict[str, Any]:
        """Validation loss, probe score and document count for the Models table, when known."""
        lineage = _optional(lambda: self.engine.lineage(version.version)) or {}
        gate = lineage.get("gate") or (self.eval_report(version.run) if version.run else None) or {}
        checks = {c.get("name"): c for c in gate.get("checks", []) if isinstance(c, dict)}
        val = (checks.get("validation_loss") or {}).get("value")
        known = version.metrics  # the engine's own summary
        loss = next(
            (
                x
                for x in (
                    val.get("candidate") if isinstance(val, dict) else None,
                    known.get("gate_val_loss"),
                    known.get("best_val_loss"),
                    (lineage.get("training") or {}).get("best_val_loss"),
                )
                if isinstance(x, (int, float))
            ),
            None,
        )
        probes = (checks.get("general_probes") or {}).get("value")
        score = (
            f"{answered(probes['candidate'], probes['questions'])}/{probes['questions']}"
            if isinstance(probes, dict) and "candidate" in probes and "questions" in probes
            else None
        )
        docs = lineage.get("documents")
        method, reason = training_method(known, lineage)
        return {
            "val_loss": loss,
            "probes": score,
            "documents": len(docs) if isinstance(docs, list) else None,
            "passed": gate.get("passed", known.get("gate_passed")),
            "method": method,
            "method_reason": reason,
            "answers": gate.get("metrics") if isinstance(gate.get("metrics"), dict) else None,
        }

    def advise(self) -> list[dict[str, str]]:
        """The data advisor's findings, warnings first (stable: the engine's order within a level)."""
        return sorted(self.engine.advise(), key=lambda a: a.get("level") != "warning")

    def lineage(self, version: str) -> dict[str, Any] | None:
        return self.engine.lineage(version)

    def audit(self) -> list[dict[str, Any]]:
        return self.engine.audit_entries()

    def jobs(self) -> list[dict[str, Any]]:
        """The job journal's recent jobs (the daemon's work)."""
        return self.engine.jobs()

    def sources(self) -> list[Document]:
        """The store's source documents, each marked learned or not by the served version."""
        return self.engine.sources()

    def quarantined(self) -> list[QuarantinedFile]:
        """The quarantined files with the reasons they were refused."""
        return self.engine.quarantined()

    # --- acting ---------------------------------------------------------------------
    def ingest(self) -> dict[str, Any]:
        report = self.engine.ingest(self.record)
        self.last_ingest = dict(report)
        self.ingests += 1
        return report

    def retrain(self) -> str:
        """Queue a retrain (the daemon runs it); the words say when it starts."""
        job = self.engine.retrain()
        said = f"Retraining queued as job {job.get('id', '?')}"
        if not self.engine.status().server.get("daemon_pid"):
            said += "; it starts when the daemon runs ('appliance run')"
        return said + "."

    def promote(self, version: str) -> None:
        self.engine.promote(version)

    def rollback(self) -> str:
        return self.engine.rollback()

    def verify_audit(self) -> dict[str, Any]:
        return self.engine.verify_audit()

    def set_watching(self, on: bool) -> None:
        if on:
            self.engine.resume_watching()
        else:
            self.engine.pause_watching()

    def correct(self, messages: list[dict[str, str]], answer: str) -> str:
        """Hand a corrected answer to the engine, which writes it into the inbox as a correction
        (the TUI writes no files). Returns the inbox path the engine wrote."""
        return self.engine.correct([dict(m) for m in messages], answer)

    def set_method(self, method: str) -> str:
        """How the next runs train ([train] method); the engine validates it like config.toml."""
        return self.engine.set_method(method)

    def forget(self, document: str) -> dict[str, Any]:
        return self.engine.forget(document)

    def reviews(self) -> list[dict[str, Any]]:
        """Candidates waiting for human review."""
        return self.engine.reviews()

    def vote(
        self, run: str, approve: bool, comment: str = "", preferences: dict[int, str] | None = None
    ) -> dict[str, Any]:
        """This OS user's vote on a candidate; the engine's answer says which answer was which."""
        return self.engine.vote(run, approve, comment, dict(preferences or {}))

    # --- collections and keys -------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        """Every collection the key sees, shared first."""
        return self.engine.collections()

    def scoped(self, collection: str) -> Client:
        """A client over the engine bound to one collection (the same client for the one this is)."""
        if collection == self.collection:
            return self
        if collection not in self._scoped:
            self._scoped[collection] = Client(self.engine.scoped(collection), self.health_timeout)
        return self._scoped[collection]

    def for_caller(self) -> Client:
        """This client, or, for a key that may not use the shared collection, the client of its first
        collection: the shared collection's status would refuse such a key, and the window would show nothing."""
        try:
            allowed = self.whoami().get("collections")
        except ApplianceError:
            return self  # the first poll says what is wrong with the key
        if not allowed or "" in allowed or self.collection in allowed:
            return self
        return self.scoped(allowed[0])

    def whoami(self) -> dict[str, Any]:
        """The key this window acts with: name, role, collections (None: all)."""
        me = self.engine.whoami()
        allowed = me.get("collections")
        # The engine names collections for people ("shared" for the top level); the TUI's rows use "".
        return {
            "name": str(me.get("name", "?")),
            "role": str(me.get("role", "")),
            "collections": None if allowed is None else [parse(str(c)) for c in allowed],
        }

    def keys(self) -> list[dict[str, Any]]:
        """Every key (never secrets or hashes): name, role, collections, created, revoked."""
        return self.engine.keys()

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        """A new key; the secret it returns is the only copy there will ever be (the engine keeps its hash)."""
        return self.engine.add_key(name, role, collections)

    def revoke_key(self, name: str) -> None:
        self.engine.revoke_key(name)

    # --- chat over HTTP ---------------------------------------------------------------
    def api_key(self) -> str | None:
        """The caller's own key (APPLIANCE_API_KEY) first, then the engine's (the home's api_key file)."""
        own = os.environ.get(KEY_ENV, "").strip()
        return own or _optional(self.engine.api_key)

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        model: str = "appliance",
        max_tokens: int = 256,
        timeout: float = 120.0,
        grounding: bool = True,
        answer: Answer | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text pieces as the endpoint streams them (SSE); ``answer`` receives
        its sources and grounding status; ``grounding=False`` asks the model alone."""
        key = self.api_key()
        if not key:
            raise EndpointError(
                f"no API key: set {KEY_ENV} to your key, or run 'appliance init' to write "
                f"{Path(self.engine.home) / KEY_FILE}"
            )
        yield from endpoint.stream_chat(
            self.endpoint(), key, messages, model, max_tokens, timeout, grounding=grounding, answer=answer
        )


def _optional(read: Callable[[], T]) -> T | None:
    """A view the caller can do without: the engine's refusal (a revoked key, say) leaves it unknown
    instead of failing the whole poll; the screen that needs it says why when asked."""
    try:
        return read()
    except ApplianceError:
        return None
