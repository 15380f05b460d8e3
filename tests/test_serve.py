"""The endpoint against a real running server: the official openai client, the native
llama-server backends behind the front, R1 security, hot swap, and an R2 fuzz test."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port, tiny_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from appliance.cli.init import create_home, export_base
from appliance.contract.errors import ServeError
from appliance.home import registry
from appliance.home.config import load
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server

CANARY = "zebra-canary-4711"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    """The tiny base exported once as ``base``; v1..v3 are the same file under new names
    (each backend answers under its own version name, which is what hot swap checks)."""
    home = create_home(tmp_path_factory.mktemp("serve") / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    settings = load(home.config)
    export_base(home, settings)
    for version in ("v1", "v2", "v3"):
        registry.add(home, version, registry.gguf_path(home, "base"), {"quant": "same as base"})
    server = Server(home, settings, port=free_port()).start()
    key = read_api_key(home)
    yield {
        "home": home,
        "server": server,
        "key": key,
        "tokenizer": tiny_base,
        "client": openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120),
    }
    backends = server.pool.backends()
    server.stop()
    assert all(b.proc is None or b.proc.poll() is not None for b in backends), "a llama-server outlived stop()"


def auth(served) -> dict[str, str]:
    return {"Authorization": f"Bearer {served['key']}"}


# --- the contract through the official client ------------------------------------------


def test_chat_streaming_and_not(served):
    client, current = served["client"], registry.current(served["home"])
    reply = client.chat.completions.create(
        model="appliance",
        max_tokens=8,
        temperature=0,
        messages=[{"role": "user", "content": "Who is on call tonight?"}],
    )
    assert reply.model == current
    assert reply.choices[0].message.role == "assistant"
    assert 1 <= reply.usage.completion_tokens <= 8
    chunks = list(
        client.chat.completions.create(
            model="appliance",
            max_tokens=8,
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": "Who is on call tonight?"}],
        )
    )
    assert len(chunks) >= 2 and {c.model for c in chunks} == {current}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # same answer at temperature 0


def test_completions_streaming_and_not(served):
    client = served["client"]
    reply = client.completions.create(model="v1", prompt="The clinic opens at", max_tokens=6, temperature=0)
    assert reply.model == "v1" and reply.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(model="v1", prompt="The clinic opens at", max_tokens=6, temperature=0, stream=True)
    )
    assert {c.model for c in chunks} == {"v1"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text


def test_models_and_unknown_model(served):
    client = served["client"]
    assert {m.id for m in client.models.list()} == {"appliance", "base", "v1", "v2", "v3"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])


def test_prompt_longer_than_the_context_is_a_clear_400(served):
    reply = httpx.post(
        served["server"].url + "/v1/completions",
        headers=auth(served),
        timeout=120,
        json={"model": "appliance", "prompt": "policy " * 5000, "max_tokens": 4},
    )
    assert reply.status_code == 400 and "context" in reply.json()["error"]["message"]


def test_served_template_is_the_training_template(served):
    """llama-server (--jinja) renders the GGUF's template exactly as training rendered it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served["tokenizer"])
    backend = served["server"].pool.backends(registry.current(served["home"]))[0]
    conversations = [
        [{"role": "user", "content": "Who is on call tonight?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Fees?"},
        ],
    ]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(backend.socket)), base_url="http://b") as raw:
        for messages in conversations:
            served_prompt = raw.post("/apply-template", json={"messages": messages}).json()["prompt"]
            assert served_prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_one_log_line_per_request_without_text(served, caplog):
    with caplog.at_level(logging.INFO, logger="appliance.serve"):
        served["client"].chat.completions.create(
            model="appliance", max_tokens=4, messages=[{"role": "user", "content": f"Say {CANARY}"}]
        )
        list(
            served["client"].chat.completions.create(
                model="appliance", max_tokens=4, stream=True, messages=[{"role": "user", "content": f"Say {CANARY}"}]
            )
        )
        # A stream's line is written when the front has closed it, just after the client saw
        # the last chunk: wait for it rather than race it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(r.getMessage().startswith("request ") for r in caplog.records) < 2:
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(lines) == 2
    for line in lines:
        assert f"model={registry.current(served['home'])}" in line and "seconds=" in line
        assert "prompt_tokens=None" not in line and "completion_tokens=None" not in line
    everything = "\n".join(r.getMessage() for r in caplog.records)
    backend_logs = "".join(p.read_text(errors="replace") for p in served["home"].logs.glob("llama-server-*.log"))
    assert CANARY not in everything and CANARY not in backend_logs


