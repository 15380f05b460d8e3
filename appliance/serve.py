"""Stage 10, serve: the OpenAI-compatible endpoint (architecture.md, "The endpoint").

Two parts. The front (this module, Starlette on uvicorn) is the only thing clients
reach: bearer key (constant time), Host/Origin refusal, request limits, model ids,
one log line per request. Generation runs in native llama.cpp ``llama-server``
processes, one per loaded version, on private Unix sockets (appliance/llama_server.py
says why: native speed, and llama-server's own CORS/Host handling is not safe to
expose). The front proxies over a keep-alive httpx pool per backend, passing the
backend's JSON or SSE bytes through unchanged: each backend runs with ``--alias
<version>``, so every ``model`` field already names the exact version that answered.

Hot swap. The control channel is the ``models/current`` symlink itself (no extra
socket): model id ``appliance`` is resolved with one readlink per request, and a
watcher thread polls the link (every 0.25 s) to start the new version's backend as
soon as a promotion or rollback lands. New ``appliance`` requests wait for the new
backend to report ready (they are never sent to a half-loaded model), requests in
flight finish on the backend they hold, and an old backend is stopped only once its
last request is done (at most ``serve.keep_loaded`` backends, least recently used
retired first). A version whose backend fails to start is not switched to: requests
for ``appliance`` keep going to the version that last answered, with a warning in the
log, and only a request nothing can serve gets a 503. The daemon may also call
:meth:`Server.prepare` before promoting, so the switch costs requests no wait at all.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from ipaddress import ip_address
from typing import AsyncIterator, Callable

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import llama_server, registry
from .config import Settings
from .errors import RegistryError, ServeError
from .llama_server import LAUNCHER, Backend
from .paths import Home

log = logging.getLogger("appliance.serve")
# httpx logs every proxied call at INFO; the endpoint's own line per request is the record
logging.getLogger("httpx").setLevel(logging.WARNING)
ALIAS = "appliance"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
START_TIMEOUT = 300.0   # seconds for a backend to load its model
RETRY_FAILED = 30.0     # seconds before a version that failed to start is tried again
WATCH_SECONDS = 0.25


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


# --- security front --------------------------------------------------------------


class Guard:
    """ASGI middleware: Host and Origin checks (DNS rebinding), bearer key on /v1.

    Written by hand because Starlette's TrustedHostMiddleware does not check Origin
    and the key comparison must be constant-time.
    """

    def __init__(self, app: ASGIApp, api_key: str, allowed_hosts: set[str]):
        self.app = app
        self.api_key = api_key.encode()
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._refuse(scope["path"], headers)
        if problem is not None:
            await problem(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refuse(self, path: str, headers: dict[str, str]) -> Response | None:
        host = _hostname(headers.get("host", ""))
        if host not in self.allowed_hosts:
            return error(403, "this endpoint only answers requests addressed to its own host name", "forbidden")
        origin = headers.get("origin")
        if origin is not None and _hostname(origin.split("://", 1)[-1]) not in self.allowed_hosts:
            return error(403, "cross-origin requests are not allowed", "forbidden")
        if path.startswith("/v1"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                return error(401, "missing or wrong API key; send 'Authorization: Bearer <key from the home's api_key file>'",
                             "authentication_error")
        return None


def _hostname(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


# --- backends ------------------------------------------------------------------------


class BackendPool:
    """Running llama-server backends by version, started on demand, least recently used retired."""

    def __init__(self, home: Home, settings: Settings):
        self.binary = llama_server.binary()  # a missing build is one clear line, before anything listens
        self.home = home
        self.settings = settings
        self.keep = settings.serve.keep_loaded
        self.threads = settings.serve.threads or len(os.sched_getaffinity(0))
        self._ready: OrderedDict[str, Backend] = OrderedDict()
        self._starting: dict[str, Future] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self.last_alias: str | None = None  # the version that last answered for ``appliance``
        log.info("serving through native llama-server %s (%d slots, %d threads, context %d per slot)",
                 self.binary, settings.serve.slots, self.threads, settings.serve.context)

    # model ids -> versions
    def resolve(self, model_id: object) -> tuple[str, bool]:
        """(version, is_alias); LookupError for an unknown id, ServeError when nothing is promoted."""
        if model_id in (None, "", ALIAS):
            current = registry.current(self.home)
            if current is None:
                raise ServeError("no model has been promoted yet")
            return current, True
        if not isinstance(model_id, str):
            raise LookupError("'model' must be a string; GET /v1/models lists the models")
        try:
            registry.get(self.home, model_id)
        except RegistryError:
            raise LookupError(f"the model '{model_id[:100]}' does not exist; GET /v1/models lists the models") from None
        return model_id, False

    # starting
    def ensure(self, version: str) -> Future:
        """A future for a ready backend of ``version``, starting one when none runs (thread-safe)."""
        with self._lock:
            backend = self._ready.get(version)
            if backend is not None and backend.alive():
                self._ready.move_to_end(version)
                done: Future = Future()
                done.set_result(backend)
                return done
            if backend is not None:  # it died under us (killed, crashed): forget it and start again
                log.error("llama-server for %s stopped unexpectedly (code %s); restarting it",
                          version, backend.proc.returncode if backend.proc else None)
                self._ready.pop(version)
                LAUNCHER.submit(backend.stop)
            if version in self._starting:
                return self._starting[version]
            failed = self._failed.get(version)
            if failed and time.monotonic() - failed[0] < RETRY_FAILED:
                done = Future()
                done.set_exception(ServeError(failed[1]))
                return done
            if self._closed.is_set():
                done = Future()
                done.set_exception(ServeError("the endpoint is shutting down"))
                return done
            future = LAUNCHER.submit(self._start, version)
            self._starting[version] = future
            return future

    def _start(self, version: str) -> Backend:
        serve = self.settings.serve
        backend = Backend(version, registry.gguf_path(self.home, version), slots=serve.slots, context=serve.context,
                          threads=self.threads, log_path=self.home.logs / f"llama-server-{version}.log")
        started = time.monotonic()
        try:
            registry.verify(self.home, version)  # R3: only files the appliance built, byte for byte
            self.home.logs.mkdir(parents=True, exist_ok=True)
            backend.start()
            backend.wait_ready(START_TIMEOUT)
        except (RegistryError, ServeError, OSError) as exc:
            backend.stop()
            message = f"model {version} could not be loaded: {str(exc).splitlines()[0]}"
            log.error("%s", message)
            with self._lock:
                self._starting.pop(version, None)
                self._failed[version] = (time.monotonic(), message)
            raise ServeError(message) from None
        with self._lock:
            self._starting.pop(version, None)
            self._failed.pop(version, None)
            if self._closed.is_set():
                LAUNCHER.submit(backend.stop)
                raise ServeError("the endpoint is shutting down")
            self._ready[version] = backend
            self._retire_extra(protect={version, registry.current(self.home)})
        log.info("llama-server for %s ready in %.1f s", version, time.monotonic() - started)
        return backend

    def _retire_extra(self, protect: set[str | None]) -> None:
        """Under the lock: keep at most ``keep`` backends; one still answering stops when drained."""
        for version in list(self._ready):
            if len(self._ready) <= self.keep:
                return
            if version in protect:
                continue
            backend = self._ready.pop(version)
            backend.retired = True
            log.info("retiring llama-server for %s (%d requests in flight)", version, backend.inflight)
            if backend.inflight == 0:
                LAUNCHER.submit(backend.stop)

    # per request
    async def acquire(self, model_id: object) -> Backend:
        """A ready backend for the request, counted in flight until :meth:`release`."""
        version, alias = self.resolve(model_id)
        for _ in range(5):  # a backend retired between "ready" and "counted" is looked up again
            try:
                backend = await asyncio.wrap_future(self.ensure(version))
            except ServeError:
                fallback = self.last_alias
                if not alias or fallback is None or fallback == version:
                    raise
                log.warning("'appliance' points at %s, which cannot be served; %s keeps answering", version, fallback)
                backend = await asyncio.wrap_future(self.ensure(fallback))
            with self._lock:
                if backend.retired or not backend.alive():
                    continue
                backend.inflight += 1
            if alias:
                self.last_alias = backend.version
            return backend
        raise ServeError(f"model {version} is being replaced; try again")

    def release(self, backend: Backend) -> None:
        with self._lock:
            backend.inflight -= 1
            drained = backend.retired and backend.inflight == 0
        if drained:
            LAUNCHER.submit(backend.stop)

    # lifetime
    def start(self) -> None:
        """Start the current version's backend and the symlink watcher."""
        self._watcher = threading.Thread(target=self._watch, name="appliance-serve-watch", daemon=True)
        self._watcher.start()

    def prepare(self, version: str, timeout: float = START_TIMEOUT) -> None:
        """Start ``version``'s backend and wait until it answers (raises ServeError if it cannot)."""
        self.ensure(version).result(timeout=timeout)

    def _watch(self) -> None:
        seen: str | None = None
        while not self._closed.is_set():
            current = registry.current(self.home)
            if current is not None and current != seen:
                seen = current
                self.ensure(current)  # failures are logged in _start; requests then fall back
            self._drop_removed()
            self._closed.wait(WATCH_SECONDS)

    def _drop_removed(self) -> None:
        """A version retired or pruned from the registry (forget, R10) stops being served at once."""
        with self._lock:
            gone = [v for v in self._ready if not (self.home.model(v) / "version.json").exists()]
            for version in gone:
                backend = self._ready.pop(version)
                backend.retired = True
                log.info("stopping llama-server for %s: the version left the registry", version)
                if backend.inflight == 0:
                    LAUNCHER.submit(backend.stop)

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


