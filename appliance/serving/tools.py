"""Tool calls for a model whose chat template has no tool support (SmolLM2's, the default
base's, among them). llama-server then renders ``tools`` nowhere and never returns a tool
call, so the front does what a tool-aware template would: it describes the tools in the
system message, constrains the answer with a JSON schema when a call is required (so it is
always well formed: a known function name and arguments matching its parameters; with
``auto`` the model may answer in words, and a call it writes is read back), and turns the
answer into OpenAI's ``tool_calls``, streamed or not. Tool-call and tool-result turns in the history are
written out as text the model can read.

A backend says whether its template takes tools in ``/props`` (``chat_template_caps``); a
streamed request is generated whole and sent as a short stream at the end."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

INSTRUCTIONS = (
    "You can call these functions (JSON schema of each one's arguments):\n{tools}\n"
    'To call functions, answer with JSON {{"tool_calls": [{{"name": ..., "arguments": {{...}}}}]}}. '
    "{reply}"
)
REPLY_AUTO = "Call a function only when you need one; otherwise answer in words."
REPLY_REQUIRED = "Call at least one function."


def needed(out: dict, native_tools: bool) -> bool:
    """Whether a forwarded chat body needs the front's tool handling on this backend."""
    if native_tools:
        return False
    return bool(out.get("tools")) or any(m["role"] == "tool" or m.get("tool_calls") for m in out["messages"])


def rewrite(out: dict) -> dict:
    """The forwarded body with tools turned into instructions and a JSON schema; not streamed
    (the stream is made from the whole answer)."""
    tools = out.pop("tools", None) or []
    choice = out.pop("tool_choice", "auto")
    parallel = out.pop("parallel_tool_calls", True)
    out.pop("stream_options", None)
    out["stream"] = False
    messages = [_readable(m) for m in out["messages"]]
    if tools and choice != "none":
        described = json.dumps(
            [
                {
                    "name": t["function"]["name"],
                    "description": t["function"].get("description", ""),
                    "parameters": t["function"].get("parameters", {}),
                }
                for t in tools
            ]
        )
        note = INSTRUCTIONS.format(tools=described, reply=REPLY_AUTO if choice == "auto" else REPLY_REQUIRED)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
        else:
            messages.insert(0, {"role": "system", "content": note})
        if choice != "auto":  # auto: the model may answer in words; a call is read back only if it wrote one
            schema = _calls_schema(tools, parallel)
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    out["messages"] = messages
    return out


def _calls_schema(tools: list[dict], parallel: bool) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"]}


def _readable(m: dict) -> dict:
    """A tool-call or tool-result turn as plain text for a template that knows neither."""
    if m["role"] == "tool":
        return {"role": "user", "content": f"The function call {m.get('tool_call_id', '')} returned: {m['content']}"}
    if m.get("tool_calls"):
        # in words, not in the call format: a small model copies a format it sees in its own turns
        calls = "; ".join(
            f"{c['function']['name']}({c['function']['arguments']}) as call {c.get('id', '')}" for c in m["tool_calls"]
        )
        return {"role": "assistant", "content": f"{m.get('content') or ''}\n(I called {calls}.)".lstrip()}
    return {k: v for k, v in m.items() if k in ("role", "content")}


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def answer(payload: dict) -> dict:
    """The backend's JSON answer with each choice's content read back as tool calls or text."""
    for choice in payload.get("choices") or []:
        message = choice.get("message") or {}
        parsed = _loads(message.get("content") or "")
        if isinstance(parsed, dict) and isinstance(parsed.get("tool_calls"), list) and parsed["tool_calls"]:
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": "call_" + secrets.token_hex(12),
                    "type": "function",
                    "function": {"name": c.get("name", ""), "arguments": json.dumps(c.get("arguments", {}))},
                }
                for c in parsed["tool_calls"]
                if isinstance(c, dict)
            ]
            choice["finish_reason"] = "tool_calls"
        elif isinstance(parsed, dict) and isinstance(parsed.get("content"), str):
            message["content"] = parsed["content"]
        choice["message"] = message
    return payload


def stream(payload: dict, include_usage: bool) -> bytes:
    """A whole answer as OpenAI's chunk stream: per choice its message as one delta, then its end."""
    base = {
        "id": payload.get("id") or "chatcmpl-" + secrets.token_hex(12),
        "object": "chat.completion.chunk",
        "created": payload.get("created") or int(time.time()),
        "model": payload.get("model"),
    }
    events = []
    for choice in payload.get("choices") or []:
        message, index = choice.get("message") or {}, choice.get("index", 0)
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        events.append({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        end = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        events.append({**base, "choices": [end]})
    if include_usage:
        events.append({**base, "choices": [], "usage": payload.get("usage")})
    if events:  # the last event carries the timings, where the front's log line reads token counts
        events[-1]["timings"] = payload.get("timings")
    body = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)
    return body + b"data: [DONE]\n\n"