# --- R1 -------------------------------------------------------------------------------


def test_keys_hosts_and_origins_refused(served):
    url, good = served["server"].url, auth(served)
    chat = {"model": "appliance", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(url + "/v1/chat/completions", json=chat).status_code == 401
    assert (
        httpx.post(url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert (
        httpx.post(url + "/v1/chat/completions", json=chat, headers={**good, "Host": "evil.example"}).status_code == 403
    )
    assert (
        httpx.post(
            url + "/v1/chat/completions", json=chat, headers={**good, "Origin": "http://evil.example"}
        ).status_code
        == 403
    )
    assert (
        httpx.options(
            url + "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        ).status_code
        == 403
    )
    ok = httpx.post(url + "/v1/chat/completions", json=chat, headers=good, timeout=60)
    assert ok.status_code == 200
    assert not any(h.startswith("access-control-") for h in ok.headers)  # the backend's "*" never leaks out


def test_backend_is_unsafe_alone_so_it_is_private(served):
    """The finding that puts llama-server behind the front: it answers any Host and reflects
    any Origin in Access-Control-Allow-Origin. It therefore only listens on a socket in a 0700 folder."""
    backend = served["server"].pool.backends(registry.current(served["home"]))[0]
    assert "--port" not in backend.command() and str(backend.socket).endswith(".sock")
    assert backend.folder.stat().st_mode & 0o777 == 0o700
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(backend.socket)), base_url="http://b") as raw:
        reply = raw.get("/v1/models", headers={"Host": "evil.example", "Origin": "http://evil.example"})
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "http://evil.example"
    pid = backend.proc.pid
    own = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # an fd the server closed between listing and reading
            own.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    for table in ("tcp", "tcp6"):
        rows = [line.split() for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]]
        listeners = {f"socket:[{row[9]}]" for row in rows if row[3] == "0A"}  # 0A: LISTEN
        assert not listeners & own, f"llama-server listens on {table}"


def test_non_loopback_bind_needs_config_and_a_key(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    with pytest.raises(ServeError, match="non-loopback"):
        Server(home, load(home.config), host="0.0.0.0", port=free_port())
    settings = load(home.config)
    settings.serve.host = "0.0.0.0"
    home.api_key.write_text("")
    with pytest.raises(ServeError, match="API key file is empty"):
        Server(home, settings, host="0.0.0.0", port=free_port())


def test_no_backend_outlives_a_killed_server(served):
    """SIGKILL leaves no atexit to run: the backend's parent-death signal must stop it."""
    script = (
        "import sys; from appliance.home.config import load; from appliance.home.paths import Home; "
        "from appliance.serving.server import Server; home = Home(__import__('pathlib').Path(sys.argv[1])); "
        "s = Server(home, load(home.config), port=int(sys.argv[2])).start(); "
        "print(*[b.proc.pid for b in s.pool.backends()], flush=True); __import__('time').sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(served["home"].root), str(free_port())], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids):
        assert time.monotonic() < deadline, "llama-server outlived its killed parent"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_version_removed_from_the_registry_stops_being_served(served):
    home, client = served["home"], served["client"]
    registry.add(home, "v5", registry.gguf_path(home, "base"), {"quant": "same as base"})
    assert client.completions.create(model="v5", prompt="Hi", max_tokens=2).model == "v5"
    backend = served["server"].pool.backends("v5")[0]
    shutil.rmtree(home.model("v5"))  # what retiring or pruning a version does to its folder
    deadline = time.monotonic() + 15
    while "v5" in served["server"].pool.loaded() or backend.alive():
        assert time.monotonic() < deadline, "the removed version is still loaded"
        time.sleep(0.1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="v5", prompt="Hi", max_tokens=2)


# --- hot swap -------------------------------------------------------------------------


@pytest.mark.slow
def test_hot_swap_drops_nothing(served):
    """Clients hammer 'appliance' through 3 promotions and 1 rollback: zero errors, and each
    answer comes from a version that was current while the request was open."""
    home, client = served["home"], served["client"]
    registry.promote(home, "base")
    # (before, after, version): the link moved to ``version`` between ``before`` and ``after``
    timeline: list[tuple[float, float, str]] = [(0.0, time.monotonic(), "base")]
    answers: list[tuple[float, float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def hammer(stream: bool) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if stream:
                    chunks = list(
                        client.chat.completions.create(
                            model="appliance", max_tokens=6, stream=True, messages=[{"role": "user", "content": "Hi"}]
                        )
                    )
                    models = {c.model for c in chunks}
                    assert len(models) == 1, models
                    model = models.pop()
                else:
                    model = client.chat.completions.create(
                        model="appliance", max_tokens=6, messages=[{"role": "user", "content": "Hi"}]
                    ).model
                answers.append((sent, time.monotonic(), model))
            except Exception as exc:  # noqa: BLE001  (every failure is collected and fails the test)
                errors.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(i % 2 == 1,)) for i in range(4)]
    for t in threads:
        t.start()

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 120
        while not any(m == version and s > timeline[-1][1] for s, _, m in answers):
            assert time.monotonic() < deadline, f"{version} never answered"
            time.sleep(0.05)
        time.sleep(0.5)

    def switch(action) -> None:
        before = time.monotonic()
        version = action()
        timeline.append((before, time.monotonic(), version))
        wait_for(version)

    try:
        wait_for("base")
        for version in ("v1", "v2", "v3"):
            switch(lambda v=version: (registry.promote(home, v), v)[1])
        switch(lambda: registry.rollback(home))
        assert timeline[-1][2] == "v2"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    assert len(answers) > 20
    for sent, done, model in answers:
        # the versions 'appliance' pointed at during the request (from just before a
        # switch began to just after the next one ended)
        live = {
            v
            for i, (before, _, v) in enumerate(timeline)
            if before <= done and (i + 1 == len(timeline) or timeline[i + 1][1] >= sent)
        }
        assert model in live, (model, live)
    assert len(served["server"].pool.loaded()) <= served["server"].pool.keep


@pytest.mark.slow
def test_a_version_that_will_not_load_is_not_switched_to(served, tmp_path: Path):
    home, client = served["home"], served["client"]
    registry.promote(home, "v1")
    assert (
        client.chat.completions.create(
            model="appliance", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        ).model
        == "v1"
    )
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(registry.gguf_path(home, "base").read_bytes()[:100_000])  # truncated
    registry.add(home, "v9", broken, {"quant": "broken on purpose"})  # no check: it gets past registration
    try:
        registry.promote(home, "v9")
        for _ in range(3):
            reply = client.chat.completions.create(
                model="appliance", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
            )
            assert reply.model == "v1"  # the old one keeps serving, and says so
        with pytest.raises(openai.InternalServerError, match="could not be loaded"):
            client.chat.completions.create(model="v9", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    finally:
        registry.promote(home, "v1")
        shutil.rmtree(home.model("v9"))
    assert httpx.get(served["server"].url + "/health").json()["status"] == "ok"


# --- R2 -------------------------------------------------------------------------------

# JSON-schema-like values, hostile ones among them: deep nesting, huge enums, repetitions, $refs
# that point nowhere, outside or back at themselves.
SCHEMA_LEAVES = st.one_of(
    st.sampled_from(
        [
            {"type": "string"},
            {"type": "integer", "minimum": 0},
            {"$ref": "#"},
            {"$ref": "#/$defs/a"},
            {"$ref": "http://evil.example/s"},
            {"enum": list(range(5000))},
            {"type": "array", "minItems": 10**6},
            {"type": "string", "pattern": "(a*)*" * 80},
            True,
        ]
    ),
    st.dictionaries(st.sampled_from(["type", "enum", "const", "maxLength"]), st.integers(), max_size=2),
)
SCHEMAS = st.recursive(
    SCHEMA_LEAVES,
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(st.text(max_size=3), inner, max_size=3)}
        ),
        st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"$defs": st.fixed_dictionaries({"a": inner}), "$ref": st.just("#/$defs/a")}),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner}),
    ),
    max_leaves=40,
)
TOOLS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "x"]),
            "function": st.fixed_dictionaries(
                {"name": st.sampled_from(["f", "g", "", "a b", "x" * 80]), "parameters": SCHEMAS}
            ),
        }
    ),
    max_size=3,
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    TOOLS,
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["json_schema", "json_object", "text", "x"]),
            "json_schema": st.fixed_dictionaries({"name": st.just("s"), "schema": SCHEMAS}),
            "schema": SCHEMAS,
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "z"])})}
    ),
    st.sampled_from(["auto", "none", "required"]),
)
FIELDS = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "n",
        "top_k",
        "top_p",
        "temperature",
        "stream",
        "stop",
        "seed",
        "logit_bias",
        "min_p",
        "ignore_eos",
        "max_completion_tokens",
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "user",
        "stream_options",
        "parallel_tool_calls",
        "grammar",
        "lora",
        "id_slot",
        "cache_prompt",
    ]
)
CONTENT = st.one_of(
    st.text(max_size=60),
    st.integers(),
    st.none(),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", ""]), "text": st.one_of(st.text(max_size=20), st.integers())}
        ),
        max_size=3,
    ),
)
CALLS = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(max_size=5),
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": st.sampled_from(["f", ""]), "arguments": st.text(max_size=20)}),
        }
    ),
    max_size=2,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", ""]), "content": CONTENT},
        optional={"tool_calls": CALLS, "tool_call_id": st.text(max_size=5)},
    ),
    max_size=3,
)
BODIES = st.fixed_dictionaries(
    {"messages": MESSAGES, "max_tokens": st.integers(-5, 6)},
    optional={"model": st.sampled_from(["appliance", "v1", "nope", "", "../base"])},
).flatmap(lambda base: st.dictionaries(FIELDS, VALUES, max_size=4).map(lambda extra: {**base, **extra}))
RAW = st.one_of(
    st.binary(max_size=200),
    st.just(b'\xff\xfe{"messages": 1}'),
    st.just(b'{"messages": [}'),
    st.just(b"[" * 5000),
    st.just(b"null"),
)


