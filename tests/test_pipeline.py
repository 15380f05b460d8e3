"""A tiny random Llama with SmolLM2's tokenizer through every stage, served over real HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SAMPLE, free_port, tiny_settings

from appliance.cli.init import create_home, export_base
from appliance.engine.local import LocalEngine
from appliance.home import registry
from appliance.home.config import load
from appliance.home.fsutil import read_json
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    home = create_home(tmp_path_factory.mktemp("pipeline") / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    settings = load(home.config)
    export_base(home, settings)
    engine = LocalEngine(home.root)
    ingest = engine.ingest()
    run = engine.train()
    version = engine.export(run)
    engine.promote(version.version)
    server = Server(home, settings, port=free_port()).start()
    yield {
        "home": home,
        "engine": engine,
        "ingest": ingest,
        "run": run,
        "version": version,
        "server": server,
        "key": read_api_key(home),
    }
    server.stop()


def test_ingest_accepts_every_sample_conversation(served):
    lines = (SAMPLE / "policies.jsonl").read_text().splitlines()
    assert served["ingest"]["accepted"] == len(lines)
    assert served["ingest"]["quarantined"] == []


def test_training_wrote_an_adapter_and_a_curve(served):
    run = served["home"].run(served["run"])
    assert (run.adapter / "adapter_config.json").exists()
    info = read_json(run.root / "train.json")
    assert info["steps"] == 3 and len(info["curve"]) == 3
    assert all(point["loss"] > 0 for point in info["curve"])


def test_export_passed_parity_with_identical_tokenization(served):
    parity = read_json(served["home"].run(served["run"]).parity)
    checks = {c["name"]: c for c in parity["checks"]}
    assert parity["passed"] is True
    assert checks["tokenization"]["value"] == checks["tokenization"]["threshold"]  # every hard string identical
    assert checks["chat_template"]["passed"]
    assert checks["logits_cosine"]["value"] >= 0.9999


def test_version_registered_and_promoted(served):
    home, version = served["home"], served["version"].version
    assert registry.current(home) == version
    record = registry.get(home, version)
    assert record["run"] == served["run"] and record["quant"] == "Q4_K_M"
    assert registry.versions(home)[0]["version"] == "base"


def test_openai_client_chat_completion(served):
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=served["key"])
    reply = client.chat.completions.create(
        model="appliance",
        max_tokens=8,
        temperature=0,
        messages=[{"role": "user", "content": "Who is on call tonight?"}],
    )
    assert reply.model == served["version"].version
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens >= 1
    by_id = client.chat.completions.create(model="base", max_tokens=4, messages=[{"role": "user", "content": "Hello"}])
    assert by_id.model == "base"


def test_openai_client_streams(served):
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=served["key"])
    chunks = list(
        client.chat.completions.create(
            model="appliance", max_tokens=8, stream=True, temperature=0, messages=[{"role": "user", "content": "Hello"}]
        )
    )
    assert len(chunks) >= 2
    assert {c.model for c in chunks} == {served["version"].version}


def test_models_list_names_alias_and_versions(served):
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=served["key"])
    ids = {m.id for m in client.models.list()}
    assert ids == {"appliance", "base", served["version"].version}


def test_unknown_model_is_404_not_a_fallback(served):
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=served["key"])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])


def test_wrong_or_missing_key_is_refused(served):
    url = served["server"].url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # health needs no key


def test_foreign_host_and_origin_are_refused(served):
    url, key = served["server"].url, served["key"]
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(url + "/v1/models", headers={**auth, "Host": "evil.example"}).status_code == 403
    assert httpx.get(url + "/v1/models", headers={**auth, "Origin": "http://evil.example"}).status_code == 403
    ok = httpx.get(url + "/v1/models", headers=auth)
    assert ok.status_code == 200 and "access-control-allow-origin" not in ok.headers


def test_bad_requests_get_clear_4xx(served):
    url, auth = served["server"].url, {"Authorization": f"Bearer {served['key']}"}
    post = lambda body, **kw: httpx.post(url + "/v1/chat/completions", headers=auth, timeout=30, **body, **kw)  # noqa: E731
    assert post({"content": b"{not json"}).status_code == 400
    assert post({"json": {"messages": []}}).status_code == 400
    assert post({"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}}).status_code == 400
    assert post({"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}}).status_code == 400
    assert (
        post({"json": {"messages": [{"role": "user", "content": "x"}], "n": 5}}).status_code == 400
    )  # over serve.max_choices (4)
    assert httpx.get(url + "/health").json()["model"] == served["version"].version


def test_export_is_idempotent(served):
    again = served["engine"].export(served["run"])
    assert again.version == served["version"].version
    assert len(registry.versions(served["home"])) == 2


def test_rollback_then_promote_again(served):
    home = served["home"]
    engine: LocalEngine = served["engine"]
    assert engine.rollback() == "base"
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=served["key"])
    reply = client.chat.completions.create(
        model="appliance", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.model == "base"
    engine.promote(served["version"].version)
    assert registry.current(home) == served["version"].version
