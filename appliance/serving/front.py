"""Stage 10, serve: the OpenAI-compatible endpoint (architecture.md, "The endpoint").

Two parts. The front (this module, Starlette on uvicorn) is the only thing clients
reach: bearer key (constant time), Host/Origin refusal, request limits, model ids,
one log line per request. Generation runs in native llama.cpp ``llama-server``
processes on private Unix sockets (appliance/runtime/llama_server.py says why: native speed,
and llama-server's own CORS/Host handling is not safe to expose). The front proxies
over a keep-alive httpx pool per backend, passing the backend's JSON or SSE bytes
through: each backend runs with ``--alias <model id>``, so the ``model`` field already
names what answered (only an adapter host's replies get their ``model`` rewritten).

Backends. A backend is started for a *spec* (:class:`Spec`): a merged model (the shared
collection's versions ``base``/``vN``, or a collection configured ``serve = "merged"``),
or the *adapter host*: the base model once, with every collection's current LoRA adapter
loaded beside it (``--lora`` each, at scale 0). A request for ``appliance/<collection>``
goes to the host with ``"lora": [{"id": i, "scale": 1.0}]`` for that collection's adapter:
switching adapters between requests costs no model load (llama.cpp applies them per
slot; slots with different adapters are simply not batched together). A collection
version that is not current (``appliance/<c>@vN``) gets a small host of its own.

Hot swap. The control channel is the ``current`` symlinks themselves (no extra socket):
model ids are resolved with a readlink per request, and a watcher thread polls the links
(every 0.25 s) to start what a promotion or rollback needs as soon as it lands: the
shared collection's new version, or a new adapter host with the changed adapter list.
New requests wait for the new backend to report ready (they are never sent to a
half-loaded model), except that a collection whose adapter did not change keeps using
the running host meanwhile; requests in flight finish on the backend they hold, and an
old backend is stopped only once its last request is done (a superseded adapter host
as soon as its successor is ready; otherwise at most ``serve.keep_loaded`` backends,
least recently used retired first). A backend that fails to start is not switched to:
requests for the collection's current model keep going to what last answered for it,
with a warning in the log, and only a request nothing can serve gets a 503. The daemon
may also call :meth:`Server.prepare` before promoting, so the switch costs no wait.

Access. Every ``/v1`` request carries a key (appliance/home/keys.py); a model id of a
collection the key may not see is answered exactly like an id that does not exist, and
``/v1/models`` lists only what the key sees. Each request's log line names the key; use
is summed per (key, model) and written to the audit log as ``key_use`` entries every
``serve.audit_flush_seconds`` and at stop: counts, token counts and times, never text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import AsyncIterator, Callable

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.home import audit, catalog, registry
from appliance.runtime import llama_server
from appliance.home.config import Settings
from appliance.contract.errors import ApplianceError, RegistryError, ServeError
from appliance.home.fsutil import read_json, sha256_file
from appliance.home.keys import Key, KeyStore
from appliance.runtime.llama_server import LAUNCHER, Backend
from appliance.home.paths import Home

log = logging.getLogger("appliance.serving.front")
# httpx logs every proxied call at INFO; the endpoint's own line per request is the record
logging.getLogger("httpx").setLevel(logging.WARNING)
ALIAS = "appliance"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
START_TIMEOUT = 300.0   # seconds for a backend to load its model
RETRY_FAILED = 30.0     # seconds before a version that failed to start is tried again
WATCH_SECONDS = 0.25
PREPARED_SECONDS = 600.0  # how long a host started by prepare() is kept for the promotion it precedes
KEY_SCOPE = "appliance.key"  # where Guard leaves the authenticated Key in the ASGI scope


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def unknown_model(model_id: str) -> LookupError:
    # The one answer for an id that does not exist *and* for one the key may not see: the
    # words depend only on what the client sent, never on what is there (no hint it exists).
    return LookupError(f"the model '{model_id[:100]}' does not exist; GET /v1/models lists the models")


# --- security front --------------------------------------------------------------


class Guard:
    """ASGI middleware: Host and Origin checks (DNS rebinding), bearer key on /v1.

    Written by hand because Starlette's TrustedHostMiddleware does not check Origin.
    The key is looked up with :meth:`KeyStore.authenticate` (constant-time compare, the
    file re-read when it changed, so a revoked key fails on its very next request) and
    left in the scope for the routes (``KEY_SCOPE``).
    """

    def __init__(self, app: ASGIApp, keys: KeyStore, allowed_hosts: set[str]):
        self.app = app
        self.keys = keys
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._refuse(scope, headers)
        if problem is not None:
            await problem(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> Response | None:
        host = _hostname(headers.get("host", ""))
        if host not in self.allowed_hosts:
            return error(403, "this endpoint only answers requests addressed to its own host name", "forbidden")
        origin = headers.get("origin")
        if origin is not None and _hostname(origin.split("://", 1)[-1]) not in self.allowed_hosts:
            return error(403, "cross-origin requests are not allowed", "forbidden")
        if scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            try:
                key = self.keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            except ApplianceError as exc:  # keys.json unreadable: one clear line, nobody gets in
                log.error("%s", exc)
                return error(503, "the endpoint cannot check API keys right now; see its log", "unavailable")
            if key is None:
                return error(401, "missing, wrong or revoked API key; send 'Authorization: Bearer <your key>' "
                                  "(an admin creates keys with 'appliance keys add')", "authentication_error")
            scope[KEY_SCOPE] = key
        return None


def _hostname(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class KeyUse:
    """Requests per (key, model) since the last flush, written to the audit log as ``key_use``
    entries: which key used which model when, with counts; never prompt or answer text."""

    def __init__(self, home: Home):
        self.home = home.top
        self._counts: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()

    def record(self, key: str, model: str, prompt: object, completion: object) -> None:
        now = time.time()
        with self._lock:
            entry = self._counts.setdefault((key, model), {"requests": 0, "first": now, "last": now,
                                                           "prompt_tokens": 0, "completion_tokens": 0})
            entry["requests"] += 1
            entry["last"] = now
            entry["prompt_tokens"] += prompt if isinstance(prompt, int) else 0
            entry["completion_tokens"] += completion if isinstance(completion, int) else 0

    def flush(self) -> int:
        """Write and forget what was counted; returns the number of entries written."""
        with self._lock:
            counts, self._counts = self._counts, {}
        for (key, model), entry in sorted(counts.items()):
            try:
                audit.append(self.home, "key_use", key=key, model=model, **entry)
            except OSError as exc:  # the endpoint keeps answering; the log says what was lost
                log.error("could not write key use to the audit log (%s): key=%s model=%s requests=%d",
                          exc, key, model, entry["requests"])
        return len(counts)


# --- what a model id is served by -----------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """One collection version's LoRA, as an adapter host loads it."""

    collection: str
    version: str
    path: Path
    sha256: str
    record: Path          # its version.json: the version leaving the registry stops its serving

    @property
    def model_id(self) -> str:
        return catalog.model_id(self.collection, self.version)


