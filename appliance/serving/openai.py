"""The OpenAI side of a request: what a client may ask (checked before any backend is
touched), the body forwarded to llama-server, and OpenAI-shaped error bodies.

Everything OpenAI's chat API defines and llama.cpp runs is checked and passed on: sampling,
``stop``, ``seed``, ``n``, ``logprobs``, ``logit_bias``, ``response_format`` (JSON mode, JSON
schema), ``tools`` and ``tool_choice``, tool-call and tool-result turns, ``developer``
messages, content given as text parts. ``grounding`` (true/false, the appliance's own) asks
for an answer from the collection's documents or from the model alone (serving/grounding.py). Fields of llama-server's own that the front cannot
vouch for are refused with a 400 naming the reason (:data:`REFUSED`); any other field is
dropped, never forwarded."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from appliance.serving.schemas import schema_problem

if TYPE_CHECKING:
    from appliance.home.config import ServeSection
    from appliance.serving.resolve import Answering

NUMBERS = {
    "temperature": (0.0, 5.0),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repeat_penalty": (0.0, 10.0),
}
# Passed on as the client sent them, once checked (messages, tools and the token limit are rebuilt).
PASSED = (
    *NUMBERS,
    "top_k",
    "seed",
    "stop",
    "ignore_eos",
    "n",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "parallel_tool_calls",
)
# llama-server extensions a client may not set, each with why (the 400 says it).
REFUSED = {
    "grammar": "a raw grammar is run by llama.cpp unchecked; ask for response_format with a JSON schema instead",
    "json_schema": "send it as response_format {type: json_schema}, where it is checked and bounded",
    "lora": "the adapter is chosen by the model id; a client's own would reach other collections' adapters",
    "id_slot": "the endpoint assigns slots (per collection adapter, so prompt caches are not evicted)",
    "cache_prompt": "the endpoint manages the prompt cache for every key sharing a slot",
    "n_probs": "ask with logprobs and top_logprobs (bounded)",
    "chat_template": "a model is served with the template it was trained with",
    "chat_template_kwargs": "a model is served with the template it was trained with",
    "slot_id": "the endpoint assigns slots (per collection adapter, so prompt caches are not evicted)",
}
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TOOLS = 64
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
TEXT_ONLY = "this model reads text only: a message's content parts must all be {type: text}"


def error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An error in OpenAI's shape, which clients show to their users."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Invalid(ValueError):
    """A request field's problem: the message and the field (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def unknown_model(model_id: str) -> LookupError:
    # The one answer for an id that does not exist *and* for one the key may not see: the
    # words depend only on what the client sent, never on what is there (no hint it exists).
    return LookupError(f"the model '{model_id[:100]}' does not exist; GET /v1/models lists the models")


async def read_body(request: Request, max_bytes: int) -> dict | Response:
    """The request's JSON object, or the error response to send instead."""
    if int(request.headers.get("content-length") or 0) > max_bytes:
        return error(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > max_bytes:
            return error(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
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


def _int_in(body: dict, key: str, lo: int, hi: int) -> None:
    value = body.get(key)
    if value is not None and (not _is_int(value) or not lo <= value <= hi):
        raise Invalid(f"'{key}' must be an integer from {lo} to {hi}", key)


def _bool(body: dict, key: str) -> None:
    if body.get(key) is not None and not isinstance(body[key], bool):
        raise Invalid(f"'{key}' must be true or false", key)


def validate(body: dict, chat: bool, limits: ServeSection) -> Invalid | None:
    """What is wrong with a completion request's body, or None."""
    try:
        for key, why in REFUSED.items():
            if key in body:
                raise Invalid(f"'{key}' is not accepted here: {why}", key)
        if chat:
            _messages(body.get("messages"))
            _tools(body)
            _response_format(body.get("response_format"))
        elif not isinstance(body.get("prompt"), str):
            raise Invalid("'prompt' must be a string", "prompt")
        _sampling(body, chat, limits)
    except Invalid as problem:
        return problem
    return None


def _sampling(body: dict, chat: bool, limits: ServeSection) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        _int_in(body, key, 1, limits.max_tokens_limit)
    _int_in(body, "n", 1, limits.max_choices)
    _int_in(body, "top_k", 0, 1000)
    for key, (lo, hi) in NUMBERS.items():
        value = body.get(key)
        if value is not None and (not _is_number(value) or not lo <= value <= hi):
            raise Invalid(f"'{key}' must be a number from {lo:g} to {hi:g}", key)
    _int_in(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 8 and all(isinstance(s, str) for s in stop))
    ):
        raise Invalid("'stop' must be a string or a list of up to 8 strings", "stop")
    for key in ("stream", "ignore_eos", "parallel_tool_calls", "grounding"):
        _bool(body, key)
    if chat:
        _bool(body, "logprobs")
        _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    else:  # the legacy API's logprobs is a count
        _int_in(body, "logprobs", 0, 5)
    _logit_bias(body.get("logit_bias"))
    options = body.get("stream_options")
    if options is not None and not (
        isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)
    ):
        raise Invalid("'stream_options' must be an object like {include_usage: true}", "stream_options")
    user = body.get("user")
    if user is not None and not (isinstance(user, str) and len(user) <= 256):
        raise Invalid("'user' must be a string of at most 256 characters", "user")


