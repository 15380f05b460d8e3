"""Grounded answers (issue 18): the passages of a collection's documents that a question
retrieves, put into its prompt and returned as ``sources``.

Retrieval runs over one collection only, the one the model id names (the guard has already
checked that the key may see it): a passage of another collection is never retrieved,
shown or cited. The index is opened per query (milliseconds), so an index that ingest or
``forget`` has just rewritten is read as it is now. A missing or corrupt index is rebuilt
from the store in a background thread with one log line; meanwhile answers come from the
model alone, ``sources: []`` and a ``grounding`` status saying why.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from appliance.data.grounded import Source, grounded_messages
from appliance.data.index import Index, IndexCorrupt
from appliance.data.ingest import passages
from appliance.home import catalog
from appliance.home.config import Settings
from appliance.home.paths import Home
from appliance.serving.openai import joined

log = logging.getLogger("appliance.serve")


@dataclass
class Grounding:
    """What retrieval did for one request: the fields its answer carries."""

    used: bool
    collection: str
    reason: str | None = None  # why the model answered alone
    sources: list[Source] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {
            "sources": [s.to_dict() for s in self.sources],
            "grounding": {"used": self.used, "reason": self.reason, "collection": catalog.display(self.collection)},
        }


def query_text(messages: list[dict[str, Any]], turns: int) -> str:
    """The last user turn, with the ``turns - 1`` user turns before it as context."""
    users = [joined(m.get("content")) for m in messages if m.get("role") == "user"]
    return "\n".join(str(u) for u in users[-turns:] if isinstance(u, str))


class Retriever:
    def __init__(self, home: Home, settings: Settings):
        self.home = home.top
        self.settings = settings
        self._rebuilding: set[str] = set()
        self._lock = threading.Lock()

    def mode(self, collection: str) -> str:
        own = self.settings.collections.get(collection)
        return (own.grounding if own is not None else None) or self.settings.grounding.mode

    def retrieve(self, collection: str, messages: list[dict[str, Any]]) -> Grounding:
        """The sources for a chat request to ``collection``'s current model (blocking: run it in a thread)."""
        if self.mode(collection) == "off":
            return Grounding(False, collection, "grounding is off for this collection")
        scope = self.home.scoped(collection)
        query = query_text(messages, self.settings.grounding.query_turns)
        try:
            with Index(scope.passage_index) as index:
                if index.count()["documents"] == 0:
                    return Grounding(False, collection, "the collection holds no documents")
                if not query.strip():
                    return Grounding(False, collection, "the question has no text to search for")
                hits = index.search(query, limit=self.settings.grounding.passages)
        except IndexCorrupt as problem:
            if problem.reason == "missing" and not scope.store_db.exists():
                return Grounding(False, collection, "the collection holds no documents")
            self._rebuild(collection, problem.reason)
            return Grounding(False, collection, "the passage index is being rebuilt; answering from the model alone")
        floor = self.settings.grounding.min_score
        sources = [
            Source(i, hit.path, hit.sha256, hit.text, hit.score)
            for i, hit in enumerate((h for h in hits if h.score > floor), start=1)
        ]
        return Grounding(True, collection, None, sources)

    def _rebuild(self, collection: str, reason: str) -> None:
        """One rebuild per collection at a time, off the request's path."""
        with self._lock:
            if collection in self._rebuilding:
                return
            self._rebuilding.add(collection)

        def work() -> None:
            try:
                passages.rebuild(self.home.scoped(collection), reason=reason)
            except Exception:  # noqa: BLE001  (one line; the next request tries again)
                log.exception("rebuilding the passage index of collection %s failed", catalog.display(collection))
            finally:
                with self._lock:
                    self._rebuilding.discard(collection)

        threading.Thread(target=work, name=f"index-rebuild-{collection or 'shared'}", daemon=True).start()


def apply(forward: dict[str, Any], grounding: Grounding) -> dict[str, Any]:
    """The body llama-server gets, with the passages in its system message when grounding is used."""
    if not grounding.used:
        return forward
    return {**forward, "messages": grounded_messages(forward["messages"], grounding.sources)}
