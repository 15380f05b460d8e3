"""The endpoint against a real running server: the official openai client, the native
llama-server backends behind the front, R1 security, hot swap, and an R2 fuzz test."""

from __future__ import annotations

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
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from appliance.home import registry
from appliance.home.config import load
from appliance.contract.errors import ServeError
from appliance.cli.init import create_home, export_base
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server

from conftest import free_port, tiny_settings

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
    yield {"home": home, "server": server, "key": key, "tokenizer": tiny_base,
           "client": openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)}
    backends = list(server.pool._ready.values())
    server.stop()
    assert all(b.proc is None or b.proc.poll() is not None for b in backends), "a llama-server outlived stop()"


def auth(served) -> dict[str, str]:
    return {"Authorization": f"Bearer {served['key']}"}


# --- the contract through the official client ------------------------------------------


def test_chat_streaming_and_not(served):
    client, current = served["client"], registry.current(served["home"])
    reply = client.chat.completions.create(model="appliance", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Who is on call tonight?"}])
    assert reply.model == current
    assert reply.choices[0].message.role == "assistant"
    assert 1 <= reply.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="appliance", max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Who is on call tonight?"}]))
    assert len(chunks) >= 2 and {c.model for c in chunks} == {current}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # same answer at temperature 0


def test_completions_streaming_and_not(served):
    client = served["client"]
    reply = client.completions.create(model="v1", prompt="The clinic opens at", max_tokens=6, temperature=0)
    assert reply.model == "v1" and reply.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="v1", prompt="The clinic opens at", max_tokens=6,
                                            temperature=0, stream=True))
    assert {c.model for c in chunks} == {"v1"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text


def test_models_and_unknown_model(served):
    client = served["client"]
    assert {m.id for m in client.models.list()} == {"appliance", "base", "v1", "v2", "v3"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])


def test_prompt_longer_than_the_context_is_a_clear_400(served):
    reply = httpx.post(served["server"].url + "/v1/completions", headers=auth(served), timeout=120,
                       json={"model": "appliance", "prompt": "policy " * 5000, "max_tokens": 4})
    assert reply.status_code == 400 and "context" in reply.json()["error"]["message"]


