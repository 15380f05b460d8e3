"""A backend's reply passed on to the client: the JSON or SSE bytes as llama-server sent
them (only an adapter host's ``model`` field rewritten), with the request's one log line,
its count for the key-use audit, and the backend given back however the request ends."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import httpx
from starlette.responses import Response

from appliance.runtime.llama_server import Backend
from appliance.serving.openai import error
from appliance.serving.usage import KeyUse

log = logging.getLogger("appliance.serve")
# httpx logs every proxied call at INFO; the endpoint's own line per request is the record
logging.getLogger("httpx").setLevel(logging.WARNING)


class Done:
    """A request's end: its one log line and its count for the key-use audit."""

    def __init__(self, path: str, model: str, key: str, usage: KeyUse, stream: bool, user: str | None = None):
        self.path, self.model, self.key, self.usage, self.stream = path, model, key, usage, stream
        self.user = user  # the client's own name for its end user: counted, never written
        self.started = time.monotonic()
        self.sources: int | None = None  # passages a grounded answer was given (counted, never written)

    def __call__(self, status: int, prompt: object, completion: object) -> None:
        # Counts and timings only, never prompt or completion text.
        log.info(
            "request path=%s model=%s key=%s status=%d stream=%s prompt_tokens=%s completion_tokens=%s "
            "sources=%s seconds=%.3f",
            self.path,
            self.model,
            self.key,
            status,
            self.stream,
            prompt,
            completion,
            self.sources,
            time.monotonic() - self.started,
        )
        self.usage.record(self.key, self.model, prompt, completion, self.user)


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


async def send(backend: Backend, path: str, forward: dict) -> httpx.Response:
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


def renamer(alias: str, model: str) -> Callable[[bytes], bytes] | None:
    """llama-server names its --alias in every reply; an adapter host's alias is not the model
    id that answered, so that one field is rewritten in the bytes. JSON escapes every quote
    inside strings, so ``"model":"<alias>"`` cannot occur inside generated text."""
    if alias == model:
        return None
    old, new = (
        json.dumps({"model": alias}, separators=(",", ":"))[1:-1].encode(),
        json.dumps({"model": model}, separators=(",", ":"))[1:-1].encode(),
    )
    return lambda data: data.replace(old, new)


def edit_lines(rename: Callable[[bytes], bytes] | None, extra: dict | None) -> Callable[[bytes], bytes] | None:
    """What a stream's complete lines go through: ``rename``, and ``extra``'s fields (a grounded
    answer's sources) added to every chunk that ends a choice (its ``finish_reason`` is set)."""
    if not extra:
        return rename

    def add(data: bytes) -> bytes:
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data: {") and b'"finish_reason":"' in line.replace(b": ", b":"):
                try:
                    chunk = json.loads(line[6:])
                except ValueError:
                    continue
                if any(c.get("finish_reason") for c in chunk.get("choices") or []):
                    lines[i] = (
                        b"data: " + json.dumps({**chunk, **extra}, ensure_ascii=False, separators=(",", ":")).encode()
                    )
        data = b"\n".join(lines)
        return rename(data) if rename else data

    return add


async def relay(
    reply: httpx.Response, lease: Lease, done: Done, rename: Callable[[bytes], bytes] | None
) -> AsyncIterator[bytes]:
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
        yield (
            b'data: {"error": {"message": "the model stopped answering", "type": "server_error", "param": null, '
            b'"code": "backend_failed"}}\n\n'
        )
    finally:
        lease.release()
        prompt, completion = _stream_counts(bytes(tail))
        done(200, prompt, completion)
        try:
            await reply.aclose()
        except BaseException:  # noqa: BLE001  (cancelled while closing: the connection is dropped anyway)
            pass


Shape = Callable[[dict], tuple[bytes, str]]  # a reply rewritten by the front: its bytes and media type


def finish(
    done: Done,
    status: int,
    content: bytes,
    rename: Callable[[bytes], bytes] | None,
    shape: Shape | None = None,
    extra: dict | None = None,
) -> Response:
    """The backend's JSON reply as it came (or as ``shape`` rewrites it, with ``extra``'s fields
    added: a grounded answer's sources); a backend failure becomes a clear 502."""
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if status == 200 and isinstance(payload, dict):
        usage = payload.get("usage") or {}
        done(status, usage.get("prompt_tokens"), usage.get("completion_tokens"))
        media = "application/json"
        if extra:
            payload = {**payload, **extra}
            content = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        if shape is not None:
            content, media = shape(payload)
        return Response(rename(content) if rename else content, status_code=200, media_type=media)
    message = ""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        message = str(payload["error"].get("message", ""))[:300]
    done(status, None, None)
    if 400 <= status < 500:  # e.g. a prompt longer than the context: the client's to fix
        return error(status, message or "the model refused the request")
    return error(
        502,
        f"model {done.model} failed to answer ({status}: {message or 'no detail'})",
        "server_error",
        code="backend_failed",
    )


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
