"""The running backends: ``serve.replicas`` per spec (one per GPU by default), started on
demand by a backend factory (the real one starts a native llama-server), at most
``serve.keep_loaded`` specs kept, least recently used retired first, none stopped while a
request holds it; a watcher thread starts what a promotion needs as soon as its ``current``
link moves. A spec is ready when every replica answers; each request goes to the replica
with the fewest in flight; a replica that dies is restarted while the others answer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import anyio
import httpx

from appliance.contract.errors import ApplianceError, RegistryError, ServeError
from appliance.home import catalog, registry
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, sha256_file
from appliance.home.keys import Key
from appliance.home.paths import Home
from appliance.runtime.llama_server import LAUNCHER, Backend
from appliance.serving.backends import EMBEDDING, START_TIMEOUT, BackendFactory, LlamaServers, replica_count
from appliance.serving.resolve import ALIAS, RETRY_FAILED, Adapter, Answering, Resolver, Spec, Target

EMBED_TIMEOUT = 120.0  # seconds for a batch of passages on a busy CPU, the model's start included
log = logging.getLogger("appliance.serve")
WATCH_SECONDS = 0.25
PREPARED_SECONDS = 600.0  # how long a host started by prepare() is kept for the promotion it precedes
# Replicas load side by side on these threads. Long-lived on purpose, like LAUNCHER: a
# llama-server dies with the thread that spawned it (its parent-death signal), so a
# short-lived pool's threads would take the replicas with them when the pool ends.
REPLICA_LAUNCHER = ThreadPoolExecutor(max_workers=16, thread_name_prefix="llama-server-replica")


class BackendPool:
    """Running backends by spec (its replicas), started on demand, least recently used retired."""

    def __init__(self, home: Home, settings: Settings, start_backend: BackendFactory | None = None):
        self.home = home.top
        self.settings = settings
        self.keep = settings.serve.keep_loaded
        self.resolver = Resolver(self.home)
        self._start_backend = start_backend or LlamaServers(self.home, settings)
        self.replicas = replica_count(settings)
        self._ready: OrderedDict[str, list[Backend]] = OrderedDict()  # spec name -> its live replicas
        self._specs: dict[str, Spec] = {}
        self._starting: dict[str, Future] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._prepared: dict[str, float] = {}
        self._last: dict[str, str] = {}  # collection -> spec name that last answered its current model
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- model ids -> specs (the resolver's, named here for the server and the watcher)
    def target(self, model_id: object, key: Key | None = None) -> Target:
        return self.resolver.target(model_id, key)

    def refresh_host(self, override: Adapter | None = None) -> Spec | None:
        return self.resolver.refresh_host(override)

    # --- starting
    def ensure(self, spec: Spec) -> Future:
        """A future for a ready backend of ``spec`` (its least busy replica), starting them
        when none runs (thread-safe)."""
        with self._lock:
            replicas = self._ready.get(spec.name)
            if replicas is not None:
                self._replace_dead(spec, replicas)
                if replicas:
                    self._ready.move_to_end(spec.name)
                    done: Future = Future()
                    done.set_result(_least_busy(replicas))
                    return done
                self._ready.pop(spec.name)  # every replica died: start them all again
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
        started = time.monotonic()
        try:
            if bad := [(a, why) for a in spec.adapters if (why := _adapter_problem(a, spec.sha256))]:
                # one collection's broken adapter must not keep the others' host from starting:
                # the next host is built without it, and its own requests get this error
                self.resolver.set_aside(a for a, _ in bad)
                raise RegistryError(f"{bad[0][0].path}: {bad[0][1]}; not serving it")
            # only files the appliance built, byte for byte (the embedding model is the one IT named in config)
            if not spec.embedding and not _intact(spec.gguf, spec.sha256):
                raise RegistryError(
                    f"{spec.gguf}: the file does not match the sha256 recorded when it was built; not serving it"
                )
            backends = self._start_replicas(spec, 1 if spec.embedding else self.replicas)
        except (RegistryError, ServeError, OSError) as exc:
            message = f"model {spec.describe()} could not be loaded: {str(exc).splitlines()[0]}"
            log.error("%s", message)
            with self._lock:
                self._starting.pop(spec.name, None)
                self._failed[spec.name] = (time.monotonic(), message)
            raise ServeError(message) from None
        with self._lock:
            self._starting.pop(spec.name, None)
            self._failed.pop(spec.name, None)
            if self._closed.is_set():
                for backend in backends:
                    LAUNCHER.submit(backend.stop)
                raise ServeError("the endpoint is shutting down")
            self._ready[spec.name] = backends
            self._specs[spec.name] = spec
            self._retire_superseded()
            self._retire_extra(protect={spec.name})
        log.info(
            "llama-server for %s ready in %.1f s%s",
            spec.describe(),
            time.monotonic() - started,
            f" ({len(backends)} replicas)" if len(backends) > 1 else "",
        )
        return backends[0]

    def _start_replicas(self, spec: Spec, count: int) -> list[Backend]:
        """``count`` backends of ``spec``, loading side by side; all of them or none (a
        promotion switches only once every replica of the new version answers)."""
        if count == 1:
            return [self._started(spec, 0)]
        futures = [REPLICA_LAUNCHER.submit(self._started, spec, i) for i in range(count)]
        backends, errors = [], []
        for future in futures:
            try:
                backends.append(future.result())
            except (RegistryError, ServeError, OSError) as exc:
                errors.append(exc)
        if errors:
            for backend in backends:
                LAUNCHER.submit(backend.stop)
            raise errors[0]
        return backends

    def _started(self, spec: Spec, replica: int) -> Backend:
        backend = self._start_backend(spec, replica)
        backend.spec, backend.replica = spec, replica
        return backend

    def _replace_dead(self, spec: Spec, replicas: list[Backend]) -> None:
        """Under the lock: drop ``spec``'s dead replicas (killed, crashed) and restart each in
        the background while the others answer; with none left, the caller starts them all."""
        for backend in [b for b in replicas if not b.alive()]:
            log.error(
                "llama-server for %s (replica %d) stopped unexpectedly (code %s); restarting it",
                spec.name,
                backend.replica,
                backend.proc.returncode if backend.proc else None,
            )
            replicas.remove(backend)
            LAUNCHER.submit(backend.stop)
            if replicas:
                LAUNCHER.submit(self._restart_replica, spec, backend.replica)

    def _restart_replica(self, spec: Spec, replica: int) -> None:
        try:
            backend = self._started(spec, replica)
        except (RegistryError, ServeError, OSError) as exc:
            log.error("replica %d of %s could not be restarted: %s", replica, spec.name, str(exc).splitlines()[0])
            return
        with self._lock:
            replicas = self._ready.get(spec.name)
            wanted = 1 if spec.embedding else self.replicas
            if replicas is None or self._closed.is_set() or len(replicas) >= wanted:
                LAUNCHER.submit(backend.stop)  # retired, closed or started again meanwhile
                return
            replicas.append(backend)
        log.info("llama-server for %s (replica %d) answers again", spec.name, replica)

    # --- retiring
    def _protected(self) -> set[str]:
        now = time.monotonic()
        self._prepared = {n: t for n, t in self._prepared.items() if now - t < PREPARED_SECONDS}
        host = self.resolver.host
        return {registry.current(self.home) or "", host.name if host else "", *self._prepared}

    def _retire(self, name: str, why: str) -> None:
        """Under the lock: no new requests for ``name``; each replica stops when its last one is done."""
        replicas = self._ready.pop(name)
        log.info(
            "retiring llama-server for %s (%s; %d requests in flight)", name, why, sum(b.inflight for b in replicas)
        )
        for backend in replicas:
            backend.retired = True
            if backend.inflight == 0:
                LAUNCHER.submit(backend.stop)

    def _retire_superseded(self) -> None:
        """Under the lock: once the current adapter host is ready, older hosts only cost memory."""
        host = self.resolver.host
        if host is None or host.name not in self._ready:
            return
        protect = self._protected()
        for name in [n for n in self._ready if self._specs[n].host and n not in protect]:
            self._retire(name, "superseded by the adapter host " + host.name)

    def _retire_extra(self, protect: set[str]) -> None:
        """Under the lock: keep at most ``keep`` backends; one still answering stops when drained."""
        protect = protect | self._protected()
        models = [n for n in self._ready if not self._specs[n].embedding]  # the embedding model is not a version
        extra = len(models) - self.keep
        for name in models:
            if extra <= 0:
                return
            if name not in protect:
                self._retire(name, f"more than {self.keep} loaded")
                extra -= 1

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
            assert backend is not None  # each branch above found one or raised
            answering = _answering(backend, target)
            with self._lock:
                backend = self._least_busy_replica(backend, answering.lora)
                if backend.retired or not backend.alive():
                    continue
                answering = replace(answering, backend=backend)
                backend.inflight += 1
                if answering.lora is not None:
                    answering.slot = _take_slot(backend, answering.lora)
            if target.current:
                self._last[target.collection] = backend.version
            return answering
        raise ServeError(f"model {target.spec.name} is being replaced; try again")

    def embedding(self) -> Spec | None:
        """The embedding model IT configured in ``[grounding] embedding_model``, or None."""
        path = self.settings.grounding.embedding_model
        return Spec(EMBEDDING, Path(path).expanduser(), "", (), embedding=True) if path else None

    async def acquire_embedding(self, spec: Spec) -> Answering:
        """The embedding backend, counted in flight until :meth:`release`."""
        return await anyio.to_thread.run_sync(self.hold_embedding, spec)

    def hold_embedding(self, spec: Spec, timeout: float | None = None) -> Answering:
        """:meth:`acquire_embedding`, blocking (retrieval's worker threads embed through it)."""
        for _ in range(5):
            backend = self.ensure(spec).result(timeout)
            with self._lock:
                if backend.retired or not backend.alive():
                    continue
                backend.inflight += 1
            return Answering(backend, spec.name)
        raise ServeError("the embedding model is being restarted; try again")

    def embed(self, texts: list[str], timeout: float = EMBED_TIMEOUT) -> list[list[float]]:
        """Vectors for ``texts`` from the configured embedding model (blocking: retrieval's
        worker threads call it). Raises ServeError when none is configured or it fails."""
        spec = self.embedding()
        if spec is None:
            raise ServeError("no embedding model is configured")
        answering = self.hold_embedding(spec, timeout)
        try:
            transport = httpx.HTTPTransport(uds=str(answering.backend.socket))
            with httpx.Client(transport=transport, base_url="http://backend", timeout=timeout) as client:
                reply = client.post("/v1/embeddings", json={"input": texts, "model": spec.name})
            if reply.status_code != 200:
                raise ServeError(f"the embedding model answered {reply.status_code}: {reply.text[:200]}")
            data = sorted(reply.json()["data"], key=lambda d: d["index"])
            return [d["embedding"] for d in data]
        except httpx.HTTPError as problem:
            raise ServeError(f"the embedding model did not answer: {problem}") from problem
        finally:
            self.release(answering.backend)

    def _least_busy_replica(self, backend: Backend, lora: int | None) -> Backend:
        """Under the lock: the live replica of ``backend``'s spec with the fewest requests in
        flight (an idle slot that last ran the request's adapter breaks ties)."""
        spec = backend.spec
        replicas = self._ready.get(spec.name, []) if isinstance(spec, Spec) else []
        live = [b for b in replicas if b.alive() and not b.retired]
        return _least_busy(live, lora) if live else backend

    def _running_with(self, adapter: Adapter, preferred: str) -> Backend | None:
        """A ready adapter host holding exactly ``adapter`` (``preferred`` first): a collection
        whose adapter did not change keeps answering while a new host loads."""
        with self._lock:
            ready = [
                _least_busy(live)
                for n, replicas in self._ready.items()
                if self._specs[n].index(adapter) is not None and (live := [b for b in replicas if b.alive()])
            ]
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
            live = [b for b in self._ready.get(name, []) if b.alive()]
        backend = _least_busy(live) if live else None
        if backend is None:
            return None
        log.warning(
            "%s points at %s, which cannot be served; %s keeps answering",
            catalog.model_id(target.collection),
            target.spec.describe(),
            name,
        )
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
        """A version retired or pruned from the registry (forget) stops being served at once."""
        with self._lock:
            for name in [n for n in self._ready if not all(r.exists() for r in self._specs[n].records)]:
                self._retire(name, "a version it serves left the registry")

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._ready)

    def backends(self, name: str | None = None) -> list[Backend]:
        """The running replicas of spec ``name``, or of every loaded spec."""
        with self._lock:
            return [b for n, replicas in self._ready.items() if name in (None, n) for b in replicas]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            backends = [b for replicas in self._ready.values() for b in replicas]
            starting = list(self._starting.values())
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


def _least_busy(replicas: list[Backend], lora: int | None = None) -> Backend:
    """The replica with the fewest requests in flight; among equals, one with an idle slot
    that last ran adapter ``lora`` (its prompt cache is warm), then the lowest replica."""

    def warm(backend: Backend) -> bool:
        return lora is not None and any(
            not busy and ran == lora for busy, ran in zip(backend.slot_busy, backend.slot_lora, strict=True)
        )

    return min(replicas, key=lambda b: (b.inflight, not warm(b), b.replica))


def _answering(backend: Backend, target: Target) -> Answering:
    """The model id that answers on ``backend`` (a fallback may hold an older version)."""
    spec = backend.spec
    assert isinstance(spec, Spec)
    if not spec.adapters:
        return Answering(backend, spec.name)
    adapter = (
        target.adapter
        if target.adapter and spec.index(target.adapter) is not None
        else spec.of_collection(target.collection)
    )
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
    slot = max(idle, key=lambda i: (backend.slot_lora[i] == lora, backend.slot_lora[i] is None, -backend.slot_used[i]))
    backend.slot_busy[slot], backend.slot_lora[slot], backend.slot_used[slot] = True, lora, time.monotonic()
    return slot


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