# --- routes ------------------------------------------------------------------------

# What a request may set, with its check; anything else in the body is dropped, not
# forwarded (llama-server has many extensions: grammars, slot ids, LoRA scales ...).
NUMBERS = {"temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0), "repeat_penalty": (0.0, 10.0)}
PASSED = (*NUMBERS, "top_k", "seed", "stop", "stream", "ignore_eos")


def make_app(home: Home, settings: Settings, api_key: str, pool: BackendPool) -> Starlette:
    limits = settings.serve
    admitted = Admission(limits.max_concurrent)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": registry.current(home), "backend": "llama-server",
                             "loaded": pool.loaded()})

    async def models(_: Request) -> Response:
        data = [{"id": ALIAS, "object": "model", "owned_by": "appliance", "version": registry.current(home)}]
        data += [{"id": v["version"], "object": "model", "created": int(v["created"]), "owned_by": "appliance"}
                 for v in registry.versions(home)]
        return JSONResponse({"object": "list", "data": data})

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
        body = await _body(request, limits.max_prompt_bytes)
        if isinstance(body, Response):
            return body
        problem = _validate(body, chat, limits.max_tokens_limit)
        if problem:
            return error(400, problem)
        try:
            backend = await pool.acquire(body.get("model"))
        except LookupError as exc:
            return error(404, str(exc), "model_not_found")
        except ServeError as exc:
            return error(503, str(exc), "unavailable")
        forward = _forward_body(body, chat, backend.version, limits.max_tokens_limit)
        started = time.monotonic()
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            client = backend.client()
            reply = await client.send(client.build_request("POST", path, json=forward), stream=True)
        except httpx.TransportError as exc:
            pool.release(backend)
            log.error("llama-server for %s did not answer: %s", backend.version, exc)
            return error(503, f"model {backend.version} is not answering; try again", "unavailable")
        except BaseException:  # cancelled (client went away): the backend is ours no longer
            pool.release(backend)
            raise
        if reply.status_code != 200 or not forward["stream"]:
            try:
                content = await reply.aread()
            except httpx.TransportError as exc:
                log.error("llama-server for %s broke off its answer: %s", backend.version, exc)
                return error(503, f"model {backend.version} stopped answering; try again", "unavailable")
            finally:
                pool.release(backend)  # first: nothing below may keep a retired backend alive
                await reply.aclose()
            return _finish(request.url.path, backend.version, reply.status_code, content, started)
        lease = Lease(lambda: (pool.release(backend), admitted.give()))
        relay = _relay(reply, backend.version, lease, request.url.path, started)
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
    return Starlette(routes=routes, middleware=[Middleware(Guard, api_key=api_key, allowed_hosts=hosts)])


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