@dataclass(frozen=True)
class Spec:
    """What one llama-server runs: a model file, and for an adapter host its adapters in
    ``--lora`` order (a request's ``lora`` id is the index here)."""

    name: str                                  # the pool's key and the backend's --alias
    gguf: Path
    sha256: str                                # of ``gguf``, as the registry recorded it
    records: tuple[Path, ...]                  # version.json files that must still exist
    adapters: tuple[Adapter, ...] = ()
    host: bool = False                         # the host of every collection's current adapter

    def index(self, adapter: Adapter) -> int | None:
        return self.adapters.index(adapter) if adapter in self.adapters else None

    def of_collection(self, collection: str) -> Adapter | None:
        return next((a for a in self.adapters if a.collection == collection), None)


@dataclass(frozen=True)
class Target:
    """A request's model id resolved: the spec to serve it and, on an adapter spec, which adapter."""

    collection: str
    current: bool              # the id named the collection's current model (fallback allowed)
    spec: Spec
    adapter: Adapter | None = None


@dataclass
class Answering:
    """The backend a request holds (counted in flight) and the model id that answers."""

    backend: Backend
    model: str
    lora: int | None = None         # the adapter's index on an adapter host
    slot: int | None = None         # the llama-server slot it was sent to (adapter hosts)


# --- backends ------------------------------------------------------------------------


