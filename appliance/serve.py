"""Stage 10, serve: the OpenAI-compatible endpoint (architecture.md, "The endpoint").

The front (this module: auth, Host/Origin checks, limits, model ids, logging) is the
appliance's own; generation is llama.cpp through llama-cpp-python, one loaded model
per version, loaded on first use. ``appliance`` resolves to ``models/current`` at
each request, so a promotion switches new requests to the new version while requests
in flight finish on the model object they already hold.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Iterator

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import registry
from .config import Settings
from .errors import RegistryError, ServeError
from .paths import Home

log = logging.getLogger("appliance.serve")
ALIAS = "appliance"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


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


# --- models ----------------------------------------------------------------------


@dataclass
class Loaded:
    version: str
    llm: Any
    lock: threading.Lock


class ModelPool:
    """Loaded llama.cpp models by version, least recently used dropped first."""

    def __init__(self, home: Home, settings: Settings, keep: int = 2):
        self.home = home
        self.settings = settings
        self.keep = keep
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, model_id: str | None) -> str:
        if model_id in (None, "", ALIAS):
            current = registry.current(self.home)
            if current is None:
                raise ServeError("no model has been promoted yet")
            return current
        try:
            registry.get(self.home, model_id)
        except RegistryError:
            raise LookupError(f"the model '{model_id}' does not exist; GET /v1/models lists the models") from None
        return model_id

    def get(self, version: str) -> Loaded:
        with self._lock:
            if version in self._models:
                self._models.move_to_end(version)
                return self._models[version]
            loaded = Loaded(version, self._load(version), threading.Lock())
            self._models[version] = loaded
            while len(self._models) > self.keep:
                self._models.popitem(last=False)  # requests still holding it finish; then it is freed
            return loaded

    def _load(self, version: str) -> Any:
        from llama_cpp import Llama

        registry.verify(self.home, version)
        return Llama(model_path=str(registry.gguf_path(self.home, version)), n_ctx=self.settings.serve.context,
                     n_threads=self.settings.serve.threads or len(os.sched_getaffinity(0)),
                     n_gpu_layers=-1, verbose=False)


# --- routes ------------------------------------------------------------------------


GEN_KEYS = ("temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty",
            "frequency_penalty", "repeat_penalty", "max_tokens", "logit_bias", "response_format")


def make_app(home: Home, settings: Settings, api_key: str) -> Starlette:
    pool = ModelPool(home, settings)
    limits = settings.serve

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": registry.current(home)})

    async def models(_: Request) -> Response:
        data = [{"id": ALIAS, "object": "model", "owned_by": "appliance", "version": registry.current(home)}]
        data += [{"id": v["version"], "object": "model", "created": int(v["created"]), "owned_by": "appliance"}
                 for v in registry.versions(home)]
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def _generate(request: Request, chat: bool) -> Response:
        body = await _body(request, limits.max_prompt_bytes)
        if isinstance(body, Response):
            return body
        problem = _validate(body, chat, limits.max_tokens_limit)
        if problem:
            return error(400, problem)
        try:
            version = pool.resolve(body.get("model"))
        except LookupError as exc:
            return error(404, str(exc), "model_not_found")
        except ServeError as exc:
            return error(503, str(exc), "unavailable")
        try:
            loaded = await run_in_threadpool(pool.get, version)
        except Exception as exc:  # a file that will not load must not take the endpoint down
            log.error("model %s failed to load: %s", version, exc)
            return error(503, f"model {version} could not be loaded", "unavailable")
        kwargs = {k: body[k] for k in GEN_KEYS if k in body}
        kwargs.setdefault("max_tokens", min(256, limits.max_tokens_limit))
        started = time.monotonic()
        if body.get("stream"):
            return StreamingResponse(_stream(loaded, body, kwargs, chat, started), media_type="text/event-stream")
        result = await run_in_threadpool(_complete, loaded, body, kwargs, chat)
        if isinstance(result, Response):
            return result
        result["model"] = version
        usage = result.get("usage", {})
        log.info("%s %s prompt_tokens=%s completion_tokens=%s seconds=%.3f", request.url.path, version,
                 usage.get("prompt_tokens"), usage.get("completion_tokens"), time.monotonic() - started)
        return JSONResponse(result)

    async def _stream(loaded: Loaded, body: dict, kwargs: dict, chat: bool, started: float):
        chunks = 0
        async for chunk in iterate_in_threadpool(_stream_sync(loaded, body, kwargs, chat)):
            chunks += 1
            yield chunk
        log.info("stream %s chunks=%d seconds=%.3f", loaded.version, chunks, time.monotonic() - started)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    hosts = set(LOOPBACK_NAMES) | {settings.serve.host.lower()}
    return Starlette(routes=routes, middleware=[Middleware(Guard, api_key=api_key, allowed_hosts=hosts)])


async def _body(request: Request, max_bytes: int) -> dict | Response:
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > max_bytes:
            return error(413, f"request body larger than {max_bytes} bytes")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return error(400, "the request body is not valid JSON (UTF-8)")
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    return body


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
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or not 1 <= max_tokens <= max_tokens_limit):
        return f"'max_tokens' must be an integer from 1 to {max_tokens_limit}"
    if body.get("n", 1) != 1:
        return "'n' must be 1"
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or not 0 <= top_k <= 1000):
        return "'top_k' must be an integer from 0 to 1000"
    return None


def _complete(loaded: Loaded, body: dict, kwargs: dict, chat: bool) -> dict | Response:
    with loaded.lock:
        try:
            if chat:
                return loaded.llm.create_chat_completion(messages=body["messages"], **kwargs)
            return loaded.llm.create_completion(prompt=body["prompt"], **kwargs)
        except ValueError as exc:  # llama-cpp-python's way of saying "prompt too long" and the like
            return error(400, str(exc).splitlines()[0][:300])


def _stream_sync(loaded: Loaded, body: dict, kwargs: dict, chat: bool) -> Iterator[str]:
    with loaded.lock:
        try:
            if chat:
                chunks = loaded.llm.create_chat_completion(messages=body["messages"], stream=True, **kwargs)
            else:
                chunks = loaded.llm.create_completion(prompt=body["prompt"], stream=True, **kwargs)
            for chunk in chunks:
                chunk["model"] = loaded.version
                yield f"data: {json.dumps(chunk)}\n\n"
        except ValueError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc).splitlines()[0][:300]}})}\n\n"
    yield "data: [DONE]\n\n"


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
    """uvicorn in a background thread, for the demo and tests; ``serve_forever`` for the CLI."""

    def __init__(self, home: Home, settings: Settings, host: str | None = None, port: int | None = None):
        import uvicorn

        self.host = host or settings.serve.host
        self.port = port or settings.serve.port
        check_bind(self.host, self.port, settings)
        app = make_app(home, settings, read_api_key(home))
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._server.run, name="appliance-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise ServeError(f"the endpoint did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=10)

    def serve_forever(self) -> None:
        self._server.run()
