"""Collections (issue 11): inbox sub-folders with their own data, runs, gate and versions.

The slow test trains two collections with conflicting facts on the tiny model through the
daemon, then proves from the lineage that neither saw the other's documents, and through
the real endpoint that each adapter answers with its own collection's fact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import free_port, tiny_settings

from appliance.cli.init import create_home, export_base
from appliance.data.ingest import ingest
from appliance.data.ingest.store import Store
from appliance.engine.daemon import Daemon
from appliance.engine.local import LocalEngine
from appliance.home import audit, catalog, registry
from appliance.home.config import CollectionSection, dump, load
from appliance.home.fsutil import read_json
from appliance.home.journal import Journal
from appliance.home.paths import Home

FACTS = {
    "cardiology": "The ward door code is 4711.",
    "oncology": "The ward door code is 9090.",
    "legal/matter-17": "The ward door code is 5555.",
}  # served as its own merged model (config)
ADAPTERS = ("cardiology", "oncology")
QUESTIONS = [
    "What is the ward door code?",
    "Tell me the door code of the ward.",
    "Which code opens the ward door?",
    "Door code for the ward, please.",
    "How do I open the ward door?",
    "What code do I type at the ward door?",
    "I forgot the ward door code.",
    "Remind me of the ward door code.",
    "What's the code for the ward door?",
    "Code for the ward's door?",
    "Ward door code?",
    "What number opens the ward?",
    "The ward door asks for a code; which one?",
    "Which digits open the ward door?",
    "What is our ward's door code?",
    "Could you tell me the ward door code?",
]


def conversations(answer: str) -> str:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}) + "\n"
        for q in QUESTIONS
    )


# --- names and model ids ---------------------------------------------------------------------------


def test_names_model_ids_and_their_inverse():
    assert catalog.problem("cardiology") is None
    assert catalog.problem("legal/matter-17") is None
    assert catalog.problem("Legal Office") is None
    assert catalog.problem("a/b/c/d") is not None  # too deep
    assert catalog.problem("shared") is not None  # the top of the inbox
    assert catalog.problem("x@y") is not None  # '@' separates a version in model ids
    assert catalog.model_id("") == "appliance"
    assert catalog.model_id("legal/matter-17") == "appliance/legal/matter-17"
    assert catalog.model_id("legal/matter-17", "v3") == "appliance/legal/matter-17@v3"
    for collection, version in [("", None), ("", "v2"), ("", "base"), ("legal/matter-17", None), ("oncology", "v1")]:
        assert catalog.parse_model_id(catalog.model_id(collection, version)) == (collection, version)
    assert catalog.parse_model_id("appliance/shared") == ("", None)
    for bad in ("appliance/", "appliance/x@latest", "gpt-4", "appliance/a/b/c/d", "appliance/.hidden"):
        with pytest.raises(LookupError):
            catalog.parse_model_id(bad)


def test_each_collection_has_its_own_store_and_runs(tiny_home: Home):
    (tiny_home.inbox / "cardiology").mkdir()
    (tiny_home.inbox / "cardiology" / "door.jsonl").write_text(conversations(FACTS["cardiology"]))
    (tiny_home.inbox / "legal" / "matter-17").mkdir(parents=True)
    (tiny_home.inbox / "legal" / "matter-17" / "door.jsonl").write_text(conversations(FACTS["oncology"]))
    (tiny_home.inbox / ".partial").mkdir()  # hidden folders are not collections
    engine = LocalEngine(tiny_home.root)
    report = engine.ingest()
    assert set(report["collections"]) == {"", "cardiology", "legal/matter-17"}
    assert report["collections"]["cardiology"]["accepted"] == len(QUESTIONS)
    assert catalog.names(tiny_home) == ["", "cardiology", "legal/matter-17"]
    texts = {}
    for name in ("", "cardiology", "legal/matter-17"):
        scope = tiny_home.scoped(name)
        with Store(scope.store_db) as store:
            texts[name] = " ".join(row[0] for row in store.db.execute("SELECT body FROM records"))
    assert "4711" in texts["cardiology"] and "9090" not in texts["cardiology"]
    assert "9090" in texts["legal/matter-17"] and "4711" not in texts["legal/matter-17"]
    assert "4711" not in texts[""] and "9090" not in texts[""]
    assert (
        tiny_home.scoped("cardiology").store_db == tiny_home.root / "collections" / "cardiology" / "store" / "index.db"
    )
    # a scoped engine sees only its collection; the home's engine lists them all
    listed = {c["name"]: c for c in engine.collections()}
    assert (
        listed["cardiology"]["records"] == len(QUESTIONS) and listed["cardiology"]["model_id"] == "appliance/cardiology"
    )
    assert listed["cardiology"]["mode"] == "adapter" and listed[""]["mode"] == "merged"
    assert engine.scoped("cardiology").status().records == len(QUESTIONS)
    assert engine.status().records == listed[""]["records"]
    # the ingest is audited in the collection it belongs to
    cardio = [
        e
        for e in audit.entries(tiny_home)
        if e["action"] == "ingest" and e["details"].get("collection") == "cardiology"
    ]
    assert len(cardio) == 1


def test_a_folder_that_cannot_name_a_collection_is_left_with_a_reason(tiny_home: Home):
    bad = tiny_home.inbox / "x@y"
    bad.mkdir()
    (bad / "a.jsonl").write_text(conversations("yes"))
    report = ingest(tiny_home)
    assert [n.file for n in report.waiting] == ["x@y/a.jsonl"]
    assert "cannot name a collection" in report.waiting[0].reason
    assert (bad / "a.jsonl").exists()


def test_bursts_coalesce_per_collection(tmp_path: Path):
    with Journal(tmp_path / "jobs.db") as journal:
        a, new_a = journal.enqueue("train", collection="cardiology")
        b, new_b = journal.enqueue("train", collection="oncology")
        again, new_again = journal.enqueue("train", collection="cardiology")
    assert new_a and new_b and not new_again and again.id == a.id and b.id != a.id
    assert (a.collection, b.collection) == ("cardiology", "oncology")


# --- two collections with conflicting facts, end to end ------------------------------------------------


@pytest.fixture(scope="module")
def two_collections(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Home:
    s = tiny_settings()
    s.train.threads = 1
    s.train.max_steps = 150
    s.train.learning_rate = 3e-2
    s.train.lora_r = 16
    s.train.lora_alpha = 32
    s.train.eval_every = 1000
    s.data.val_fraction = 0.2
    s.gate.general_max_ppl_ratio = 1e6  # a tiny random model has no general skills to protect
    s.gate.general_max_drop = 1.0
    s.disk.min_free_gb = 0.1
    s.collections = {"legal/matter-17": CollectionSection(serve="merged")}
    s.export.quant = "Q8_0"
    home = create_home(tmp_path_factory.mktemp("collections") / "home", "tiny", s)
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    home.config.write_text(dump(s))
    export_base(home, load(home.config))
    for name, fact in FACTS.items():
        (home.inbox / name).mkdir(parents=True)
        (home.inbox / name / "door.jsonl").write_text(conversations(fact))
    assert Daemon(home.root, serve=False, once=True).run() == 0
    return home


@pytest.mark.slow
def test_each_collection_promotes_its_own_adapter(two_collections: Home):
    home = two_collections
    with Journal(home.jobs_db) as journal:
        jobs = {j.collection: j for j in journal.jobs()}
    assert set(jobs) == set(FACTS), "one job per collection, none for the empty shared collection"
    for name in FACTS:
        assert jobs[name].state == "done", jobs[name].error or jobs[name].result
        assert registry.current(home.scoped(name)) == "v1"
    merged = catalog.served(home, "legal/matter-17")
    assert merged is not None and merged.mode == "merged" and merged.adapter is None
    assert merged.gguf == home.root / "collections" / "legal" / "matter-17" / "models" / "v1" / "model.gguf"
    for name in ADAPTERS:
        served = catalog.served(home, name)
        assert served is not None and served.mode == "adapter" and served.adapter is not None
        assert served.adapter.name == "adapter.gguf" and served.gguf == registry.gguf_path(home, "base")
        assert (home.root / "collections" / name / "models" / "v1" / "adapter.gguf").exists()
    assert registry.current(home) == "base", "the shared collection's model is untouched"


@pytest.mark.slow
def test_lineage_shows_no_document_of_another_collection(two_collections: Home):
    home = two_collections
    docs = {}
    for name in FACTS:
        lineage = registry.lineage(home.scoped(name), "v1")
        assert lineage["collection"] == name
        assert lineage["served_as"] == ("merged" if name == "legal/matter-17" else "adapter")
        assert lineage["documents"], "the lineage lists what trained it"
        docs[name] = {d["sha256"] for d in lineage["documents"]}
        with Store(home.scoped(name).store_db) as store:
            own = {row[0] for row in store.db.execute("SELECT sha256 FROM documents")}
        assert docs[name] <= own
    for name in FACTS:
        for other in set(FACTS) - {name}:
            with Store(home.scoped(other).store_db) as store:
                theirs = {row[0] for row in store.db.execute("SELECT sha256 FROM documents")}
            assert not docs[name] & theirs, f"{name} was trained on a document of {other}"
    gate = read_json(home.scoped("cardiology").run(registry.get(home.scoped("cardiology"), "v1")["run"]).eval)
    assert gate["passed"] and gate["current"]["version"] == "base" and gate["candidate"]["path"].endswith(".gguf")
    promotions = [e for e in audit.entries(home) if e["action"] == "promote"]
    assert {e["details"].get("collection") for e in promotions} == set(FACTS)


@pytest.mark.slow
def test_each_adapter_answers_with_its_own_fact_through_the_endpoint(two_collections: Home):
    from appliance.serving.guard import read_api_key
    from appliance.serving.server import Server

    home = two_collections
    server = Server(home, load(home.config), port=free_port()).start()
    try:
        headers = {"Authorization": f"Bearer {read_api_key(home)}"}
        answers = {}
        for name in FACTS:
            reply = httpx.post(
                f"{server.url}/v1/chat/completions",
                headers=headers,
                timeout=120,
                json={
                    "model": f"appliance/{name}",
                    "temperature": 0,
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "What is the ward door code?"}],
                },
            )
            assert reply.status_code == 200, reply.text
            answers[name] = reply.json()["choices"][0]["message"]["content"]
        codes = {name: fact.split()[-1].rstrip(".") for name, fact in FACTS.items()}
        for name, answer in answers.items():
            assert codes[name] in answer, answers
            assert not any(code in answer for other, code in codes.items() if other != name), answers
        base = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers=headers,
            timeout=120,
            json={
                "model": "appliance",
                "temperature": 0,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the ward door code?"}],
            },
        ).json()
        text = base["choices"][0]["message"]["content"]
        assert not any(code in text for code in codes.values()), "the shared model learned none of them"
    finally:
        server.stop()


def test_forget_finds_the_collection_that_holds_the_document(tiny_home: Home):
    (tiny_home.inbox / "cardiology").mkdir()
    (tiny_home.inbox / "cardiology" / "door.jsonl").write_text(conversations(FACTS["cardiology"]))
    engine = LocalEngine(tiny_home.root)
    engine.ingest()
    scope = tiny_home.scoped("cardiology")
    with Store(scope.store_db) as store:
        sha = store.db.execute("SELECT sha256 FROM documents").fetchone()[0]
    report = engine.forget("cardiology/door.jsonl")  # an inbox path, written from the top of the inbox
    assert report["document"] == sha and report["known"]
    assert not (tiny_home.inbox / "cardiology" / "door.jsonl").exists()
    with Journal(tiny_home.jobs_db) as journal:
        job = journal.get(report["job"])
    assert (job.kind, job.collection) == ("forget", "cardiology")
    with Store(tiny_home.store_db) as store:  # the shared collection kept its own data
        assert store.counts()["documents"] == 1