def _logit_bias(bias: object) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise Invalid(f"'logit_bias' must map up to {MAX_LOGIT_BIAS} token ids to numbers", "logit_bias")
    for token, value in bias.items():
        if not (token.isascii() and token.isdigit() and len(token) <= 9 and _is_number(value) and -100 <= value <= 100):
            raise Invalid("'logit_bias' maps token ids (digits) to numbers from -100 to 100", "logit_bias")


def _text(content: object, param: str, nullable: bool = False) -> None:
    if content is None and nullable or isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise Invalid("a message's content must be text or a list of text parts", param)
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise Invalid(TEXT_ONLY, param)
        if not isinstance(part.get("text"), str):
            raise Invalid("a text part needs a string 'text'", param)


def _messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise Invalid("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise Invalid("each message needs a role (system, developer, user, assistant or tool) and content", param)
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        _text(m.get("content"), param + ".content", nullable=bool(calls))
        if calls is not None:
            _tool_calls(calls, param + ".tool_calls")
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise Invalid("a tool message needs the 'tool_call_id' it answers", param + ".tool_call_id")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise Invalid("a message's 'name' must be a string", param + ".name")


def _tool_calls(calls: object, param: str) -> None:
    if not isinstance(calls, list):
        raise Invalid("'tool_calls' must be a list", param)
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and isinstance(call.get("id", ""), str)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            raise Invalid("each tool call needs an id and a function with a name and arguments (a JSON string)", param)


def _tools(body: dict) -> None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise Invalid(f"'tools' must be a list of at most {MAX_TOOLS} functions", "tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
            if (
                not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not TOOL_NAME.match(function["name"])
            ):
                raise Invalid(
                    "each tool must be {type: function, function: {name, parameters}} with a name of "
                    "letters, digits, '_', '-' or '.' (at most 64)",
                    f"tools[{i}]",
                )
            if function.get("description") is not None and not isinstance(function["description"], str):
                raise Invalid("a tool's description must be a string", f"tools[{i}].function.description")
            _bool(function, "strict")
            if "parameters" in function and (
                problem := schema_problem(function["parameters"], f"tools[{i}].function.parameters")
            ):
                raise Invalid(problem, f"tools[{i}].function.parameters")
            names.append(function["name"])
    if choice is None or choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise Invalid("tool_choice 'required' needs 'tools'", "tool_choice")
        return
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(function, dict) or function.get("name") not in names:
        raise Invalid(
            "'tool_choice' must be none, auto, required or {type: function, function: {name}} naming one of 'tools'",
            "tool_choice",
        )


def _response_format(fmt: object) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise Invalid(
            "'response_format' must be {type: text}, {type: json_object} or {type: json_schema, "
            "json_schema: {name, schema}}",
            "response_format",
        )
    assert isinstance(fmt, dict)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise Invalid(
                "'response_format.json_schema' must be an object with a name and a schema",
                "response_format.json_schema",
            )
        _bool(spec, "strict")
        schema: object = spec.get("schema", {})
    else:
        schema = fmt.get("schema", {})  # json_object may carry a schema (a llama.cpp extension)
    if problem := schema_problem(schema, "response_format"):
        raise Invalid(problem, "response_format")


def forward_body(body: dict, chat: bool, answering: Answering, max_tokens_limit: int) -> dict:
    """The body llama-server gets: only the checked fields, the backend's alias as the model,
    and on an adapter host the collection's adapter and the slot chosen for it."""
    out: dict = {k: body[k] for k in PASSED if body.get(k) is not None}
    out["model"] = answering.backend.version
    if answering.lora is not None:  # the collection's adapter, and no other (a client's own "lora" never passes)
        out["lora"] = [{"id": answering.lora, "scale": 1.0}]
    if answering.slot is not None:
        out["id_slot"] = answering.slot
    out["stream"] = bool(body.get("stream"))
    if out["stream"] and isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
        out["stream_options"] = {"include_usage": True}
    # No max_tokens: the answer may run to the end of the context (as OpenAI's does), bounded by the limit.
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    out["max_tokens"] = max_tokens if max_tokens is not None else max_tokens_limit
    if not chat:
        out["prompt"] = body["prompt"]
        return out
    out["messages"] = [_message(m) for m in body["messages"]]
    _forward_tools(body, out)
    return out


def joined(content: object) -> object:
    """Text parts joined with newlines, as llama.cpp joins them for a template that takes strings."""
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content)
    return content


def _message(m: dict) -> dict:
    # developer messages are the system instructions for OpenAI's newer models: the template's system role
    out: dict[str, Any] = {
        "role": "system" if m["role"] == "developer" else m["role"],
        "content": joined(m.get("content")),
    }
    if m["role"] == "assistant" and m.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": c.get("id", ""),
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
            }
            for c in m["tool_calls"]
        ]
    if m["role"] == "tool":
        out["tool_call_id"] = m["tool_call_id"]
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def _forward_tools(body: dict, out: dict) -> None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        return
    out["tools"] = [
        {
            "type": "function",
            "function": {
                k: t["function"][k]
                for k in ("name", "description", "parameters", "strict")
                if t["function"].get(k) is not None
            },
        }
        for t in tools
    ]
    if isinstance(choice, dict):  # llama-server takes none/auto/required: a named function is "required" of that one
        out["tools"] = [t for t in out["tools"] if t["function"]["name"] == choice["function"]["name"]]
        out["parallel_tool_calls"] = False  # as OpenAI answers a named choice: one call of that function
        choice = "required"
    if choice is not None:
        out["tool_choice"] = choice