class BackendPool:
    """Running llama-server backends by spec, started on demand, least recently used retired."""

    def __init__(self, home: Home, settings: Settings):
        self.binary = llama_server.binary()  # a missing build is one clear line, before anything listens
        self.home = home.top
        self.settings = settings
        self.keep = settings.serve.keep_loaded
        self.threads = settings.serve.threads or len(os.sched_getaffinity(0))
        self._ready: OrderedDict[str, Backend] = OrderedDict()
        self._specs: dict[str, Spec] = {}
        self._starting: dict[str, Future] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._prepared: dict[str, float] = {}
        self._bad: dict[Adapter, float] = {}  # adapters whose file failed its check, left out of hosts for a while
        self._last: dict[str, str] = {}    # collection -> spec name that last answered its current model
        self._host: Spec | None = None     # the adapter host of every collection's current adapter
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        log.info("serving through native llama-server %s (%d slots, %d threads, context %d per slot)",
                 self.binary, settings.serve.slots, self.threads, settings.serve.context)

    # --- model ids -> specs
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
        host = self._host
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
        for collection in _served_collections(self.home):
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
            self._host = spec
        return spec

    # --- starting
    def ensure(self, spec: Spec) -> Future:
        """A future for a ready backend of ``spec``, starting one when none runs (thread-safe)."""
        with self._lock:
            backend = self._ready.get(spec.name)
            if backend is not None and backend.alive():
                self._ready.move_to_end(spec.name)
                done: Future = Future()
                done.set_result(backend)
                return done
            if backend is not None:  # it died under us (killed, crashed): forget it and start again
                log.error("llama-server for %s stopped unexpectedly (code %s); restarting it",
                          spec.name, backend.proc.returncode if backend.proc else None)
                self._ready.pop(spec.name)
                LAUNCHER.submit(backend.stop)
            if spec.name in self._starting:
                return self._starting[spec.name]
            failed = self._failed.get(spec.name)
            if failed and time.monotonic() - failed[0] < RETRY_FAILED:
                done = Future()
                done.set_exception(ServeError(failed[1]))
                return done
            if self._closed.is_set():
                done = Future()
                done.set_exception(ServeError("the endpoint is shutting down"))
                return done
            future = LAUNCHER.submit(self._start, spec)
            self._starting[spec.name] = future
            return future

    def _start(self, spec: Spec) -> Backend:
        serve = self.settings.serve
        backend = Backend(spec.name, spec.gguf, slots=serve.slots, context=serve.context, threads=self.threads,
                          log_path=self.home.logs / f"llama-server-{spec.name.replace('/', '_')}.log",
                          loras=tuple(a.path for a in spec.adapters))
        started = time.monotonic()
        try:
            if bad := [(a, why) for a in spec.adapters if (why := _adapter_problem(a, spec.sha256))]:
                # one collection's broken adapter must not keep the others' host from starting:
                # the next host is built without it, and its own requests get this error
                self._bad.update((a, time.monotonic()) for a, _ in bad)
                raise RegistryError(f"{bad[0][0].path}: {bad[0][1]}; not serving it")
            if not _intact(spec.gguf, spec.sha256):  # R3: only files the appliance built, byte for byte
                raise RegistryError(f"{spec.gguf}: the file does not match the sha256 recorded when it was built; "
                                    "not serving it")
            self.home.logs.mkdir(parents=True, exist_ok=True)
            backend.start()
            backend.wait_ready(START_TIMEOUT)
        except (RegistryError, ServeError, OSError) as exc:
            backend.stop()
            message = f"model {_describe(spec)} could not be loaded: {str(exc).splitlines()[0]}"
            log.error("%s", message)
            with self._lock:
                self._starting.pop(spec.name, None)
                self._failed[spec.name] = (time.monotonic(), message)
            raise ServeError(message) from None
        with self._lock:
            self._starting.pop(spec.name, None)
            self._failed.pop(spec.name, None)
            if self._closed.is_set():
                LAUNCHER.submit(backend.stop)
                raise ServeError("the endpoint is shutting down")
            backend.spec = spec
            self._ready[spec.name] = backend
            self._specs[spec.name] = spec
            self._retire_superseded()
            self._retire_extra(protect={spec.name})
        log.info("llama-server for %s ready in %.1f s", _describe(spec), time.monotonic() - started)
        return backend

    def _protected(self) -> set[str]:
        now = time.monotonic()
        self._prepared = {n: t for n, t in self._prepared.items() if now - t < PREPARED_SECONDS}
        return {registry.current(self.home) or "", self._host.name if self._host else "", *self._prepared}

    def _retire(self, name: str, why: str) -> None:
        """Under the lock: no new requests for ``name``; it stops when its last one is done."""
        backend = self._ready.pop(name)
        backend.retired = True
        log.info("retiring llama-server for %s (%s; %d requests in flight)", name, why, backend.inflight)
        if backend.inflight == 0:
            LAUNCHER.submit(backend.stop)

    def _retire_superseded(self) -> None:
        """Under the lock: once the current adapter host is ready, older hosts only cost memory."""
        if self._host is None or self._host.name not in self._ready:
            return
        protect = self._protected()
        for name in [n for n in self._ready if self._specs[n].host and n not in protect]:
            self._retire(name, "superseded by the adapter host " + self._host.name)

    def _retire_extra(self, protect: set[str]) -> None:
        """Under the lock: keep at most ``keep`` backends; one still answering stops when drained."""
        protect = protect | self._protected()
        for name in list(self._ready):
            if len(self._ready) <= self.keep:
                return
            if name not in protect:
                self._retire(name, f"more than {self.keep} loaded")

    # --- per request
    async def acquire(self, model_id: object, key: Key | None = None) -> Answering:
        """A ready backend for the request, counted in flight until :meth:`release`."""
        target = self.target(model_id, key)
        for _ in range(5):  # a backend retired between "ready" and "counted" is looked up again
            backend = self._running_with(target.adapter, target.spec.name) if target.adapter else None
            if backend is None:
                try:
                    backend = await asyncio.wrap_future(self.ensure(target.spec))
                except ServeError:
                    backend = self._fallback(target)
                    if backend is None:
                        raise
            answering = _answering(backend, target)
            with self._lock:
                if backend.retired or not backend.alive():
                    continue
                backend.inflight += 1
                if answering.lora is not None:
                    answering.slot = _take_slot(backend, answering.lora)
            if target.current:
                self._last[target.collection] = backend.version
            return answering
        raise ServeError(f"model {target.spec.name} is being replaced; try again")

    def _running_with(self, adapter: Adapter, preferred: str) -> Backend | None:
        """A ready adapter host holding exactly ``adapter`` (``preferred`` first): a collection
        whose adapter did not change keeps answering while a new host loads."""
        with self._lock:
            ready = [b for n, b in self._ready.items() if self._specs[n].index(adapter) is not None and b.alive()]
            ready.sort(key=lambda b: b.version != preferred)
            if ready:
                self._ready.move_to_end(ready[0].version)
        return ready[0] if ready else None

    def _fallback(self, target: Target) -> Backend | None:
        """What last answered the collection's current model, when its new one cannot be served."""
        name = self._last.get(target.collection)
        if not target.current or name is None or name == target.spec.name:
            return None
        with self._lock:
            backend = self._ready.get(name)
        if backend is None or not backend.alive():
            return None
        log.warning("%s points at %s, which cannot be served; %s keeps answering",
                    catalog.model_id(target.collection), _describe(target.spec), name)
        return backend

    def release(self, backend: Backend, slot: int | None = None) -> None:
        with self._lock:
            backend.inflight -= 1
            if slot is not None:
                backend.slot_busy[slot] = False
            drained = backend.retired and backend.inflight == 0
        if drained:
            LAUNCHER.submit(backend.stop)

    # --- lifetime
    def start(self) -> None:
        """Start the symlink watcher (it starts the current backends)."""
        self._watcher = threading.Thread(target=self._watch, name="appliance-serve-watch", daemon=True)
        self._watcher.start()

    def prepare(self, version: str, timeout: float = START_TIMEOUT, collection: str = catalog.SHARED) -> None:
        """Start what serving ``collection``'s ``version`` as its current model needs, and wait
        until it answers (raises ServeError if it cannot); for an adapter collection that is
        the adapter host with this version's adapter in place of the current one."""
        served = catalog.served(self.home, collection, version)
        if served is None:
            raise ServeError(f"no model version {catalog.model_id(collection, version)}")
        if served.mode == "adapter" and served.adapter is not None:
            record = self.home.scoped(collection).model(version) / "version.json"
            spec = self.refresh_host(Adapter(collection, version, served.adapter, served.sha256, record))
        else:
            spec = self.target(catalog.model_id(collection, version)).spec
        assert spec is not None
        with self._lock:
            self._prepared[spec.name] = time.monotonic()
        self.ensure(spec).result(timeout=timeout)

    def _watch(self) -> None:
        seen: tuple[str | None, str | None] = (None, None)
        while not self._closed.is_set():
            try:
                current = self.target(ALIAS).spec if registry.current(self.home) is not None else None
                host = self.refresh_host()
                now = (current.name if current else None, host.name if host else None)
                if now != seen:
                    seen = now
                    for spec in (current, host):
                        if spec is not None:
                            self.ensure(spec)  # failures are logged in _start; requests then fall back
                with self._lock:
                    self._retire_superseded()
                self._drop_removed()
            except (ApplianceError, LookupError, OSError) as exc:  # a half-written registry: look again
                log.debug("serve watcher: %s", exc)
            self._closed.wait(WATCH_SECONDS)

    def _drop_removed(self) -> None:
        """A version retired or pruned from the registry (forget, R10) stops being served at once."""
        with self._lock:
            for name in [n for n in self._ready if not all(r.exists() for r in self._specs[n].records)]:
                self._retire(name, "a version it serves left the registry")

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._ready)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            backends, starting = list(self._ready.values()), list(self._starting.values())
            self._ready.clear()
        for future in starting:
            try:
                future.result(timeout=START_TIMEOUT)
            except Exception:  # noqa: BLE001  (already logged; closing regardless)
                pass
        for backend in backends:
            backend.stop()
        if self._watcher is not None:
            self._watcher.join(timeout=5)