async def _relay(reply: httpx.Response, version: str, lease: Lease, path: str,
                 started: float) -> AsyncIterator[bytes]:
    """The backend's SSE bytes as they come. The finally clause also runs when the client
    disconnects mid-stream, so the backend is always released."""
    tail = bytearray()
    try:
        async for part in reply.aiter_raw():
            tail.extend(part)
            del tail[:-4096]  # only the end is kept: it carries the token counts
            yield part
    except httpx.TransportError as exc:
        log.error("llama-server for %s broke off a stream: %s", version, exc)
        yield b'data: {"error": {"message": "the model stopped answering", "type": "server_error"}}\n\n'
    finally:
        lease.release()
        prompt, completion = _stream_counts(bytes(tail))
        _log(path, version, 200, prompt, completion, started, stream=True)
        try:
            await reply.aclose()
        except BaseException:  # noqa: BLE001  (cancelled while closing: the connection is dropped anyway)
            pass


def _finish(path: str, version: str, status: int, content: bytes, started: float) -> Response:
    """The backend's JSON reply as it came; a backend failure becomes a clear 502."""
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if status == 200 and isinstance(payload, dict):
        usage = payload.get("usage") or {}
        _log(path, version, status, usage.get("prompt_tokens"), usage.get("completion_tokens"), started)
        return Response(content, status_code=200, media_type="application/json")
    message = ""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        message = str(payload["error"].get("message", ""))[:300]
    _log(path, version, status, None, None, started)
    if 400 <= status < 500:  # e.g. a prompt longer than the context: the client's to fix
        return error(status, message or "the model refused the request")
    return error(502, f"model {version} failed to answer ({status}: {message or 'no detail'})", "server_error")


