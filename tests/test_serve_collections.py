"""Collections on one endpoint, against the real server: every collection's LoRA adapter
served on the one loaded base through native llama-server, model ids ``appliance/<c>``,
per-key access (a collection the key may not see is a model that does not exist), the
key-use audit, and an adapter promotion while requests run.

The adapters are random LoRAs (every linear layer, A and B random) on the tiny Llama,
converted with the appliance's own converter, so each collection's greedy answer
differs from the base's and from the other collection's; llama.cpp in a child process
(llama-cpp-python with ``lora_path``) says what each answer must be.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port, tiny_settings

from appliance.cli.init import create_home
from appliance.export.convert import convert, convert_lora
from appliance.home import audit, registry
from appliance.home.config import load
from appliance.home.fsutil import sha256_file
from appliance.home.keys import KeyStore
from appliance.home.paths import Home
from appliance.runtime import llamacpp_child
from appliance.runtime.hf import load_tokenizer
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server

CARDIO, LEGAL = "cardiology", "legal/matter-17"
PROMPT = "Visitors sign in at the front desk"
TOKENS = 8
CANARY = "zebra-canary-5183"
MARGIN = 0.05  # logits: closer than this, two tokens are a tie as far as this test is concerned


def random_lora(base: Path, seed: int, out: Path) -> Path:
    """A GGUF LoRA with random A and B on every linear layer (a fresh LoRA's B is zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from appliance.runtime.hf import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(
        load_causal_lm(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    model.save_pretrained(out / "peft")
    return convert_lora(base, out / "peft", out / "adapter.gguf")


def add_adapter(home: Home, collection: str, version: str, adapter: Path) -> None:
    """An adapter version as the registry records one (collections/<c>/models/vN/adapter.gguf)."""
    scope = home.scoped(collection)
    scope.inbox.mkdir(parents=True, exist_ok=True)
    registry.add(
        scope,
        version,
        adapter,
        {
            "kind": "adapter",
            "base_version": "base",
            "collection": collection,
            "base_sha256": registry.get(home, "base")["sha256"],
        },
        name=registry.ADAPTER_FILE,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    root = tmp_path_factory.mktemp("collections")
    home = create_home(root / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    settings = load(home.config)
    settings.serve.audit_flush_seconds = 0.5
    # the base version as a plain f16 GGUF (export's quantization and parity checks are
    # tested elsewhere; here they would only cost time)
    registry.add(home, "base", convert(tiny_base, root / "base.gguf"), {"quant": "F16"})
    registry.promote(home, "base")
    adapters = {name: random_lora(tiny_base, seed, root / name) for name, seed in (("cardio-1", 1), ("legal-1", 2))}
    add_adapter(home, CARDIO, "v1", adapters["cardio-1"])
    add_adapter(home, LEGAL, "v1", adapters["legal-1"])
    for collection in (CARDIO, LEGAL):
        registry.promote(home.scoped(collection), "v1")
    keys = KeyStore(home)
    secrets = {
        "cardio": keys.add("cardio-desk", "chat", [CARDIO]),
        "legal": keys.add("legal-desk", "chat", [LEGAL]),
        "admin": read_api_key(home),
    }
    server = Server(home, settings, port=free_port()).start()
    yield {
        "home": home,
        "server": server,
        "secrets": secrets,
        "adapters": adapters,
        "tokenizer": tiny_base,
        "root": root,
        "clients": {
            who: openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=120)
            for who, secret in secrets.items()
        },
    }
    backends = server.pool.backends()
    server.stop()
    assert all(b.proc is None or b.proc.poll() is not None for b in backends), "a llama-server outlived stop()"


def expected(served, adapter: Path | None) -> str:
    """The start of the greedy continuation llama.cpp gives with this adapter (scale 1), in a
    child process: the tokens it picks by a clear margin (random adapters leave near-ties,
    which the server's own arithmetic order may break the other way)."""
    import numpy as np

    base = registry.gguf_path(served["home"], "base")
    if "prompt_ids" not in served:
        served["prompt_ids"] = llamacpp_child.run(base, tokenize=[PROMPT]).tokens[0]
    ids = served["prompt_ids"]
    generated = llamacpp_child.run(base, generate=[(ids, TOKENS)], lora=adapter).generated[0]
    result = llamacpp_child.run(base, logits=[ids + generated], lora=adapter)
    assert result.ok, result.error
    sure: list[int] = []
    for i, token in enumerate(generated):
        second, first = np.sort(result.logits[0][len(ids) - 1 + i])[-2:]
        if first - second < MARGIN:
            break
        sure.append(token)
    assert len(sure) >= 2, "the reference has no clear answer to compare with"
    return load_tokenizer(served["tokenizer"]).decode(
        sure, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def complete(client: openai.OpenAI, model: str) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)


def test_each_collection_answers_with_its_own_adapter(served):
    admin = served["clients"]["admin"]
    answers = {model: complete(admin, model) for model in ("appliance", f"appliance/{CARDIO}", f"appliance/{LEGAL}")}
    assert answers[f"appliance/{CARDIO}"].model == f"appliance/{CARDIO}@v1"
    assert answers[f"appliance/{LEGAL}"].model == f"appliance/{LEGAL}@v1"
    assert answers["appliance"].model == "base"
    texts = {model: a.choices[0].text for model, a in answers.items()}
    starts = {
        "appliance": expected(served, None),
        f"appliance/{CARDIO}": expected(served, served["adapters"]["cardio-1"]),
        f"appliance/{LEGAL}": expected(served, served["adapters"]["legal-1"]),
    }
    for model, text in texts.items():  # each answers as llama.cpp does with its own adapter, and no other
        assert [m for m, start in starts.items() if text.startswith(start)] == [model], (texts, starts)
    # one llama-server holds both adapters: switching between them loads nothing
    hosts = [b for b in served["server"].pool.backends() if b.loras]
    assert len(hosts) == 1 and len(hosts[0].loras) == 2
    assert "--lora-init-without-apply" in hosts[0].command()
    # alternating requests (every one switches adapter) keep their own answers, streamed or not
    for model in (f"appliance/{CARDIO}", f"appliance/{LEGAL}") * 2:
        chunks = list(
            admin.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True)
        )
        assert {c.model for c in chunks} == {model + "@v1"}
        assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(starts[model])


def test_alternating_collections_keep_their_prompt_caches(served):
    """Each adapter's requests go to a slot that last ran it, so switching collections does not
    make llama.cpp drop and recompute the prompt (it clears a slot's cache on an adapter change)."""

    def prompt_tokens(model: str) -> int:
        reply = httpx.post(
            served["server"].url + "/v1/completions",
            timeout=120,
            headers={"Authorization": f"Bearer {served['secrets']['admin']}"},
            json={"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0},
        )
        return reply.json()["timings"]["prompt_n"]  # prompt tokens evaluated, not taken from the cache

    models = [f"appliance/{CARDIO}", f"appliance/{LEGAL}"]
    for model in models:
        prompt_tokens(model)
    assert [prompt_tokens(m) for m in models * 2] == [1] * 4


def test_a_clients_own_lora_field_is_not_passed_on(served):
    """llama-server would apply any adapter a request names; the front refuses the field, saying
    why, and the collection's own adapter answers the same request without it."""
    body = {"model": f"appliance/{CARDIO}", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    headers = {"Authorization": f"Bearer {served['secrets']['cardio']}"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        extra = (
            {}
            if path.endswith("/completions") and "chat" not in path
            else {"messages": [{"role": "user", "content": PROMPT}]}
        )
        reply = httpx.post(
            served["server"].url + path,
            timeout=120,
            headers=headers,
            json={**body, **extra, "lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]},
        )
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "lora"
        assert "other collections' adapters" in reply.json()["error"]["message"]
    reply = httpx.post(served["server"].url + "/v1/completions", timeout=120, headers=headers, json=body)
    assert (
        reply.json()["choices"][0]["text"]
        == complete(served["clients"]["admin"], f"appliance/{CARDIO}").choices[0].text
    )


def test_a_key_sees_only_its_collections(served):
    url, cardio = served["server"].url, served["secrets"]["cardio"]
    ids = {m.id for m in served["clients"]["cardio"].models.list()}
    assert ids == {f"appliance/{CARDIO}", f"appliance/{CARDIO}@v1"}
    every = {m.id for m in served["clients"]["admin"].models.list()}
    assert {"appliance", "base", f"appliance/{LEGAL}", f"appliance/{LEGAL}@v1"} <= every

    def ask(model: str, secret: str = cardio) -> httpx.Response:
        return httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {secret}"},
            timeout=120,
            json={"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
        )

    def without_id(reply: httpx.Response, model: str) -> tuple[int, str, dict]:
        headers = {k: v for k, v in reply.headers.items() if k not in ("date", "content-length")}
        return reply.status_code, reply.text.replace(model, "<id>"), headers

    unknown = without_id(ask("appliance/oncology"), "appliance/oncology")
    assert unknown[0] == 404
    for hidden in (f"appliance/{LEGAL}", f"appliance/{LEGAL}@v1", "appliance", "base"):
        assert without_id(ask(hidden), hidden) == unknown  # never a hint that it exists
    assert ask(f"appliance/{CARDIO}").status_code == 200
    assert ask(f"appliance/{LEGAL}", served["secrets"]["legal"]).status_code == 200


def test_a_revoked_key_is_refused_on_its_next_request(served):
    store = KeyStore(served["home"])
    secret = store.add("temp-desk", "chat", [CARDIO])
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=secret, max_retries=0, timeout=120)
    assert complete(client, f"appliance/{CARDIO}").model == f"appliance/{CARDIO}@v1"
    store.revoke("temp-desk")
    with pytest.raises(openai.AuthenticationError):
        complete(client, f"appliance/{CARDIO}")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_key_use_is_audited_with_counts_and_no_text(served):
    home = served["home"]
    secret = KeyStore(home).add("audit-desk", "chat", [LEGAL])  # its own key: only these requests count
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=secret, max_retries=0, timeout=120)
    before = time.time()
    for stream in (False, True, False):
        reply = client.chat.completions.create(
            model=f"appliance/{LEGAL}",
            max_tokens=4,
            stream=stream,
            messages=[{"role": "user", "content": f"Say {CANARY}"}],
        )
        if stream:
            list(reply)
    deadline = time.monotonic() + 15

    def uses() -> list[dict]:
        return [
            e["details"]
            for e in audit.entries(home)
            if e["action"] == "key_use" and e["details"]["key"] == "audit-desk"
        ]

    while sum(u["requests"] for u in uses()) < 3:
        assert time.monotonic() < deadline, uses()
        time.sleep(0.2)
    entries = uses()
    assert {u["model"] for u in entries} == {f"appliance/{LEGAL}@v1"}
    assert sum(u["requests"] for u in entries) == 3
    assert all(before <= u["first"] <= u["last"] <= time.time() for u in entries)
    assert sum(u["completion_tokens"] for u in entries) >= 3 and sum(u["prompt_tokens"] for u in entries) > 0
    assert CANARY not in home.audit_log.read_text()
    assert audit.verify(home).ok


@pytest.mark.slow
def test_promoting_an_adapter_switches_without_failing_requests(served):
    """Clients keep asking both collections while cardiology gets a new adapter: no request
    fails, cardiology's answers move to v2, legal's never change, and the old host is stopped."""
    home, client = served["home"], served["clients"]["admin"]
    pool = served["server"].pool
    old_host = next(b for b in pool.backends() if b.loras)
    legal_text = complete(client, f"appliance/{LEGAL}").choices[0].text
    served["adapters"]["cardio-2"] = random_lora(served["tokenizer"], 3, served["root"] / "cardio-2")
    add_adapter(home, CARDIO, "v2", served["adapters"]["cardio-2"])
    answers: list[tuple[str, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def hammer(model: str, stream: bool) -> None:
        while not stop.is_set():
            try:
                if stream:
                    chunks = list(
                        client.completions.create(
                            model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
                        )
                    )
                    answers.append(
                        ({c.model for c in chunks}.pop(), "".join(c.choices[0].text for c in chunks if c.choices))
                    )
                else:
                    reply = complete(client, model)
                    answers.append((reply.model, reply.choices[0].text))
            except Exception as exc:  # noqa: BLE001  (every failure is collected and fails the test)
                errors.append(repr(exc))

    threads = [
        threading.Thread(target=hammer, args=(m, s))
        for m in (f"appliance/{CARDIO}", f"appliance/{LEGAL}")
        for s in (False, True)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        registry.promote(home.scoped(CARDIO), "v2")
        deadline = time.monotonic() + 120
        while not any(m == f"appliance/{CARDIO}@v2" for m, _ in answers):
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    assert {m for m, _ in answers} == {f"appliance/{CARDIO}@v1", f"appliance/{CARDIO}@v2", f"appliance/{LEGAL}@v1"}
    assert {t for m, t in answers if m.startswith(f"appliance/{LEGAL}")} == {legal_text}
    start = expected(served, served["adapters"]["cardio-2"])
    assert all(t.startswith(start) for m, t in answers if m == f"appliance/{CARDIO}@v2")
    assert not any(t.startswith(start) for m, t in answers if m == f"appliance/{CARDIO}@v1")
    deadline = time.monotonic() + 15
    while old_host.alive():
        assert time.monotonic() < deadline, "the superseded adapter host is still running"
        time.sleep(0.1)
    assert sum(1 for b in pool.backends() if b.loras) == 1
    assert complete(client, f"appliance/{CARDIO}@v1").model == f"appliance/{CARDIO}@v1"  # still addressable


def test_an_adapter_whose_bytes_changed_is_not_served(served):
    """R3 for adapters: the file must be the one registered, byte for byte."""
    home = served["home"]
    scope = home.scoped("oncology")
    add_adapter(home, "oncology", "v1", served["adapters"]["cardio-1"])
    registry.promote(scope, "v1")
    path = registry.gguf_path(scope, "v1")
    assert sha256_file(path) == registry.get(scope, "v1")["sha256"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.unlink()  # registry.add hard-linked it: write a new file, not through the link
    path.write_bytes(bytes(data))
    admin = served["clients"]["admin"]
    try:
        with pytest.raises(openai.APIStatusError, match="sha256"):
            complete(admin, "appliance/oncology")
        # the other collections are not held hostage by it: a host without it keeps serving them
        deadline = time.monotonic() + 60
        while not any(b.loras and b.alive() and path not in b.loras for b in served["server"].pool.backends()):
            assert time.monotonic() < deadline, "no adapter host without the bad adapter"
            time.sleep(0.2)
        assert complete(admin, f"appliance/{LEGAL}").model == f"appliance/{LEGAL}@v1"
    finally:
        shutil.rmtree(scope.model("v1").parent.parent)
        shutil.rmtree(scope.inbox)


def test_prepare_loads_the_next_adapter_host_before_the_promotion(served):
    """What the daemon may call before promoting: the host with the new adapter is loaded while
    the old one answers, and the promotion then switches to it without starting anything."""
    home, server, client = served["home"], served["server"], served["clients"]["admin"]
    add_adapter(home, LEGAL, "v2", served["adapters"]["cardio-1"])  # any other adapter will do
    server.prepare("v2", collection=LEGAL)
    prepared = [b for b in server.pool.backends() if registry.gguf_path(home.scoped(LEGAL), "v2") in b.loras]
    assert len(prepared) == 1 and prepared[0].alive()
    assert complete(client, f"appliance/{LEGAL}").model == f"appliance/{LEGAL}@v1"  # not promoted yet
    registry.promote(home.scoped(LEGAL), "v2")
    reply = complete(client, f"appliance/{LEGAL}")
    assert reply.model == f"appliance/{LEGAL}@v2"
    deadline = time.monotonic() + 10  # the watcher retires the old host on its next look
    while [b for b in server.pool.backends() if b.loras] != prepared:
        assert time.monotonic() < deadline, "the old adapter host was not retired"
        time.sleep(0.1)
