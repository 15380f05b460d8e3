"""OpenAI compatibility: a battery of everyday requests, sent with the official ``openai``
client to a bare native llama-server and to the appliance's endpoint on the same GGUF.

Model: the embedded SmolLM2-135M-Instruct GGUF (or ``--model-gguf``), registered as
version ``base`` in a temporary home: both sides serve the same bytes.

- native: ``llama-server`` (the binary the appliance manages) on a loopback TCP port with
  the flags a skilled user would pass (``--jinja``: the GGUF's own chat template, tools).
- appliance: ``appliance serve`` in its own process on a loopback port.

Each feature is one named check, judged the same way on both sides by what a client needs
(the request is accepted, the answer has the shape the client reads, the parameter has its
effect), never by exact text: a 135M model writes poor prose but llama-server's grammar-
constrained decoding still gives valid JSON and tool calls. Where a feature has a streamed
form, both forms must pass. Every request has a timeout, so a hang is a FAIL.

The score is over the features native passes (a feature the model or llama-server cannot
do is not held against the appliance): ratio = appliance passes among them / their count.
One line per feature, then, as the last line, one JSON object.

Reading the tools checks: with the embedded SmolLM2 GGUF, native llama-server (this
llama.cpp's template autoparser) finds no tool-call format in the model's chat template and
answers in plain text, so the tools features fail on native and do not count; they count
with a ``--model-gguf`` whose template describes tool calls.

    .venv/bin/python benchmarks/openai_compat.py [--smoke] [--model-gguf PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai

import appliance  # noqa: F401  (offline environment first)
from appliance.cli.init import create_home
from appliance.home import registry
from appliance.home.paths import Home
from appliance.serving.guard import read_api_key
from appliance.training.basemodel import embedded_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, native_command, wait_health  # noqa: E402  (the same native server and start-up wait)

TIMEOUT = 60.0  # seconds per request (per read when streamed): a hang is a FAIL
SLOTS, CONTEXT = 2, 2048
LONG_SEEN = 300  # streamed tokens that prove an answer was not cut at 256
SLOW = {"default_not_capped_256"}  # left out by --smoke

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a time zone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
CAT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
}
# 1x1 transparent PNG: a valid image, so a refusal is about images, not a broken URL
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
# about 90 tokens: enough that a dropped system/developer message shows in prompt_tokens
LONG_INSTRUCTION = (
    "You are a careful assistant for a small veterinary clinic. Answer in one short sentence, "
    "use plain words, never give a diagnosis, always suggest calling the clinic for anything "
    "urgent, and mention that the clinic is open from eight in the morning until six in the "
    "evening on weekdays and from nine until noon on Saturdays. Do not use lists, headings or "
    "emoji, and do not repeat the question back to the person asking it."
)


class Fail(Exception):
    """A check's verdict: the side does not give a client what it needs, and why."""


def need(condition: object, reason: str) -> None:
    if not condition:
        raise Fail(reason)


@dataclass
class Side:
    name: str
    root: str  # http://127.0.0.1:port
    key: str
    model: str
    client: openai.OpenAI = field(init=False)
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = openai.OpenAI(base_url=f"{self.root}/v1", api_key=self.key, max_retries=0, timeout=TIMEOUT)
        self.http = httpx.Client(base_url=self.root, timeout=TIMEOUT, headers={"Authorization": f"Bearer {self.key}"})


@dataclass
class Streamed:
    """What a client assembles from a streamed chat answer."""

    text: str = ""
    finish: str | None = None
    events: int = 0  # chunks that carried content (each at most one token)
    logprobs: int = 0  # logprob entries seen
    usage: Any = None
    usage_last: bool = False  # the usage came in the last chunk
    calls: dict[int, dict[str, str]] = field(default_factory=dict)


