"""Grounded answers (issue 18): the passages of a collection's documents that a question
retrieves, put into its prompt and returned as ``sources``.

Retrieval runs over one collection only, the one the model id names (the guard has already
checked that the key may see it): a passage of another collection is never retrieved,
shown or cited. The index is opened per query (milliseconds), so an index that ingest or
``forget`` has just rewritten is read as it is now. A missing or corrupt index is rebuilt
from the store in a background thread with one log line; meanwhile answers come from the
model alone, ``sources: []`` and a ``grounding`` status saying why.

Retrieval is hybrid: the question's vector finds the nearest passages, and they are fused
with BM25's by reciprocal rank, so a question put in other words than the document's still
finds its passage. The vectors come from the embedding GGUF IT names (``[grounding]
embedding_model``: llama.cpp's embedding mode, the endpoint's own ``/v1/embeddings``
backend), else from the word vectors shipped with the appliance (``data/wordvectors.py``;
``[grounding] word_vectors = false``: BM25 alone). Passage vectors are made in the background, a few at a time, after ingest; until a
passage has one, BM25 alone can find it. An embedding model that fails gives one log line
and BM25 alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.data import wordvectors
from appliance.data.grounded import Source, grounded_messages
from appliance.data.index import FUSION_DEPTH, Hit, Index, IndexCorrupt, retrieve
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
    retrieval: str | None = None  # "bm25", or "bm25+dense" with an embedding model

    def fields(self) -> dict[str, Any]:
        status = {"used": self.used, "reason": self.reason, "collection": catalog.display(self.collection)}
        return {
            "sources": [s.to_dict() for s in self.sources],
            "grounding": {**status, "retrieval": self.retrieval} if self.used else status,
        }


class OnePerKey:
    """Background jobs, at most one running per key: a start while one runs is dropped."""

    def __init__(self) -> None:
        self._running: set[object] = set()
        self._lock = threading.Lock()

    def start(self, key: object, name: str, work: Callable[[], None]) -> None:
        with self._lock:
            if key in self._running:
                return
            self._running.add(key)

        def run() -> None:
            try:
                work()
            finally:
                with self._lock:
                    self._running.discard(key)

        threading.Thread(target=run, name=name, daemon=True).start()


Embed = Callable[[list[str]], list[list[float]]]  # texts -> vectors, blocking
EMBED_BATCH = 16  # passages embedded per request in the background


def model_identity(path: str) -> str:
    """Which embedding model made a vector: a replaced file (new size or time) is a new model."""
    try:
        stat = Path(path).expanduser().stat()
    except OSError:
        return Path(path).name
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


class Dense:
    """The dense half of hybrid retrieval: query vectors now, passage vectors in the background."""

    def __init__(self, embed: Embed, model: str):
        self.embed, self.model = embed, model
        self._fills = OnePerKey()
        self._failing = False

    def search(self, index: Index, query: str) -> list[Hit]:
        """The passages nearest the question ([] when the model fails: BM25 answers alone)."""
        if index.unembedded(self.model, 1):
            self._fill(index.path)
        try:
            vector = np.asarray(self.embed([query])[0], dtype=np.float32)
        except Exception as problem:  # noqa: BLE001  (any failure of the model: one line, then BM25 alone)
            self._failed(problem)
            return []
        self._failing = False
        return index.nearest(self.model, vector, FUSION_DEPTH)

    def _failed(self, problem: BaseException) -> None:
        if not self._failing:
            log.warning("embedding model %s failed (%s); retrieving with BM25 alone", self.model, problem)
        self._failing = True

    def _fill(self, path: Path) -> None:
        """Vectors for the index's passages that have none, one background thread per index."""

        def work() -> None:
            try:
                with Index(path, any_thread=True) as index:
                    index.embed_missing(self.model, self.embed, EMBED_BATCH)
            except Exception as problem:  # noqa: BLE001  (the next request tries again)
                self._failed(problem)

        self._fills.start(path, f"index-vectors-{path.parent.name}", work)


def query_text(messages: list[dict[str, Any]], turns: int) -> str:
    """The last user turn, with the ``turns - 1`` user turns before it as context."""
    users = [joined(m.get("content")) for m in messages if m.get("role") == "user"]
    return "\n".join(str(u) for u in users[-turns:] if isinstance(u, str))


class Retriever:
    def __init__(self, home: Home, settings: Settings, embed: Embed | None = None):
        """``embed``: the configured embedding model's vectors (hybrid retrieval); without one,
        the shipped word vectors (``[grounding] word_vectors``), else BM25 alone."""
        self.home = home.top
        self.settings = settings
        model = settings.grounding.embedding_model
        self.dense: Dense | None = None
        if embed is not None and model:
            self.dense = Dense(embed, model_identity(model))
        elif not model and settings.grounding.word_vectors and wordvectors.available():
            self.dense = Dense(wordvectors.embed, wordvectors.identity())
        self._rebuilds = OnePerKey()

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
                hits, how = self._search(index, query)
        except IndexCorrupt as problem:
            if problem.reason == "missing" and not scope.store_db.exists():
                return Grounding(False, collection, "the collection holds no documents")
            self._rebuild(collection, problem.reason)
            return Grounding(False, collection, "the passage index is being rebuilt; answering from the model alone")
        sources = [Source(i, hit.path, hit.sha256, hit.text, hit.score) for i, hit in enumerate(hits, start=1)]
        return Grounding(True, collection, None, sources, how)

    def _search(self, index: Index, query: str) -> tuple[list[Hit], str]:
        """BM25's best passages (above ``min_score``), fused with the dense ones where there are any."""
        found = self.dense.search if self.dense else None
        return retrieve(index, query, self.settings.grounding.passages, found, self.settings.grounding.min_score)

    def _rebuild(self, collection: str, reason: str) -> None:
        """One rebuild per collection at a time, off the request's path."""

        def work() -> None:
            try:
                passages.rebuild(self.home.scoped(collection), reason=reason)
            except Exception:  # noqa: BLE001  (one line; the next request tries again)
                log.exception("rebuilding the passage index of collection %s failed", catalog.display(collection))

        self._rebuilds.start(collection, f"index-rebuild-{collection or 'shared'}", work)


def apply(forward: dict[str, Any], grounding: Grounding) -> dict[str, Any]:
    """The body llama-server gets, with the passages in its system message when grounding is used."""
    if not grounding.used:
        return forward
    return {**forward, "messages": grounded_messages(forward["messages"], grounding.sources)}
