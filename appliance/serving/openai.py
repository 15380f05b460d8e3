"""The OpenAI side of a request: what a client may ask (checked before any backend is
touched), the body forwarded to llama-server, and OpenAI-shaped error bodies."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

if TYPE_CHECKING:
    from appliance.serving.resolve import Answering

# What a request may set, with its check; anything else in the body is dropped, not
# forwarded (llama-server has many extensions: grammars, slot ids, LoRA scales ...).
NUMBERS = {"temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0), "repeat_penalty": (0.0, 10.0)}
PASSED = (*NUMBERS, "top_k", "seed", "stop", "stream", "ignore_eos")


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def unknown_model(model_id: str) -> LookupError:
    # The one answer for an id that does not exist *and* for one the key may not see: the
    # words depend only on what the client sent, never on what is there (no hint it exists).
    return LookupError(f"the model '{model_id[:100]}' does not exist; GET /v1/models lists the models")


async def read_body(request: Request, max_bytes: int) -> dict | Response:
    """The request's JSON object, or the error response to send instead."""
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


def validate(body: dict, chat: bool, max_tokens_limit: int) -> str | None:
    """What is wrong with a completion request's body, or None."""
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


def forward_body(body: dict, chat: bool, answering: Answering, max_tokens_limit: int) -> dict:
    """The body llama-server gets: only the checked fields, the backend's alias as the model,
    and on an adapter host the collection's adapter and the slot chosen for it."""
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