def _log(path: str, version: str, status: int, prompt: object, completion: object, started: float,
         stream: bool = False) -> None:
    # Counts and timings only, never prompt or completion text (R12).
    log.info("request path=%s model=%s status=%d stream=%s prompt_tokens=%s completion_tokens=%s seconds=%.3f",
             path, version, status, stream, prompt, completion, time.monotonic() - started)


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


def _forward_body(body: dict, chat: bool, version: str, max_tokens_limit: int) -> dict:
    out: dict = {k: body[k] for k in PASSED if k in body and body[k] is not None}
    out["model"] = version
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
    (the CLI). Stopping it stops every llama-server it started."""

    def __init__(self, home: Home, settings: Settings, host: str | None = None, port: int | None = None):
        import uvicorn

        self.host = host or settings.serve.host
        self.port = port or settings.serve.port
        check_bind(self.host, self.port, settings)
        api_key = read_api_key(home)
        self.pool = BackendPool(home, settings)
        app = make_app(home, settings, api_key, self.pool)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.home = home

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, wait_model: float = START_TIMEOUT) -> "Server":
        """Listen, and wait (up to ``wait_model`` s) for the current version's backend to load;
        a model that will not load is logged and answered with 503, the endpoint still starts."""
        self.pool.start()
        self._thread = threading.Thread(target=self._server.run, name="appliance-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.pool.close()
                raise ServeError(f"the endpoint did not start on {self.url}")
            time.sleep(0.05)
        if (current := registry.current(self.home)) is not None:
            try:
                self.pool.prepare(current, timeout=wait_model)
            except Exception as exc:  # noqa: BLE001  (logged by the pool; the endpoint answers 503 for it)
                log.error("the current model is not being served: %s", exc)
        return self

    def prepare(self, version: str, timeout: float = START_TIMEOUT) -> None:
        """Load ``version``'s backend ahead of a promotion; raises ServeError if it cannot serve."""
        self.pool.prepare(version, timeout)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=40)
        self.pool.close()

    def serve_forever(self) -> None:
        self.pool.start()
        try:
            self._server.run()
        finally:
            self.pool.close()