def check_answer(reply: httpx.Response) -> None:
    assert reply.status_code == 200 or 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    if reply.status_code != 200:
        assert reply.json()["error"]["message"]


@pytest.mark.slow
@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=BODIES, chat=st.booleans())
def test_fuzzed_bodies_get_200_or_a_clear_4xx(served, body, chat):
    """Every field a client may send, the new ones and hostile schemas among them: a 200 or a
    clear 4xx, in bounded time (a schema that would keep a slot busy must be refused)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not chat and "prompt" not in body:
        body = {**body, "prompt": str(body.get("messages"))[:50]}
    started = time.monotonic()
    check_answer(httpx.post(served["server"].url + path, json=body, headers=auth(served), timeout=120))
    assert time.monotonic() - started < 60


@pytest.mark.slow
@hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=RAW)
def test_fuzzed_raw_bytes_get_a_clear_400(served, raw):
    reply = httpx.post(
        served["server"].url + "/v1/chat/completions",
        content=raw,
        timeout=60,
        headers={**auth(served), "Content-Type": "application/json"},
    )
    assert 400 <= reply.status_code < 500 and reply.json()["error"]["message"]


@pytest.mark.slow
def test_huge_and_hostile_requests_leave_the_server_up(served):
    url, good = served["server"].url, auth(served)
    huge = httpx.post(
        url + "/v1/completions", headers=good, timeout=60, json={"prompt": "x" * 3_000_000, "max_tokens": 4}
    )
    assert huge.status_code == 413
    for extra in ({"max_tokens": -1}, {"max_tokens": 10**12}, {"n": 5}, {"top_k": -3}, {"top_k": 10**9}):
        check_answer(
            httpx.post(
                url + "/v1/chat/completions",
                headers=good,
                timeout=60,
                json={"messages": [{"role": "user", "content": "x"}], **extra},
            )
        )
    reply = served["client"].chat.completions.create(
        model="appliance", max_tokens=2, messages=[{"role": "user", "content": "still there?"}]
    )
    assert reply.choices[0].message is not None


# --- a drop-in endpoint: what llama.cpp's server speaks, through the guard --------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
CLINIC = {
    "type": "function",
    "function": {
        "name": "opening_hours",
        "parameters": {"type": "object", "properties": {"day": {"enum": ["mon", "tue"]}}, "required": ["day"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def check_calls(calls, names: set[str]) -> list[dict]:
    """Tool calls as OpenAI shapes them: an id, a known function, arguments that are a JSON object."""
    import json

    assert calls, "no tool call came back"
    out = []
    for call in calls:
        assert call.id and call.type == "function" and call.function.name in names
        out.append(json.loads(call.function.arguments))
        assert isinstance(out[-1], dict)
    return out


def test_messages_as_clients_send_them(served):
    """developer messages, content as text parts and tool-call/tool-result turns are read, and
    render to the same prompt as their plain equivalents."""
    client = served["client"]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fees?\nAnd hours?"}]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Fees?"}, {"type": "text", "text": "And hours?"}]},
    ]
    answers = [
        client.chat.completions.create(model="appliance", max_tokens=6, temperature=0, messages=m)
        for m in (plain, parts)
    ]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
    ]
    reply = client.chat.completions.create(model="appliance", max_tokens=6, messages=history, tools=[WEATHER])
    assert reply.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="reads text only"):
        client.chat.completions.create(
            model="appliance",
            max_tokens=4,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
        )


def test_tool_calls_through_the_official_client(served):
    """The tiny model's template has no tool support: the front constrains the answer to a
    well-formed call of a listed function, as a tool-aware template would, streamed or not."""
    client, names = served["client"], {"get_weather", "opening_hours"}
    reply = client.chat.completions.create(
        model="appliance",
        max_tokens=250,
        temperature=0,
        messages=ASK,
        tools=[WEATHER, CLINIC],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    assert len(check_calls(reply.choices[0].message.tool_calls, names)) == 1
    named = client.chat.completions.create(
        model="appliance",
        max_tokens=250,
        temperature=0,
        messages=ASK,
        tools=[WEATHER, CLINIC],
        tool_choice={"type": "function", "function": {"name": "opening_hours"}},
    )
    args = check_calls(named.choices[0].message.tool_calls, {"opening_hours"})
    assert all(a["day"] in ("mon", "tue") for a in args)
    chunks = list(
        client.chat.completions.create(
            model="appliance",
            max_tokens=250,
            temperature=0,
            messages=ASK,
            tools=[CLINIC],
            tool_choice="required",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    check_calls(calls, {"opening_hours"})
    assert chunks[-1].usage.completion_tokens >= 1
    assert {c.model for c in chunks} == {registry.current(served["home"])}


def test_response_format_logprobs_bias_choices_and_user(served):
    import json

    client = served["client"]
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
    }
    reply = client.chat.completions.create(
        model="appliance",
        max_tokens=60,
        temperature=0,
        messages=ASK,
        user="desk-7",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
    )
    data = json.loads(reply.choices[0].message.content)
    assert isinstance(data["answer"], str) and isinstance(data["sure"], bool)
    anything = client.chat.completions.create(
        model="appliance", max_tokens=60, temperature=0, messages=ASK, response_format={"type": "json_object"}
    )
    assert (
        anything.choices[0].message.content.lstrip()[:1] in ("{", "[", '"')
        or anything.choices[0].finish_reason == "length"
    )
    scored = client.chat.completions.create(
        model="appliance", max_completion_tokens=3, temperature=0, messages=ASK, logprobs=True, top_logprobs=2, n=2
    )
    assert len(scored.choices) == 2 and scored.usage.completion_tokens <= 6
    tokens = scored.choices[0].logprobs.content
    assert tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    first = tokens[0].top_logprobs[0]
    banned = client.chat.completions.create(
        model="appliance",
        max_tokens=1,
        temperature=0,
        messages=ASK,
        logprobs=True,
        top_logprobs=1,
        logit_bias={str(_token_id(served, first)): -100},
    )
    assert banned.choices[0].logprobs.content[0].token != first.token


def _token_id(served, top) -> int:
    backend = served["server"].pool.backends(registry.current(served["home"]))[0]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(backend.socket)), base_url="http://b") as raw:
        return raw.post("/tokenize", json={"content": top.token}).json()["tokens"][0]


def test_no_max_tokens_runs_past_256_up_to_the_limit(served):
    """OpenAI's behaviour: no max_tokens, no silent cut at 256 (bounded by serve.max_tokens_limit)."""
    reply = httpx.post(
        served["server"].url + "/v1/completions",
        headers=auth(served),
        timeout=300,
        json={"prompt": "The clinic", "ignore_eos": True},
    )
    usage = reply.json()["usage"]
    assert 256 < usage["completion_tokens"] <= load(served["home"].config).serve.max_tokens_limit


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"grammar": 'root ::= "x"'}, "grammar"),
        ({"lora": [{"id": 0, "scale": 1}]}, "lora"),
        ({"id_slot": 0}, "id_slot"),
        ({"cache_prompt": False}, "cache_prompt"),
        ({"n": 99}, "n"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#"}}}},
            "response_format",
        ),
    ],
)
def test_what_the_guard_cannot_vouch_for_is_refused_clearly(served, extra, param):
    reply = httpx.post(
        served["server"].url + "/v1/chat/completions",
        headers=auth(served),
        timeout=60,
        json={"messages": ASK, "max_tokens": 2, **extra},
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


HOSTILE = [
    _nested(200),
    {"enum": [str(i) for i in range(20_000)]},
    {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}}, "$ref": "#/$defs/a"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$ref": "http://evil.example/schema.json"},
    {"type": "array", "items": {"type": "string"}, "minItems": 100_000},
    {"type": "string", "pattern": "(a*)*" * 100},
]


