"""What serves a model id: the request's id and key resolved to a *spec* (what one
llama-server runs: a merged model, or the base with adapters), read from the registry's
``current`` links on every call, so a promotion is seen by the very next request."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.contract.errors import ServeError
from appliance.home import catalog, registry
from appliance.home.fsutil import read_json
from appliance.home.keys import Key
from appliance.home.paths import Home
from appliance.runtime.llama_server import Backend
from appliance.serving.openai import unknown_model

ALIAS = "appliance"
RETRY_FAILED = 30.0  # seconds before a version (or an adapter) that failed to start is tried again


@dataclass(frozen=True)
class Adapter:
    """One collection version's LoRA, as an adapter host loads it."""

    collection: str
    version: str
    path: Path
    sha256: str
    record: Path  # its version.json: the version leaving the registry stops its serving

    @property
    def model_id(self) -> str:
        return catalog.model_id(self.collection, self.version)


@dataclass(frozen=True)
class Spec:
    """What one llama-server runs: a model file, and for an adapter host its adapters in
    ``--lora`` order (a request's ``lora`` id is the index here)."""

    name: str  # the pool's key and the backend's --alias
    gguf: Path
    sha256: str  # of ``gguf``, as the registry recorded it
    records: tuple[Path, ...]  # version.json files that must still exist
    adapters: tuple[Adapter, ...] = ()
    host: bool = False  # the host of every collection's current adapter
    embedding: bool = False  # an embedding model (/v1/embeddings), named in config

    def index(self, adapter: Adapter) -> int | None:
        return self.adapters.index(adapter) if adapter in self.adapters else None

    def of_collection(self, collection: str) -> Adapter | None:
        return next((a for a in self.adapters if a.collection == collection), None)

    def describe(self) -> str:
        """The name for log lines (an adapter host's with the model ids it serves)."""
        if not self.host:
            return self.name
        return f"{self.name} (adapters: {', '.join(a.model_id for a in self.adapters)})"


@dataclass(frozen=True)
class Target:
    """A request's model id resolved: the spec to serve it and, on an adapter spec, which adapter."""

    collection: str
    current: bool  # the id named the collection's current model (fallback allowed)
    spec: Spec
    adapter: Adapter | None = None


@dataclass
class Answering:
    """The backend a request holds (counted in flight) and the model id that answers."""

    backend: Backend
    model: str
    lora: int | None = None  # the adapter's index on an adapter host
    slot: int | None = None  # the llama-server slot it was sent to (adapter hosts)