def _answering(backend: Backend, target: Target) -> Answering:
    """The model id that answers on ``backend`` (a fallback may hold an older version)."""
    spec = backend.spec
    assert isinstance(spec, Spec)
    if not spec.adapters:
        return Answering(backend, spec.name)
    adapter = target.adapter if target.adapter and spec.index(target.adapter) is not None \
        else spec.of_collection(target.collection)
    assert adapter is not None  # only hosts holding the collection are chosen
    return Answering(backend, adapter.model_id, spec.index(adapter))


def _take_slot(backend: Backend, lora: int) -> int | None:
    """Under the pool's lock: the idle slot for a request with adapter ``lora``, preferring one
    that last ran that adapter. llama.cpp drops a slot's prompt cache when its adapter changes,
    and its own slot choice looks at prompts, not adapters: left to it, collections sharing a
    system prompt would keep evicting each other's cache. None (all busy): llama.cpp chooses."""
    idle = [i for i, busy in enumerate(backend.slot_busy) if not busy]
    if not idle:
        return None
    slot = max(idle, key=lambda i: (backend.slot_lora[i] == lora, backend.slot_lora[i] is None,
                                    -backend.slot_used[i]))
    backend.slot_busy[slot], backend.slot_lora[slot], backend.slot_used[slot] = True, lora, time.monotonic()
    return slot