def test_served_template_is_the_training_template(served):
    """llama-server (--jinja) renders the GGUF's template exactly as training rendered it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served["tokenizer"])
    backend = served["server"].pool._ready[registry.current(served["home"])]
    conversations = [[{"role": "user", "content": "Who is on call tonight?"}],
                     [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Fees?"}]]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(backend.socket)), base_url="http://b") as raw:
        for messages in conversations:
            served_prompt = raw.post("/apply-template", json={"messages": messages}).json()["prompt"]
            assert served_prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_one_log_line_per_request_without_text(served, caplog):
    with caplog.at_level(logging.INFO, logger="appliance.serve"):
        served["client"].chat.completions.create(model="appliance", max_tokens=4,
                                                 messages=[{"role": "user", "content": f"Say {CANARY}"}])
        list(served["client"].chat.completions.create(model="appliance", max_tokens=4, stream=True,
                                                      messages=[{"role": "user", "content": f"Say {CANARY}"}]))
        # A stream's line is written when the front has closed it, just after the client saw
        # the last chunk: wait for it rather than race it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(
                r.getMessage().startswith("request ") for r in caplog.records) < 2:
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
    assert httpx.post(url + "/v1/chat/completions", json=chat,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers={**good, "Host": "evil.example"}).status_code == 403
    assert httpx.post(url + "/v1/chat/completions", json=chat,
                      headers={**good, "Origin": "http://evil.example"}).status_code == 403
    assert httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                "Access-Control-Request-Method": "POST"}).status_code == 403
    ok = httpx.post(url + "/v1/chat/completions", json=chat, headers=good, timeout=60)
    assert ok.status_code == 200
    assert not any(h.startswith("access-control-") for h in ok.headers)  # the backend's "*" never leaks out


def test_backend_is_unsafe_alone_so_it_is_private(served):
    """The finding that puts llama-server behind the front: it answers any Host and reflects
    any Origin in Access-Control-Allow-Origin. It therefore only listens on a socket in a 0700 folder."""
    backend = served["server"].pool._ready[registry.current(served["home"])]
    assert "--port" not in backend.command() and str(backend.socket).endswith(".sock")
    assert backend.folder.stat().st_mode & 0o777 == 0o700
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(backend.socket)), base_url="http://b") as raw:
        reply = raw.get("/v1/models", headers={"Host": "evil.example", "Origin": "http://evil.example"})
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "http://evil.example"
    pid = backend.proc.pid
    own = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
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
    script = ("import sys; from appliance.home.config import load; from appliance.home.paths import Home; "
              "from appliance.serving.server import Server; home = Home(__import__('pathlib').Path(sys.argv[1])); "
              "s = Server(home, load(home.config), port=int(sys.argv[2])).start(); "
              "print(*[b.proc.pid for b in s.pool._ready.values()], flush=True); __import__('time').sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(served["home"].root), str(free_port())],
                            stdout=subprocess.PIPE, text=True)
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
    backend = served["server"].pool._ready["v5"]
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
                    chunks = list(client.chat.completions.create(
                        model="appliance", max_tokens=6, stream=True, messages=[{"role": "user", "content": "Hi"}]))
                    models = {c.model for c in chunks}
                    assert len(models) == 1, models
                    model = models.pop()
                else:
                    model = client.chat.completions.create(
                        model="appliance", max_tokens=6, messages=[{"role": "user", "content": "Hi"}]).model
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
        live = {v for i, (before, _, v) in enumerate(timeline)
                if before <= done and (i + 1 == len(timeline) or timeline[i + 1][1] >= sent)}
        assert model in live, (model, live)
    assert len(served["server"].pool.loaded()) <= served["server"].pool.keep


@pytest.mark.slow
def test_a_version_that_will_not_load_is_not_switched_to(served, tmp_path: Path):
    home, client = served["home"], served["client"]
    registry.promote(home, "v1")
    assert client.chat.completions.create(model="appliance", max_tokens=2,
                                          messages=[{"role": "user", "content": "Hi"}]).model == "v1"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(registry.gguf_path(home, "base").read_bytes()[:100_000])  # truncated
    registry.add(home, "v9", broken, {"quant": "broken on purpose"})  # no check: it gets past registration
    try:
        registry.promote(home, "v9")
        for _ in range(3):
            reply = client.chat.completions.create(model="appliance", max_tokens=2,
                                                   messages=[{"role": "user", "content": "Hi"}])
            assert reply.model == "v1"  # the old one keeps serving, and says so
        with pytest.raises(openai.InternalServerError, match="could not be loaded"):
            client.chat.completions.create(model="v9", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    finally:
        registry.promote(home, "v1")
        shutil.rmtree(home.model("v9"))
    assert httpx.get(served["server"].url + "/health").json()["status"] == "ok"


# --- R2 -------------------------------------------------------------------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True), st.text(max_size=40), st.lists(st.text(max_size=5), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
FIELDS = st.sampled_from(["model", "messages", "prompt", "max_tokens", "n", "top_k", "top_p", "temperature",
                          "stream", "stop", "seed", "logit_bias", "min_p", "ignore_eos", "max_completion_tokens"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                           "content": st.one_of(st.text(max_size=60), st.integers())}), max_size=3)
BODIES = st.fixed_dictionaries({"messages": MESSAGES, "max_tokens": st.integers(-5, 6)},
                               optional={"model": st.sampled_from(["appliance", "v1", "nope", "", "../base"])}) \
    .flatmap(lambda base: st.dictionaries(FIELDS, VALUES, max_size=4).map(lambda extra: {**base, **extra}))
RAW = st.one_of(st.binary(max_size=200), st.just(b"\xff\xfe{\"messages\": 1}"), st.just(b'{"messages": [}'),
                st.just(b"[" * 5000), st.just(b"null"))


def check_answer(reply: httpx.Response) -> None:
    assert reply.status_code == 200 or 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    if reply.status_code != 200:
        assert reply.json()["error"]["message"]


@pytest.mark.slow
@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=BODIES, chat=st.booleans())
def test_fuzzed_bodies_get_200_or_a_clear_4xx(served, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not chat and "prompt" not in body:
        body = {**body, "prompt": str(body.get("messages"))[:50]}
    check_answer(httpx.post(served["server"].url + path, json=body, headers=auth(served), timeout=120))


@pytest.mark.slow
@hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=RAW)
def test_fuzzed_raw_bytes_get_a_clear_400(served, raw):
    reply = httpx.post(served["server"].url + "/v1/chat/completions", content=raw, timeout=60,
                       headers={**auth(served), "Content-Type": "application/json"})
    assert 400 <= reply.status_code < 500 and reply.json()["error"]["message"]


@pytest.mark.slow
def test_huge_and_hostile_requests_leave_the_server_up(served):
    url, good = served["server"].url, auth(served)
    huge = httpx.post(url + "/v1/completions", headers=good, timeout=60,
                      json={"prompt": "x" * 3_000_000, "max_tokens": 4})
    assert huge.status_code == 413
    for extra in ({"max_tokens": -1}, {"max_tokens": 10**12}, {"n": 5}, {"top_k": -3}, {"top_k": 10**9}):
        check_answer(httpx.post(url + "/v1/chat/completions", headers=good, timeout=60,
                                json={"messages": [{"role": "user", "content": "x"}], **extra}))
    reply = served["client"].chat.completions.create(model="appliance", max_tokens=2,
                                                     messages=[{"role": "user", "content": "still there?"}])
    assert reply.choices[0].message is not None
