"""The Starlette app: ``/health``, ``/v1/models``, the two completion routes and
``/v1/embeddings``, behind the Guard; each request is checked, given a backend by the pool and
relayed. Every error, the router's own 404 and 405 included, has OpenAI's shape."""

from __future__ import annotations

import json
import logging
import weakref

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from appliance.contract.errors import ServeError
from appliance.contract.names import parse_model_id
from appliance.home import registry
from appliance.home.config import Settings
from appliance.home.keys import Key, KeyStore
from appliance.home.paths import Home
from appliance.serving import grounding, tools
from appliance.serving.guard import KEY_SCOPE, LOOPBACK_NAMES, Guard
from appliance.serving.openai import Invalid, error, forward_body, read_body, unknown_model, validate
from appliance.serving.pool import BackendPool
from appliance.serving.relay import Admission, Done, Lease, Shape, edit_lines, finish, relay, renamer, send
from appliance.serving.resolve import Answering, visible_models
from appliance.serving.usage import KeyUse

log = logging.getLogger("appliance.serve")


def make_app(
    home: Home,
    settings: Settings,
    keys: KeyStore,
    pool: BackendPool,
    usage: KeyUse,
    retriever: grounding.Retriever | None = None,
) -> Starlette:
    limits = settings.serve
    admitted = Admission(limits.max_concurrent)
    retriever = retriever or grounding.Retriever(home, settings, pool.embed if pool.embedding() else None)

    async def health(_: Request) -> Response:
        # unauthenticated: the shared model and a count, no collection's name
        return JSONResponse(
            {
                "status": "ok",
                "model": registry.current(home),
                "backend": "llama-server",
                "loaded": [n for n in pool.loaded() if "/" not in n],
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": visible_models(home, request.scope[KEY_SCOPE], pool.embedding())}
        )

    async def generate(request: Request) -> Response:
        if not admitted.take():
            return error(
                429,
                f"too many concurrent requests (limit {limits.max_concurrent}); retry shortly",
                "rate_limit_error",
                code="rate_limit_exceeded",
            )
        streaming = False
        try:
            response = await (_embed(request) if request.url.path.endswith("/embeddings") else _generate(request))
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
        problem = validate(body, chat, limits)
        if problem:
            return error(400, str(problem), param=problem.param)
        try:
            answering = await pool.acquire(body.get("model"), key)
        except LookupError as exc:
            return error(404, str(exc), param="model", code="model_not_found")
        except ServeError as exc:
            return error(503, str(exc), "unavailable", code="model_unavailable")
        forward = forward_body(body, chat, answering, limits.max_tokens_limit)
        grounded: grounding.Grounding | None = None
        if chat:
            try:
                grounded = await _ground(body)
            except BaseException:
                pool.release(answering.backend, answering.slot)
                raise
            forward = grounding.apply(forward, grounded) if grounded is not None else forward
        shape: Shape | None = None
        if chat and tools.needed(forward, getattr(answering.backend, "native_tools", True)):
            shape = _tool_shape(bool(forward["stream"]), bool(forward.get("stream_options")))
            forward = tools.rewrite(forward)
        done = Done(request.url.path, answering.model, key.name, usage, bool(body.get("stream")), body.get("user"))
        extra = None
        if grounded is not None:
            extra = grounded.fields()
            done.sources = len(grounded.sources)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return await _answer(answering, path, forward, done, shape, extra)

    async def _ground(body: dict) -> grounding.Grounding | None:
        """Retrieval for a chat request to a collection's current model id (None: not one)."""
        collection, version = parse_model_id(body.get("model") or "appliance")  # checked by acquire
        if version is not None:
            return None  # a pinned version answers as it was trained, alone (compare, audit)
        if body.get("grounding") is False:
            return grounding.Grounding(False, collection, "the request asked for the model alone")
        if body.get("tools"):
            return grounding.Grounding(False, collection, "requests with tools are answered by the model alone")
        return await anyio.to_thread.run_sync(retriever.retrieve, collection, body["messages"])

    async def _embed(request: Request) -> Response:
        key: Key = request.scope[KEY_SCOPE]
        body = await read_body(request, limits.max_prompt_bytes)
        if isinstance(body, Response):
            return body
        spec = pool.embedding()
        if spec is None:
            return error(
                404,
                "no embedding model is configured on this endpoint; an administrator names one "
                'in config.toml: [grounding] embedding_model = "<path>.gguf"',
                code="model_not_found",
            )
        model = body.get("model")
        if model not in (None, "", spec.name):  # a chat model's id (or any other) is not an embedding model
            return error(
                404,
                str(unknown_model(str(model))) + f" as an embedding model (use '{spec.name}')",
                param="model",
                code="model_not_found",
            )
        if problem := _embedding_problem(body):
            return error(400, str(problem), param=problem.param)
        try:
            answering = await pool.acquire_embedding(spec)
        except ServeError as exc:
            return error(503, str(exc), "unavailable", code="model_unavailable")
        forward = {
            "model": spec.name,
            "input": body["input"],
            "encoding_format": body.get("encoding_format") or "float",
        }
        done = Done(request.url.path, spec.name, key.name, usage, False, body.get("user"))
        return await _answer(answering, "/v1/embeddings", forward, done, None)

    async def _answer(
        answering: Answering, path: str, forward: dict, done: Done, shape: Shape | None, extra: dict | None = None
    ) -> Response:
        backend = answering.backend
        try:
            reply = await send(backend, path, forward)
        except httpx.TransportError as exc:
            pool.release(backend, answering.slot)
            log.error("llama-server for %s did not answer: %s", backend.version, exc)
            return error(
                503, f"model {answering.model} is not answering; try again", "unavailable", code="model_unavailable"
            )
        except BaseException:  # cancelled (client went away): the backend is ours no longer
            pool.release(backend, answering.slot)
            raise
        rename = renamer(backend.version, answering.model)
        if reply.status_code != 200 or not forward.get("stream"):
            try:
                content = await reply.aread()
            except httpx.TransportError as exc:
                log.error("llama-server for %s broke off its answer: %s", backend.version, exc)
                return error(
                    503,
                    f"model {answering.model} stopped answering; try again",
                    "unavailable",
                    code="model_unavailable",
                )
            finally:
                pool.release(backend, answering.slot)  # first: nothing below may keep a retired backend alive
                await reply.aclose()
            return finish(done, reply.status_code, content, rename, shape, extra)

        def give_back() -> None:
            pool.release(backend, answering.slot)
            admitted.give()

        lease = Lease(give_back)
        stream = relay(reply, lease, done, edit_lines(rename, extra))
        # A stream the client abandons before its first byte never runs the relay's
        # finally clause; the finalizer still gives the backend back.
        weakref.finalize(stream, lease.release)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/embeddings", generate, methods=["POST"]),
    ]
    hosts = set(LOOPBACK_NAMES) | {settings.serve.host.lower()}
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, keys=keys, allowed_hosts=hosts)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


def _tool_shape(stream: bool, include_usage: bool) -> Shape:
    """The backend's whole answer read back as tool calls, sent as JSON or as a stream."""

    def shape(payload: dict) -> tuple[bytes, str]:
        answer = tools.answer(payload)
        if stream:
            return tools.stream(answer, include_usage), "text/event-stream"
        return json.dumps(answer).encode(), "application/json"

    return shape


def _embedding_problem(body: dict) -> Invalid | None:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if (
        not isinstance(texts, list)
        or not texts
        or len(texts) > 2048
        or not all(isinstance(t, str) and t for t in texts)
    ):
        return Invalid("'input' must be a non-empty string or a list of up to 2048 non-empty strings", "input")
    if body.get("encoding_format") not in (None, "float", "base64"):
        return Invalid("'encoding_format' must be float or base64", "encoding_format")
    if body.get("dimensions") is not None:
        return Invalid("this embedding model's vectors have a fixed size; leave 'dimensions' out", "dimensions")
    return None


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error(exc.status_code, str(exc.detail), code=code)


async def _server_error(_: Request, exc: Exception) -> Response:
    log.exception("the endpoint failed on a request", exc_info=exc)
    return error(500, "the endpoint failed on this request; see its log", "server_error", code="internal_error")
