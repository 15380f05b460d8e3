"""The Starlette app: ``/health``, ``/v1/models`` and the two completion routes, behind the
Guard; each completion is checked, given a backend by the pool and relayed."""

from __future__ import annotations

import logging
import weakref

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from appliance.contract.errors import ServeError
from appliance.home import registry
from appliance.home.config import Settings
from appliance.home.keys import Key, KeyStore
from appliance.home.paths import Home
from appliance.serving.guard import KEY_SCOPE, LOOPBACK_NAMES, Guard
from appliance.serving.openai import error, forward_body, read_body, validate
from appliance.serving.pool import BackendPool
from appliance.serving.relay import Admission, Done, Lease, finish, relay, renamer, send
from appliance.serving.resolve import visible_models
from appliance.serving.usage import KeyUse

log = logging.getLogger("appliance.serve")


def make_app(home: Home, settings: Settings, keys: KeyStore, pool: BackendPool, usage: KeyUse) -> Starlette:
    limits = settings.serve
    admitted = Admission(limits.max_concurrent)

    async def health(_: Request) -> Response:
        # unauthenticated: the shared model and a count, no collection's name
        return JSONResponse({"status": "ok", "model": registry.current(home), "backend": "llama-server",
                             "loaded": [n for n in pool.loaded() if "/" not in n]})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": visible_models(home, request.scope[KEY_SCOPE])})

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
        body = await read_body(request, limits.max_prompt_bytes)
        if isinstance(body, Response):
            return body
        problem = validate(body, chat, limits.max_tokens_limit)
        if problem:
            return error(400, problem)
        try:
            answering = await pool.acquire(body.get("model"), key)
        except LookupError as exc:
            return error(404, str(exc), "model_not_found")
        except ServeError as exc:
            return error(503, str(exc), "unavailable")
        backend = answering.backend
        forward = forward_body(body, chat, answering, limits.max_tokens_limit)
        done = Done(request.url.path, answering.model, key.name, usage, forward["stream"])
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            reply = await send(backend, path, forward)
        except httpx.TransportError as exc:
            pool.release(backend, answering.slot)
            log.error("llama-server for %s did not answer: %s", backend.version, exc)
            return error(503, f"model {answering.model} is not answering; try again", "unavailable")
        except BaseException:  # cancelled (client went away): the backend is ours no longer
            pool.release(backend, answering.slot)
            raise
        rename = renamer(backend.version, answering.model)
        if reply.status_code != 200 or not forward["stream"]:
            try:
                content = await reply.aread()
            except httpx.TransportError as exc:
                log.error("llama-server for %s broke off its answer: %s", backend.version, exc)
                return error(503, f"model {answering.model} stopped answering; try again", "unavailable")
            finally:
                pool.release(backend, answering.slot)  # first: nothing below may keep a retired backend alive
                await reply.aclose()
            return finish(done, reply.status_code, content, rename)
        lease = Lease(lambda: (pool.release(backend, answering.slot), admitted.give()))
        stream = relay(reply, lease, done, rename)
        # A stream the client abandons before its first byte never runs the relay's
        # finally clause; the finalizer still gives the backend back.
        weakref.finalize(stream, lease.release)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
    ]
    hosts = set(LOOPBACK_NAMES) | {settings.serve.host.lower()}
    return Starlette(routes=routes, middleware=[Middleware(Guard, keys=keys, allowed_hosts=hosts)])