class Resolver:
    """Model ids to specs, and the adapter host: the one spec with every collection's
    current adapter, remembered as the one to serve them from."""

    def __init__(self, home: Home):
        self.home = home.top
        self.host: Spec | None = None  # the adapter host of every collection's current adapter
        self._bad: dict[Adapter, float] = {}  # adapters whose file failed its check, left out of hosts for a while

    def target(self, model_id: object, key: Key | None = None) -> Target:
        """How to serve ``model_id`` for ``key``. LookupError for an id that does not exist or
        that the key may not see (the same words); ServeError when nothing is promoted."""
        if model_id in (None, ""):
            model_id = ALIAS
        if not isinstance(model_id, str):
            raise LookupError("'model' must be a string; GET /v1/models lists the models")
        try:
            collection, version = catalog.parse_model_id(model_id)
        except LookupError:
            raise unknown_model(model_id) from None
        if key is not None and not key.sees(collection):
            raise unknown_model(model_id)
        served = catalog.served(self.home, collection, version)
        if served is None:
            if version is None and (collection == catalog.SHARED or self._exists(collection)):
                where = "" if collection == catalog.SHARED else f" in collection '{collection}'"
                raise ServeError(f"no model has been promoted{where} yet")
            raise unknown_model(model_id)
        record = self.home.scoped(collection).model(served.version) / "version.json"
        if served.mode != "adapter" or served.adapter is None:
            name = catalog.model_id(collection, served.version)
            return Target(collection, version is None, Spec(name, served.gguf, served.sha256, (record,)))
        adapter = Adapter(collection, served.version, served.adapter, served.sha256, record)
        host = self.host
        if version is None and (host is None or host.index(adapter) is None):
            host = self.refresh_host()  # promoted since the watcher last looked
        if host is not None and host.index(adapter) is not None:
            return Target(collection, version is None, host, adapter)
        return Target(collection, version is None, self._adapter_spec((adapter,), adapter.model_id), adapter)

    def _exists(self, collection: str) -> bool:
        scope = self.home.scoped(collection)
        return scope.inbox.is_dir() or scope.models.is_dir()

    def _adapter_spec(self, adapters: tuple[Adapter, ...], name: str | None = None, host: bool = False) -> Spec:
        base_version, base = catalog.base_model(self.home)
        record = self.home.model(base_version) / "version.json"
        sha = read_json(record)["sha256"] if record.exists() else ""
        if name is None:  # named by content: the same adapters give the same host
            ids = json.dumps([[a.collection, a.version, a.sha256] for a in adapters]).encode()
            name = "adapters-" + hashlib.sha256(ids).hexdigest()[:12]
        return Spec(name, base, sha, (record, *(a.record for a in adapters)), adapters, host)

    def refresh_host(self, override: Adapter | None = None) -> Spec | None:
        """The adapter host for every collection's current adapter (``override`` in place of its
        collection's), remembered as the one to serve from unless ``override`` is given."""
        adapters: dict[str, Adapter] = {}
        for collection in served_collections(self.home):
            served = catalog.served(self.home, collection)
            if served is not None and served.mode == "adapter" and served.adapter is not None:
                record = self.home.scoped(collection).model(served.version) / "version.json"
                adapter = Adapter(collection, served.version, served.adapter, served.sha256, record)
                if time.monotonic() - self._bad.get(adapter, -RETRY_FAILED) >= RETRY_FAILED:
                    adapters[collection] = adapter
        if override is not None:
            adapters[override.collection] = override
        spec = self._adapter_spec(tuple(adapters[c] for c in sorted(adapters)), host=True) if adapters else None
        if override is None:
            self.host = spec
        return spec

    def set_aside(self, adapters: Iterable[Adapter]) -> None:
        """Leave ``adapters`` (their files failed a check) out of the next hosts for a while:
        one collection's broken adapter must not keep the others' host from starting."""
        now = time.monotonic()
        self._bad.update((a, now) for a in adapters)


def served_collections(home: Home) -> list[str]:
    """Collections with a ``current`` model (found under collections/ alone, no walk of the
    inbox, so the watcher can poll it)."""
    return [name for name in catalog.with_data(home) if home.scoped(name).current.is_symlink()]


def visible_models(home: Home, key: Key, embedding: Spec | None = None) -> list[dict]:
    """Every model id ``key`` may use, as OpenAI lists models (id, object, created, owned_by) with
    the appliance's own fields: each visible collection's current id and its versions, and the
    embedding model when one is configured."""
    data: list[dict] = []
    for collection in (catalog.SHARED, *catalog.with_data(home)):  # models live there: no inbox walk
        if not key.sees(collection):
            continue
        scope = home.scoped(collection)
        versions = {v["version"]: v for v in registry.versions(scope)}
        if (current := registry.current(scope)) is not None:
            data.append(_entry(catalog.model_id(collection), collection, versions.get(current, {"version": current})))
        data += [_entry(catalog.model_id(collection, v), collection, record) for v, record in versions.items()]
    if embedding is not None:
        created = int(embedding.gguf.stat().st_mtime) if embedding.gguf.exists() else 0
        data.append(
            {"id": embedding.name, "object": "model", "created": created, "owned_by": "appliance", "kind": "embedding"}
        )
    return data


def _entry(model_id: str, collection: str, record: dict) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": int(record.get("created") or 0),
        "owned_by": "appliance",
        "version": record["version"],
        "collection": catalog.display(collection),
        "quant": record.get("quant"),
    }