def _describe(spec: Spec) -> str:
    if not spec.host:
        return spec.name
    return f"{spec.name} (adapters: {', '.join(a.model_id for a in spec.adapters)})"


def _adapter_problem(adapter: Adapter, base_sha256: str) -> str | None:
    """Why ``adapter`` must not be applied to the base whose file has ``base_sha256``, or None."""
    if not _intact(adapter.path, adapter.sha256):
        return "the file does not match the sha256 recorded when it was built"
    built_on = read_json(adapter.record).get("base_sha256")
    if built_on and built_on != base_sha256:  # e.g. the base was exported again since: other weights
        return f"the adapter was trained on another base model (sha256 {built_on[:12]}, served {base_sha256[:12]})"
    return None


def _intact(path: Path, sha256: str) -> bool:
    """Only files the appliance built are served: the hash must match the registry's record."""
    return path.exists() and sha256_file(path) == sha256


def _served_collections(home: Home) -> list[str]:
    """Collections with a ``current`` model (found under collections/ alone, no walk of the
    inbox, so the watcher can poll it)."""
    return [name for name in catalog.with_data(home) if home.scoped(name).current.is_symlink()]


# --- routes ------------------------------------------------------------------------

# What a request may set, with its check; anything else in the body is dropped, not
# forwarded (llama-server has many extensions: grammars, slot ids, LoRA scales ...).
NUMBERS = {"temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0), "repeat_penalty": (0.0, 10.0)}
PASSED = (*NUMBERS, "top_k", "seed", "stop", "stream", "ignore_eos")


def make_app(home: Home, settings: Settings, keys: KeyStore, pool: BackendPool, usage: KeyUse) -> Starlette:
    limits = settings.serve
    admitted = Admission(limits.max_concurrent)

    async def health(_: Request) -> Response:
        # unauthenticated: the shared model and a count, no collection's name
        return JSONResponse({"status": "ok", "model": registry.current(home), "backend": "llama-server",
                             "loaded": [n for n in pool.loaded() if "/" not in n]})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": _visible_models(home, request.scope[KEY_SCOPE])})

    async def generate(request: Request) -> Response:
        if not admitted.take():
            return error(429, f"too many concurrent requests (limit {limits.max_concurrent}); retry shortly",
                         "rate_limit_error")
        streaming = False
        try:
            response = await _generate(request)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:
            if not streaming:  # a stream gives its place back when it ends (its Lease)
                admitted.give()

    async def _generate(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        key: Key = request.scope[KEY_SCOPE]
        body = await _body(request, limits.max_prompt_bytes)
        if isinstance(body, Response):
            return body
        problem = _validate(body, chat, limits.max_tokens_limit)
        if problem:
            return error(400, problem)
        try:
            answering = await pool.acquire(body.get("model"), key)
        except LookupError as exc:
            return error(404, str(exc), "model_not_found")
        except ServeError as exc:
            return error(503, str(exc), "unavailable")
        backend = answering.backend
        forward = _forward_body(body, chat, answering, limits.max_tokens_limit)
        done = Done(request.url.path, answering.model, key.name, usage, forward["stream"])
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            reply = await _send(backend, path, forward)
        except httpx.TransportError as exc:
            pool.release(backend, answering.slot)
            log.error("llama-server for %s did not answer: %s", backend.version, exc)
            return error(503, f"model {answering.model} is not answering; try again", "unavailable")
        except BaseException:  # cancelled (client went away): the backend is ours no longer
            pool.release(backend, answering.slot)
            raise
        rename = _renamer(backend.version, answering.model)
        if reply.status_code != 200 or not forward["stream"]:
            try:
                content = await reply.aread()
            except httpx.TransportError as exc:
                log.error("llama-server for %s broke off its answer: %s", backend.version, exc)
                return error(503, f"model {answering.model} stopped answering; try again", "unavailable")
            finally:
                pool.release(backend, answering.slot)  # first: nothing below may keep a retired backend alive
                await reply.aclose()
            return _finish(done, reply.status_code, content, rename)
        lease = Lease(lambda: (pool.release(backend, answering.slot), admitted.give()))
        relay = _relay(reply, lease, done, rename)
        # A stream the client abandons before its first byte never runs the relay's
        # finally clause; the finalizer still gives the backend back.
        weakref.finalize(relay, lease.release)
        return StreamingResponse(relay, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
    ]
    hosts = set(LOOPBACK_NAMES) | {settings.serve.host.lower()}
    return Starlette(routes=routes, middleware=[Middleware(Guard, keys=keys, allowed_hosts=hosts)])


async def _send(backend: Backend, path: str, forward: dict) -> httpx.Response:
    """POST to the backend, once more on a fresh connection if the connection broke before any
    answer: cpp-httplib closes connections idle for 5 s, and reusing one just as it closes
    fails before llama-server has read the request (a backend that died is not asked again)."""
    client = backend.client()
    try:
        return await client.send(client.build_request("POST", path, json=forward), stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        if not backend.alive():
            raise
        log.warning("llama-server for %s dropped a kept-alive connection; sending again", backend.version)
        return await client.send(client.build_request("POST", path, json=forward), stream=True)


def _visible_models(home: Home, key: Key) -> list[dict]:
    """Every model id ``key`` may use: each visible collection's current id and its versions."""
    data: list[dict] = []
    for collection in (catalog.SHARED, *catalog.with_data(home)):  # models live there: no inbox walk
        if not key.sees(collection):
            continue
        scope = home.scoped(collection)
        if (current := registry.current(scope)) is not None:
            data.append({"id": catalog.model_id(collection), "object": "model", "owned_by": "appliance",
                         "version": current})
        data += [{"id": catalog.model_id(collection, v["version"]), "object": "model",
                  "created": int(v["created"]), "owned_by": "appliance"} for v in registry.versions(scope)]
    return data


def _renamer(alias: str, model: str) -> Callable[[bytes], bytes] | None:
    """llama-server names its --alias in every reply; an adapter host's alias is not the model
    id that answered, so that one field is rewritten in the bytes. JSON escapes every quote
    inside strings, so ``"model":"<alias>"`` cannot occur inside generated text."""
    if alias == model:
        return None
    old, new = json.dumps({"model": alias}, separators=(",", ":"))[1:-1].encode(), \
        json.dumps({"model": model}, separators=(",", ":"))[1:-1].encode()
    return lambda data: data.replace(old, new)


class Done:
    """A request's end: its one log line and its count for the key-use audit."""

    def __init__(self, path: str, model: str, key: str, usage: KeyUse, stream: bool):
        self.path, self.model, self.key, self.usage, self.stream = path, model, key, usage, stream
        self.started = time.monotonic()

    def __call__(self, status: int, prompt: object, completion: object) -> None:
        # Counts and timings only, never prompt or completion text (R12).
        log.info("request path=%s model=%s key=%s status=%d stream=%s prompt_tokens=%s completion_tokens=%s "
                 "seconds=%.3f", self.path, self.model, self.key, status, self.stream, prompt, completion,
                 time.monotonic() - self.started)
        self.usage.record(self.key, self.model, prompt, completion)


class Lease:
    """Runs ``release`` exactly once, from whichever of the stream's ends comes first."""

    def __init__(self, release: Callable[[], object]):
        self._release: Callable[[], object] | None = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


class Admission:
    """The concurrent-request limit (streams count until they end)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.active -= 1


async def _relay(reply: httpx.Response, lease: Lease, done: Done,
                 rename: Callable[[bytes], bytes] | None) -> AsyncIterator[bytes]:
    """The backend's SSE bytes as they come (with ``rename``, a line at a time, so the field it
    rewrites is never cut in two). The finally clause also runs when the client disconnects
    mid-stream, so the backend is always released."""
    tail = bytearray()
    carry = b""
    try:
        async for part in reply.aiter_raw():
            tail.extend(part)
            del tail[:-4096]  # only the end is kept: it carries the token counts
            if rename is not None:
                part = carry + part
                cut = part.rfind(b"\n") + 1
                part, carry = rename(part[:cut]), part[cut:]
                if not part:
                    continue
            yield part
        if carry and rename is not None:
            yield rename(carry)
    except httpx.TransportError as exc:
        log.error("llama-server for %s broke off a stream: %s", done.model, exc)
        yield b'data: {"error": {"message": "the model stopped answering", "type": "server_error"}}\n\n'
    finally:
        lease.release()
        prompt, completion = _stream_counts(bytes(tail))
        done(200, prompt, completion)
        try:
            await reply.aclose()
        except BaseException:  # noqa: BLE001  (cancelled while closing: the connection is dropped anyway)
            pass


def _finish(done: Done, status: int, content: bytes, rename: Callable[[bytes], bytes] | None) -> Response:
    """The backend's JSON reply as it came; a backend failure becomes a clear 502."""
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if status == 200 and isinstance(payload, dict):
        usage = payload.get("usage") or {}
        done(status, usage.get("prompt_tokens"), usage.get("completion_tokens"))
        return Response(rename(content) if rename else content, status_code=200, media_type="application/json")
    message = ""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        message = str(payload["error"].get("message", ""))[:300]
    done(status, None, None)
    if 400 <= status < 500:  # e.g. a prompt longer than the context: the client's to fix
        return error(status, message or "the model refused the request")
    return error(502, f"model {done.model} failed to answer ({status}: {message or 'no detail'})", "server_error")


def _stream_counts(tail: bytes) -> tuple[object, object]:
    """Token counts from the last SSE events (llama-server puts ``timings``, and ``usage``
    when asked, on its final chunk)."""
    for line in reversed(tail.split(b"\n")):
        if not line.startswith(b"data: {") or (b'"timings"' not in line and b'"usage"' not in line):
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            continue
        usage, timings = event.get("usage") or {}, event.get("timings") or {}
        prompt = usage.get("prompt_tokens", (timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0))
        return prompt, usage.get("completion_tokens", timings.get("predicted_n"))
    return None, None


def _forward_body(body: dict, chat: bool, answering: Answering, max_tokens_limit: int) -> dict:
    out: dict = {k: body[k] for k in PASSED if k in body and body[k] is not None}
    out["model"] = answering.backend.version
    if answering.lora is not None:  # the collection's adapter, and no other (a client's own "lora" never passes)
        out["lora"] = [{"id": answering.lora, "scale": 1.0}]
    if answering.slot is not None:
        out["id_slot"] = answering.slot
    out["stream"] = bool(body.get("stream"))
    if out["stream"] and isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
        out["stream_options"] = {"include_usage": True}
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    out["max_tokens"] = max_tokens if max_tokens is not None else min(256, max_tokens_limit)
    if chat:
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
    else:
        out["prompt"] = body["prompt"]
    return out


async def _body(request: Request, max_bytes: int) -> dict | Response:
    if int(request.headers.get("content-length") or 0) > max_bytes:
        return error(413, f"request body larger than {max_bytes} bytes")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > max_bytes:
            return error(413, f"request body larger than {max_bytes} bytes")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return error(400, "the request body is not valid JSON (UTF-8)")
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    return body


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _validate(body: dict, chat: bool, max_tokens_limit: int) -> str | None:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                return "each message needs a role (system, user or assistant) and text content"
    elif not isinstance(body.get("prompt"), str):
        return "'prompt' must be a string"
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit):
        return f"'max_tokens' must be an integer from 1 to {max_tokens_limit}"
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        return "'n' must be 1"
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or not 0 <= top_k <= 1000):
        return "'top_k' must be an integer from 0 to 1000"
    for key, (lo, hi) in NUMBERS.items():
        value = body.get(key)
        if value is not None and (not _is_number(value) or not lo <= value <= hi):
            return f"'{key}' must be a number from {lo:g} to {hi:g}"
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63):
        return "'seed' must be a 64-bit integer"
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 8
                                                           and all(isinstance(s, str) for s in stop))):
        return "'stop' must be a string or a list of up to 8 strings"
    for key in ("stream", "ignore_eos"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            return f"'{key}' must be true or false"
    return None


# --- running -----------------------------------------------------------------------


def check_bind(host: str, port: int, settings: Settings) -> None:
    if not is_loopback(host) and host != settings.serve.host:
        raise ServeError(f"refusing to listen on {host}: a non-loopback address must be set in config.toml [serve] host")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free port") from None


def read_api_key(home: Home) -> str:
    try:
        key = home.api_key.read_text().strip()
    except OSError:
        raise ServeError(f"{home.api_key}: API key file missing; run 'appliance init'") from None
    if not key:
        raise ServeError(f"{home.api_key}: API key file is empty")
    return key


class Server:
    """The endpoint: uvicorn in a background thread (demo, tests, daemon) or ``serve_forever``
    (the CLI). Stopping it stops every llama-server it started and writes the key-use audit."""

    def __init__(self, home: Home, settings: Settings, host: str | None = None, port: int | None = None):
        import uvicorn

        home = home.top
        self.host = host or settings.serve.host
        self.port = port or settings.serve.port
        check_bind(self.host, self.port, settings)
        read_api_key(home)  # an initialised home has its admin key; a missing or empty one is one clear line
        keys = KeyStore(home)
        keys.list()  # migrates a home made before keys.json, and finds an unreadable one now
        self.pool = BackendPool(home, settings)
        self.usage = KeyUse(home)
        self.flush_seconds = settings.serve.audit_flush_seconds
        app = make_app(home, settings, keys, self.pool, self.usage)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None
        self.home = home

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, wait_model: float = START_TIMEOUT) -> "Server":
        """Listen, and wait (up to ``wait_model`` s) for the current models' backends to load (the
        shared version and the adapter host); one that will not load is logged and answered
        with 503, the endpoint still starts."""
        self._begin()
        self._thread = threading.Thread(target=self._server.run, name="appliance-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self._end()
                raise ServeError(f"the endpoint did not start on {self.url}")
            time.sleep(0.05)
        for current in (lambda: self.pool.target(ALIAS).spec if registry.current(self.home) else None,
                        self.pool.refresh_host):
            try:
                if (spec := current()) is not None:
                    self.pool.ensure(spec).result(timeout=wait_model)
            except Exception as exc:  # noqa: BLE001  (logged by the pool; the endpoint answers 503 for it)
                log.error("a current model is not being served: %s", exc)
        return self

    def prepare(self, version: str, timeout: float = START_TIMEOUT, collection: str = catalog.SHARED) -> None:
        """Load what serving ``collection``'s ``version`` needs ahead of its promotion; raises
        ServeError if it cannot serve."""
        self.pool.prepare(version, timeout, collection)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=40)
        self._end()

    def serve_forever(self) -> None:
        self._begin()
        try:
            self._server.run()
        finally:
            self._end()

    def _begin(self) -> None:
        self.pool.start()
        self._flusher = threading.Thread(target=self._flush_every, name="appliance-key-use", daemon=True)
        self._flusher.start()

    def _end(self) -> None:
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        self.pool.close()
        self.usage.flush()  # after the last request ended: nothing counted is lost

    def _flush_every(self) -> None:
        while not self._stopping.wait(self.flush_seconds):
            self.usage.flush()