def test_hostile_schemas_are_refused_and_the_backend_keeps_answering(served):
    """Each of these keeps a llama.cpp slot busy for minutes or is refused by it: the front
    refuses them all at once, as response_format and as tool parameters."""
    url, good = served["server"].url + "/v1/chat/completions", auth(served)
    for schema in HOSTILE:
        started = time.monotonic()
        for extra in (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "h", "schema": schema}}},
            {"tools": [{"type": "function", "function": {"name": "h", "parameters": schema}}]},
        ):
            reply = httpx.post(url, headers=good, timeout=30, json={"messages": ASK, "max_tokens": 4, **extra})
            assert reply.status_code == 400 and reply.json()["error"]["message"], reply.text[:200]
        assert time.monotonic() - started < 5
    fine = _nested(8) | {"$defs": {"d": {"type": "integer"}}}
    fine["properties"]["n"] = {"$ref": "#/$defs/d"}
    reply = served["client"].chat.completions.create(
        model="appliance",
        max_tokens=40,
        messages=ASK,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": fine}},
    )
    assert reply.choices[0].message is not None


def test_errors_and_models_have_openai_shapes(served):
    url, good = served["server"].url, auth(served)
    for reply in (
        httpx.get(url + "/v1/nothing", headers=good),
        httpx.get(url + "/v1/chat/completions", headers=good),
        httpx.post(url + "/v1/chat/completions", json={}),
        httpx.post(url + "/v1/embeddings", headers=good, json={"input": "x"}),
    ):
        assert 400 <= reply.status_code < 500
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}, reply.text
    missing = httpx.post(url + "/v1/embeddings", headers=good, json={"input": "x", "model": "e"})
    assert missing.status_code == 404 and "no embedding model is configured" in missing.json()["error"]["message"]
    models = {m["id"]: m for m in httpx.get(url + "/v1/models", headers=good).json()["data"]}
    current = registry.current(served["home"])
    for entry in models.values():
        assert entry["object"] == "model" and entry["owned_by"] == "appliance" and entry["created"] > 0
        assert entry["collection"] == "shared" and "quant" in entry
    assert models["appliance"]["version"] == current and models["v1"]["quant"] == "same as base"