# --- requests ------------------------------------------------------------------------


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def chat(side: Side, messages: list[Any], **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    return side.client.chat.completions.create(model=side.model, messages=messages, **kw)


def chat_stream(side: Side, messages: list[Any], *, until: int | None = None, **kw: Any) -> Streamed:
    """A streamed chat answer put together as a client does; with ``until``, the stream is
    closed once that many content chunks arrived (a runaway answer costs no more)."""
    kw.setdefault("temperature", 0)
    out = Streamed()
    stream = side.client.chat.completions.create(model=side.model, messages=messages, stream=True, **kw)
    try:
        for chunk in stream:
            out.usage_last = chunk.usage is not None
            out.usage = chunk.usage or out.usage
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    out.text += delta.content
                    out.events += 1
                if choice.logprobs is not None and choice.logprobs.content:
                    out.logprobs += len(choice.logprobs.content)
                for call in delta.tool_calls or []:
                    merged = out.calls.setdefault(call.index, {"name": "", "arguments": ""})
                    if call.function is not None:
                        merged["name"] += call.function.name or ""
                        merged["arguments"] += call.function.arguments or ""
                out.finish = choice.finish_reason or out.finish
            if until is not None and out.events >= until:
                break
    finally:
        stream.close()
    return out


def refused(call: Callable[[], object]) -> tuple[int, object]:
    """(status, parsed body) of a request the side should refuse; Fail when it answers 200."""
    try:
        call()
    except openai.APIStatusError as exc:
        try:
            return exc.status_code, exc.response.json()
        except ValueError:
            return exc.status_code, exc.response.text
    raise Fail("accepted (200) where a refusal was expected")


def openai_error(status: int, body: object, with_type: bool = True) -> None:
    """A 4xx with the body OpenAI clients parse: {"error": {"message": ..., "type": ...}}."""
    need(400 <= status < 500, f"HTTP {status}, not a 4xx")
    error: Any = body.get("error") if isinstance(body, dict) else None
    need(
        isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"],
        f"HTTP {status} without an OpenAI error body: {str(body)[:60]}",
    )
    if with_type:
        need(isinstance(error.get("type"), str), f"HTTP {status}: error without a 'type'")


def answered(reply: Any) -> str:
    """The text of a plain chat answer, after the checks every client relies on."""
    need(reply.choices, "no choices")
    choice = reply.choices[0]
    need(choice.message.role == "assistant", f"role {choice.message.role!r}")
    need(isinstance(choice.message.content, str) and choice.message.content.strip(), "empty content")
    need(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    need(reply.usage is not None and reply.usage.completion_tokens > 0, "no usage")
    return choice.message.content


def tool_calls(calls: list[tuple[str, str]], names: set[str]) -> list[dict]:
    """Each (name, arguments) call is to a known function, with JSON-object arguments."""
    need(calls, "no tool_calls")
    parsed = []
    for name, arguments in calls:
        need(name in names, f"call to unknown function {name!r}")
        try:
            args = json.loads(arguments)
        except ValueError:
            raise Fail(f"arguments are not JSON: {arguments[:40]!r}") from None
        need(isinstance(args, dict), "arguments are not a JSON object")
        parsed.append(args)
    return parsed


def message_calls(reply: Any) -> list[tuple[str, str]]:
    calls = reply.choices[0].message.tool_calls or []
    return [(c.function.name, c.function.arguments) for c in calls]


# --- the battery: each check raises Fail, or returns an optional note ------------------


def chat_plain(side: Side) -> None:
    answered(chat(side, [user("Name three colors.")], max_tokens=24))
    s = chat_stream(side, [user("Name three colors.")], max_tokens=24)
    need(s.text.strip() and s.finish, "stream: empty answer or no finish_reason")


def prompt_grows(side: Side, role: str) -> None:
    """A long ``role`` message reaches the prompt: prompt_tokens grows by most of its length."""
    question = user("Can my dog eat chocolate?")
    bare = chat(side, [question], max_tokens=16)
    reply = chat(side, [{"role": role, "content": LONG_INSTRUCTION}, question], max_tokens=16)
    answered(reply)
    need(
        reply.usage.prompt_tokens > bare.usage.prompt_tokens + 50,
        f"the {role} message did not reach the prompt ({bare.usage.prompt_tokens} -> {reply.usage.prompt_tokens})",
    )


def system_message(side: Side) -> None:
    prompt_grows(side, "system")


def developer_role(side: Side) -> None:
    prompt_grows(side, "developer")


def content_text_parts(side: Side) -> None:
    parts = [{"type": "text", "text": "Name three colors"}, {"type": "text", "text": " of the rainbow."}]
    plain = chat(side, [user("Name three colors of the rainbow.")], max_tokens=16)
    reply = chat(side, [{"role": "user", "content": parts}], max_tokens=16)
    answered(reply)
    need(
        abs(reply.usage.prompt_tokens - plain.usage.prompt_tokens) <= 3,
        f"parts not read as the text ({plain.usage.prompt_tokens} vs {reply.usage.prompt_tokens} prompt tokens)",
    )
    s = chat_stream(side, [{"role": "user", "content": parts}], max_tokens=16)
    need(s.text.strip(), "stream: empty answer")


def content_image_refused(side: Side) -> None:
    parts = [{"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": PNG}}]
    status, body = refused(lambda: chat(side, [{"role": "user", "content": parts}], max_tokens=8))
    openai_error(status, body, with_type=False)


def multi_turn(side: Side) -> None:
    question = user("What is my name?")
    single = chat(side, [question], max_tokens=16)
    history = [
        user("Hello, my name is Ada Lovelace and I write programs."),
        {"role": "assistant", "content": "Nice to meet you, Ada. How can I help?"},
        question,
    ]
    reply = chat(side, history, max_tokens=16)
    answered(reply)
    need(
        reply.usage.prompt_tokens > single.usage.prompt_tokens + 15,
        f"history not in the prompt ({single.usage.prompt_tokens} -> {reply.usage.prompt_tokens} tokens)",
    )


COUNTING = "Count from 1 to 1000, one number per line."
LONG_LIST = "List 200 different animals, one per line, numbered."  # SmolLM2-135M: past 400 tokens at temperature 0


def capped(side: Side, **limit: int) -> None:
    """A long answer stops at 5 tokens with finish_reason length, streamed or not."""
    reply = chat(side, [user(COUNTING)], **limit)
    need(reply.usage.completion_tokens <= 5, f"{reply.usage.completion_tokens} tokens for a limit of 5")
    need(reply.choices[0].finish_reason == "length", f"finish_reason {reply.choices[0].finish_reason!r}")
    s = chat_stream(side, [user(COUNTING)], stream_options={"include_usage": True}, **limit)
    need(s.finish == "length", f"stream: finish_reason {s.finish!r}")
    need(s.usage is None or s.usage.completion_tokens <= 5, f"stream: {s.usage and s.usage.completion_tokens} tokens")


def max_tokens(side: Side) -> None:
    capped(side, max_tokens=5)


def max_completion_tokens(side: Side) -> None:
    capped(side, max_completion_tokens=5)


def default_not_capped_256(side: Side) -> str | None:
    """Without max_tokens, an answer runs as long as the model goes (up to the context), as
    with OpenAI and llama-server. A prompt this model answers at length, streamed: past
    LONG_SEEN tokens the answer was not cut at 256 (the stream is closed there, so a
    runaway answer costs no more); a finish_reason of ``length`` before that is a cap."""
    s = chat_stream(side, [user(LONG_LIST)], until=LONG_SEEN, stream_options={"include_usage": True})
    if s.events >= LONG_SEEN:
        return None
    tokens = s.usage.completion_tokens if s.usage is not None else s.events
    need(s.finish == "stop", f"cut at {tokens} tokens (finish_reason {s.finish!r})")
    return f"the model stopped by itself at {tokens} tokens"


def stop_picked(text: str) -> tuple[str, int]:
    """A stop string from the middle of ``text`` (its first occurrence there) and where it is."""
    for p in range(max(4, len(text) // 2), len(text) - 3):
        piece = text[p : p + 3]
        if piece.strip() and text.find(piece) == p:
            return piece, p
    raise Fail(f"answer too short to pick a stop string: {text!r}")


def stop(side: Side) -> None:
    prompt = [user("Write one sentence about the sea.")]
    baseline = answered(chat(side, prompt, max_tokens=32))
    piece, at = stop_picked(baseline)
    reply = chat(side, prompt, max_tokens=32, stop=[piece])
    text = reply.choices[0].message.content or ""
    need(piece not in text and len(text) <= at + 1, f"went past the stop string {piece!r}")
    need(reply.choices[0].finish_reason == "stop", f"finish_reason {reply.choices[0].finish_reason!r}")
    s = chat_stream(side, prompt, max_tokens=32, stop=[piece])
    need(piece not in s.text and len(s.text) <= at + 1, f"stream: went past the stop string {piece!r}")
    need(s.finish == "stop", f"stream: finish_reason {s.finish!r}")


def seed_determinism(side: Side) -> None:
    prompt = [user("Tell me a fact about owls.")]
    first = answered(chat(side, prompt, max_tokens=24, seed=42))
    second = answered(chat(side, prompt, max_tokens=24, seed=42))
    need(first == second, "temperature 0, same seed: different answers")


def temperature_top_p(side: Side) -> None:
    """Sampling settings reach the sampler: seeded answers at a high temperature differ."""
    prompt = [user("Invent a name for a cat.")]
    answers = {answered(chat(side, prompt, max_tokens=12, temperature=1.5, top_p=0.95, seed=s)) for s in (1, 2, 3)}
    need(len(answers) >= 2, "temperature 1.5 with three seeds: one and the same answer")


def n_choices(side: Side) -> None:
    reply = chat(side, [user("Invent a name for a cat.")], max_tokens=12, temperature=1.0, n=2)
    need(len(reply.choices) == 2, f"{len(reply.choices)} choice(s) for n=2")
    need(sorted(c.index for c in reply.choices) == [0, 1], "choice indexes are not 0 and 1")
    need(all((c.message.content or "").strip() for c in reply.choices), "an empty choice")


def logprobs(side: Side) -> None:
    reply = chat(side, [user("Name a fruit.")], max_tokens=8, logprobs=True, top_logprobs=3)
    lp = reply.choices[0].logprobs
    need(lp is not None and lp.content, "no logprobs in the answer")
    for item in lp.content:
        need(isinstance(item.token, str) and item.logprob <= 1e-6, f"bad logprob entry {item.token!r}")
        need(len(item.top_logprobs or []) == 3, f"{len(item.top_logprobs or [])} top_logprobs, asked for 3")
    s = chat_stream(side, [user("Name a fruit.")], max_tokens=8, logprobs=True, top_logprobs=3)
    need(s.logprobs > 0, "stream: no logprobs in the chunks")


def logit_bias(side: Side, token: tuple[int, str]) -> None:
    """A +100 bias on one token (ids from the same GGUF) forces it into the answer."""
    token_id, piece = token
    prompt = [user("Say hello.")]
    baseline = answered(chat(side, prompt, max_tokens=6))
    need(piece not in baseline, "the biased word is in the unbiased answer; pick another")
    biased = answered(chat(side, prompt, max_tokens=6, logit_bias={str(token_id): 100}))
    need(piece in biased, f"bias ignored: {biased[:30]!r}")


def parsed_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise Fail(f"answer is not JSON: {text[:40]!r}") from None


def response_format_json_object(side: Side) -> None:
    reply = chat(
        side,
        [user("Describe a cat as a JSON object with its name and age.")],
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    need(isinstance(parsed_json(reply.choices[0].message.content or ""), dict), "answer is not a JSON object")


def response_format_json_schema(side: Side) -> None:
    reply = chat(
        side,
        [user("Describe a cat with its name and age.")],
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "strict": True, "schema": CAT_SCHEMA}},
    )
    value = parsed_json(reply.choices[0].message.content or "")
    need(isinstance(value, dict), f"not an object: {value!r}")
    need(set(value) == {"name", "age"}, f"keys {sorted(value)}, not name and age")
    need(isinstance(value["name"], str) and len(value["name"]) <= 20, "name is not a string of at most 20")
    need(isinstance(value["age"], int) and not isinstance(value["age"], bool), "age is not an integer")


def tools_required(side: Side) -> None:
    prompt = [user("What is the weather in Paris?")]
    reply = chat(side, prompt, max_tokens=128, tools=[WEATHER], tool_choice="required")
    for args in tool_calls(message_calls(reply), {"get_weather"}):
        need(isinstance(args.get("city"), str), "no 'city' string in the arguments")
    s = chat_stream(side, prompt, max_tokens=128, tools=[WEATHER], tool_choice="required")
    tool_calls([(c["name"], c["arguments"]) for c in s.calls.values()], {"get_weather"})


def tools_named_choice(side: Side) -> None:
    reply = chat(
        side,
        [user("What time is it in Tokyo?")],
        max_tokens=128,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    tool_calls(message_calls(reply), {"get_time"})


def tool_result_turn(side: Side) -> None:
    history = [
        user("What is the weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"celsius": 18, "sky": "sunny"})},
    ]
    answered(chat(side, history, max_tokens=48, tools=[WEATHER]))


def parallel_tool_calls(side: Side) -> None:
    prompt = [user("What is the weather in Paris and in Rome?")]
    single = chat(side, prompt, max_tokens=128, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    need(len(tool_calls(message_calls(single), {"get_weather"})) == 1, "several calls with parallel_tool_calls false")
    several = chat(side, prompt, max_tokens=200, tools=[WEATHER], tool_choice="required", parallel_tool_calls=True)
    tool_calls(message_calls(several), {"get_weather"})


def stream_include_usage(side: Side) -> None:
    s = chat_stream(side, [user("Name three colors.")], max_tokens=16, stream_options={"include_usage": True})
    need(s.text.strip(), "empty answer")
    need(s.usage is not None and s.usage_last, "no usage in the last chunk")
    need(s.usage.completion_tokens > 0 and s.usage.prompt_tokens > 0, "usage without token counts")


def user_field(side: Side) -> None:
    answered(chat(side, [user("Name three colors.")], max_tokens=12, user="benchmark-user-1"))


def models_list(side: Side) -> None:
    data = list(side.client.models.list())
    need(data, "no models")
    need(side.model in {m.id for m in data}, f"{side.model!r} not listed")
    for m in data:
        extra = m.model_dump()
        need(isinstance(m.id, str) and m.object == "model", f"{m.id!r}: object {m.object!r}")
        need(isinstance(extra.get("created"), int), f"{m.id!r}: no integer 'created'")
        need(isinstance(extra.get("owned_by"), str), f"{m.id!r}: no 'owned_by'")


def legacy_completions(side: Side) -> None:
    reply = side.client.completions.create(model=side.model, prompt="Once upon a time", max_tokens=16, temperature=0)
    need(reply.choices and isinstance(reply.choices[0].text, str) and reply.choices[0].text.strip(), "empty text")
    need(reply.choices[0].finish_reason in ("stop", "length"), f"finish_reason {reply.choices[0].finish_reason!r}")
    need(reply.usage is not None and reply.usage.completion_tokens > 0, "no usage")
    stream = side.client.completions.create(
        model=side.model, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
    )
    with stream:
        text = "".join(c.choices[0].text for c in stream if c.choices)
    need(text.strip(), "stream: empty text")


def error_unknown_model(side: Side) -> None:
    status, body = refused(
        lambda: side.client.chat.completions.create(model="no-such-model-xyz", messages=[user("Hi")], max_tokens=4)
    )
    openai_error(status, body)


def error_bad_request(side: Side) -> None:
    for bad in ({"model": side.model, "messages": "Hello"}, {"model": side.model}):
        reply = side.http.post("/v1/chat/completions", json=bad)
        need(reply.status_code != 200, f"{json.dumps(bad)[:40]} accepted (200)")
        try:
            body: object = reply.json()
        except ValueError:
            body = reply.text
        openai_error(reply.status_code, body)


def embeddings(side: Side) -> None:
    reply = side.client.embeddings.create(model=side.model, input="hello")
    need(
        reply.data and reply.data[0].embedding and all(isinstance(x, float) for x in reply.data[0].embedding),
        "no embedding vector",
    )


def battery(token: tuple[int, str]) -> dict[str, Callable[[Side], str | None]]:
    checks: list[Callable[..., str | None]] = [
        chat_plain,
        system_message,
        developer_role,
        content_text_parts,
        content_image_refused,
        multi_turn,
        max_tokens,
        max_completion_tokens,
        default_not_capped_256,
        stop,
        seed_determinism,
        temperature_top_p,
        n_choices,
        logprobs,
        logit_bias,
        response_format_json_object,
        response_format_json_schema,
        tools_required,
        tools_named_choice,
        tool_result_turn,
        parallel_tool_calls,
        stream_include_usage,
        user_field,
        models_list,
        legacy_completions,
        error_unknown_model,
        error_bad_request,
        embeddings,
    ]
    # logit_bias needs a token id of the served vocabulary
    return {c.__name__: partial(c, token=token) if c is logit_bias else c for c in checks}


def judge(check: Callable[[Side], str | None], side: Side) -> tuple[bool, str]:
    """(passed, reason or note): any error a client would see is a FAIL with its reason."""
    try:
        return True, check(side) or ""
    except Fail as exc:
        return False, str(exc)
    except openai.APIStatusError as exc:
        said = exc.body.get("message") if isinstance(exc.body, dict) else None
        return False, f"HTTP {exc.status_code}: {short(str(said or exc.response.text or exc.message))}"
    except openai.APITimeoutError:
        return False, f"no answer within {TIMEOUT:g} s"
    except openai.APIConnectionError as exc:
        return False, f"connection: {short(str(exc))}"
    except Exception as exc:  # a malformed answer the client library could not parse, among others
        return False, f"{type(exc).__name__}: {short(str(exc))}"


def short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- servers -------------------------------------------------------------------------


def tokenizer_probe(native: str) -> tuple[int, str]:
    """A one-token word (id, text) from the served GGUF, for the logit_bias check (llama-server's
    /tokenize on the native side: the same file both sides serve)."""
    for word in (" banana", " zebra", " purple"):
        ids = httpx.post(f"{native}/tokenize", json={"content": word}, timeout=TIMEOUT).json()["tokens"]
        if len(ids) == 1:
            return ids[0], word.strip()
    raise SystemExit("no one-token probe word in this model's vocabulary")


@dataclass
class Servers:
    work: Path
    threads: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)  # before any wait: a server that never comes up is still stopped
        return proc

    def native(self, gguf: Path) -> str:
        port = free_port()
        log = self.work / "native.log"
        proc = self.spawn(native_command(gguf, port, SLOTS, CONTEXT, self.threads), log)
        wait_health(f"http://127.0.0.1:{port}/health", proc, log)
        return f"http://127.0.0.1:{port}"

    def appliance(self, home: Home) -> str:
        """``appliance serve`` in its own process, as users run it."""
        port = free_port()
        log = self.work / "appliance.log"
        env = {
            **os.environ,
            "APPLIANCE_SERVE__THREADS": str(self.threads),
            "APPLIANCE_SERVE__SLOTS": str(SLOTS),
            "APPLIANCE_SERVE__CONTEXT": str(CONTEXT),
            "APPLIANCE_SERVE__MAX_TOKENS_LIMIT": str(CONTEXT),
        }
        proc = self.spawn(
            [sys.executable, "-m", "appliance.cli.command", "serve", "--home", str(home.root), "--port", str(port)],
            log,
            env,
        )
        wait_health(f"http://127.0.0.1:{port}/health", proc, log, lambda r: bool(r.json().get("loaded")))
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(sides: list[Side], checks: dict[str, Callable[[Side], str | None]]) -> Iterator[tuple[str, dict]]:
    width = max(map(len, checks))
    for name, check in checks.items():
        verdicts = {side.name: judge(check, side) for side in sides}
        cells = [
            f"{side}={'PASS' if ok else 'FAIL'}" + (f"({why})" if why else "") for side, (ok, why) in verdicts.items()
        ]
        print(f"{name:{width}s}  " + "  ".join(cells), flush=True)
        yield name, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=f"skip the slowest checks ({', '.join(sorted(SLOW))})")
    parser.add_argument("--model-gguf", type=Path, help="a GGUF to serve instead of the embedded SmolLM2-135M")
    # One thread each: the verdicts do not depend on it, and on a shared 2-core machine two
    # llama.cpp threads spin-waiting on each other under other load ran 17x slower than one
    # (3.3 against 55 tokens/s, measured back to back), long enough to turn answers into timeouts.
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per server (default 1)")
    args = parser.parse_args()
    gguf = (args.model_gguf or embedded_gguf()).resolve()

    work = Path(tempfile.mkdtemp(prefix="openai-compat-"))
    servers = Servers(work, args.threads)
    started = time.monotonic()
    try:
        home = create_home(work / "home", "embedded")
        registry.add(home, "base", gguf, {"quant": "as shipped"})
        registry.promote(home, "base")
        native_root = servers.native(registry.gguf_path(home, "base"))
        app_root = servers.appliance(home)
        sides = [
            Side("native", native_root, "none", "native"),
            Side("appliance", app_root, read_api_key(home), "appliance"),
        ]
        checks = battery(tokenizer_probe(native_root))
        if args.smoke:
            checks = {k: v for k, v in checks.items() if k not in SLOW}
        features = {name: [verdicts["native"][0], verdicts["appliance"][0]] for name, verdicts in run(sides, checks)}
    except BaseException:
        for log in sorted(work.glob("*.log")):  # the temporary folder goes: its logs' ends first
            print(
                f"--- {log.name} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]),
                file=sys.stderr,
            )
        raise
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    native_ok = [f for f, (n, _) in features.items() if n]
    both = sum(1 for f in native_ok if features[f][1])
    ratio = both / len(native_ok) if native_ok else 0.0
    result = {
        "name": "openai_compat",
        "model": gguf.name,
        "smoke": args.smoke,
        "threads": args.threads,
        "seconds": round(time.monotonic() - started, 1),
        "native_passed": len(native_ok),
        "appliance_passed": sum(a for _, a in features.values()),
        "both": both,
        "ratio": round(ratio, 3),
        "target": 1.0,
        "pass": ratio >= 1.0,
        "features": features,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