def test_user_is_counted_never_written(served):
    from appliance.home import audit

    for user in ("alice@example.org", "bob@example.org", "alice@example.org"):
        served["client"].completions.create(model="v2", prompt="Hi", max_tokens=1, user=user)
    served["server"].usage.flush()
    uses = [
        e["details"]
        for e in audit.entries(served["home"])
        if e["action"] == "key_use" and e["details"]["model"] == "v2"
    ]
    assert sum(u.get("users", 0) for u in uses) == 2
    assert "alice@example.org" not in served["home"].audit_log.read_text()


@pytest.fixture(scope="module")
def embedding_served(tmp_path_factory: pytest.TempPathFactory):
    """An endpoint with no chat model promoted and the embedded SmolLM2 GGUF as its embedding model."""
    from appliance.home.keys import KeyStore
    from appliance.training.basemodel import embedded_gguf

    home = create_home(tmp_path_factory.mktemp("embed") / "home", "tiny", tiny_settings())
    settings = load(home.config)
    settings.grounding.embedding_model = str(embedded_gguf())
    server = Server(home, settings, port=free_port()).start()
    walled = KeyStore(home).add("walled", "chat", ["legal"])
    yield {"server": server, "key": read_api_key(home), "walled": walled}
    server.stop()


def test_embeddings_from_the_configured_model(embedding_served):
    import array
    import base64
    import math

    url = embedding_served["server"].url
    client = openai.OpenAI(base_url=url + "/v1", api_key=embedding_served["walled"], max_retries=0, timeout=120)
    assert "appliance-embedding" in {m.id for m in client.models.list()}
    reply = client.embeddings.create(model="appliance-embedding", input=["The clinic opens at 8.", "Fees are low."])
    vectors = [d.embedding for d in reply.data]
    assert len(vectors) == 2 and len(vectors[0]) == 576 and vectors[0] != vectors[1]
    assert all(math.isfinite(x) for x in vectors[0]) and reply.usage.prompt_tokens > 0
    once, packed = (
        client.embeddings.create(model="appliance-embedding", input="The clinic opens at 8.", encoding_format=encoding)
        .data[0]
        .embedding
        for encoding in ("float", "base64")
    )
    again = array.array("f", base64.b64decode(packed)).tolist()  # little-endian float32, as OpenAI sends them
    assert once == pytest.approx(again, abs=1e-5) and len(once) == 576
    assert httpx.post(url + "/v1/embeddings", json={"input": "x"}).status_code == 401
    with pytest.raises(openai.NotFoundError, match="embedding model"):
        client.embeddings.create(model="appliance/legal", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="appliance-embedding", input=[])
