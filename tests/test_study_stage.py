"""The study stage in the pipeline: documents' text kept at ingest, study material cached per
document, trained with the snapshot, held out for the gate's closed-book recall, forgotten with
the document."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE
from test_daemon import daemon_settings, make_template

from appliance.contract.errors import TrainError
from appliance.contract.events import Message, Progress
from appliance.data.ingest import ingest
from appliance.data.ingest.kept import join_chunks
from appliance.data.snapshot import cut, cut_id, records
from appliance.data.snapshot import load as load_snapshot
from appliance.data.study.stage import study
from appliance.engine.forget import forget
from appliance.engine.pipeline import Context, run_job
from appliance.home.config import dump, load
from appliance.home.fsutil import read_json, sha256_file, write_json_atomic
from appliance.home.journal import Journal
from appliance.home.paths import Home

HANDBOOK = REPO / "examples" / "handbook"
TABLE = "| Ward | Beds | Staff |\n|---|---|---|\n| 4A | 22 | 31 |\n| 4B | 18 | 27 |\n| 5C | 30 | 44 |\n"


def documents_home(home: Home) -> dict[str, str]:
    """The handbook and a table of numbers in the inbox, ingested; their sha256 by name."""
    shutil.copy(HANDBOOK / "handbook.md", home.inbox / "handbook.md")
    (home.inbox / "wards.md").write_text(TABLE)
    shas = {name: sha256_file(home.inbox / name) for name in ("handbook.md", "wards.md")}
    ingest(home)
    return shas


@pytest.fixture()
def studied(tiny_home: Home) -> dict:
    shas = documents_home(tiny_home)
    settings = load(tiny_home.config)
    return {
        "home": tiny_home,
        "shas": shas,
        "settings": settings,
        "snapshot": cut(tiny_home, settings.data.val_fraction),
    }


def test_ingest_keeps_each_documents_text(studied: dict):
    home, shas = studied["home"], studied["shas"]
    kept = home.document_text(shas["handbook.md"]).read_text(encoding="utf-8")
    assert "Ridgeline Community Hospital" in kept and kept.startswith("#")
    assert home.document_text(shas["wards.md"]).read_text(encoding="utf-8").strip() == TABLE.strip()
    assert not any(home.texts.glob(".*"))  # no temporary file left behind


def test_study_once_then_from_the_cache(studied: dict):
    home, shas, settings, snap = studied["home"], studied["shas"], studied["settings"], studied["snapshot"]
    events: list = []
    first = study(home, snap, settings, events.append)
    assert first.generated == 2
    counts = first.counts()
    assert counts["statements"] > 40 and counts["conversations"] > counts["statements"]
    assert counts["paraphrases"] > 0 and counts["heldout"] > 0 and counts["documents_studied"] == 1
    caches = {sha: home.study_cache(sha) for sha in shas.values()}
    stamps = {sha: path.stat().st_mtime_ns for sha, path in caches.items()}
    again = study(home, snap, settings)
    assert again.generated == 0  # read, not written again
    assert {sha: path.stat().st_mtime_ns for sha, path in caches.items()} == stamps
    assert [r.hash for r in again.records()] == [r.hash for r in first.records()]
    # every training record names the document it came from
    assert {sha for sha, _ in first.items()} == {shas["handbook.md"]}
    # a changed setting that shapes the material writes it again
    settings.study.seed = 1
    assert study(home, snap, settings).generated == 2


def test_a_table_of_numbers_is_reported_and_trains_nothing_extra(studied: dict):
    home, shas = studied["home"], studied["shas"]
    events: list = []
    material = study(home, studied["snapshot"], studied["settings"], events.append)
    said = [e.text for e in events if isinstance(e, Message)]
    assert len([t for t in said if "wards.md" in t]) == 1
    assert any("wards.md" in t and "no statements found" in t for t in said), said
    table = next(d for d in material.documents if d.sha256 == shas["wards.md"])
    assert not table.conversations and not table.paraphrases and not table.heldout
    assert shas["wards.md"] not in {sha for sha, _ in material.items()}


def test_a_killed_study_resumes_without_duplicates(studied: dict):
    home, settings, snap = studied["home"], studied["settings"], studied["snapshot"]

    class Killed(Exception):
        pass

    def kill_after_first(event: object) -> None:
        if isinstance(event, Progress) and event.completed == 1:
            raise Killed()

    with pytest.raises(Killed):
        study(home, snap, settings, kill_after_first)
    assert len(list(home.study.glob("*.json"))) == 1  # the first document's material, whole
    resumed = study(home, snap, settings)
    assert resumed.generated == 1
    hashes = [r.hash for r in resumed.records()]
    shutil.rmtree(home.study)
    fresh = study(home, snap, settings)
    assert hashes == [r.hash for r in fresh.records()]  # the same material, nothing written twice
    assert resumed.counts() == fresh.counts()


def test_held_out_questions_are_never_trained(studied: dict):
    from appliance.training.examples import study_records

    home, settings, snap = studied["home"], studied["settings"], studied["snapshot"]
    run = home.run("run-check")
    run.root.mkdir(parents=True)
    own = records(home, load_snapshot(home, snap.id).train)
    trained, counts = study_records(home, snap, own, settings, run, lambda e: None)
    held = read_json(run.heldout)["documents"]
    questions = [q["question"] for doc in held.values() for q in doc["questions"]]
    assert questions and counts["heldout"] == len(questions)
    texts = " ".join(m["content"] for r in trained if r.kind == "chat" for m in r.body["messages"])
    assert not [q for q in questions if q in texts]
    # negative control: a held-out question slipped into the cached training material fails the run
    handbook = studied["shas"]["handbook.md"]
    cache = read_json(home.study_cache(handbook))
    cache["conversations"][0]["messages"][0]["content"] = cache["heldout"][0]["question"]
    write_json_atomic(home.study_cache(handbook), cache)
    with pytest.raises(TrainError, match="held-out"):
        study_records(home, snap, [], settings, run, lambda e: None)


def test_chunks_of_an_old_home_join_without_their_overlap():
    text = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    assert join_chunks([text[:50], text[30:]]) == text
    assert join_chunks(["First part.", "Second part."]) == "First part.\n\nSecond part."


def test_a_document_without_kept_text_is_studied_from_its_chunks(studied: dict):
    home, shas, settings = studied["home"], studied["shas"], studied["settings"]
    home.document_text(shas["handbook.md"]).unlink()  # as a home ingested before the text was kept
    material = study(home, studied["snapshot"], settings)
    doc = next(d for d in material.documents if d.sha256 == shas["handbook.md"])
    assert doc.source == "chunks" and len(doc.statements) > 40


def test_forget_removes_the_text_and_the_study_material(studied: dict):
    home, shas, settings = studied["home"], studied["shas"], studied["settings"]
    study(home, studied["snapshot"], settings)
    sha = shas["handbook.md"]
    report = forget(home, "handbook.md")
    assert report["study_files_removed"] == 2
    assert not home.document_text(sha).exists() and not home.study_cache(sha).exists()
    after = study(home, cut_id(home, settings.data.val_fraction), settings)
    assert sha not in {doc.sha256 for doc in after.documents} and not after.records()


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict:
    """One job through every stage on the tiny model: the handbook, a table and the clinic conversations."""
    settings = daemon_settings()
    settings.gate.recall_questions = 12
    home = make_template(tmp_path_factory.mktemp("study") / "home", tiny_base, settings)
    home.config.write_text(dump(settings))
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    shas = documents_home(home)
    with Journal(home.jobs_db) as journal:
        job, _ = journal.enqueue("train", reason="test")
        job = run_job(Context(home, journal, load(home.config)), journal.next_job())
        stages = [(t["stage"], t["state"]) for t in journal.transitions(job.id)]
    return {"home": home, "job": job, "shas": shas, "stages": stages}


def test_the_pipeline_studies_trains_and_measures_recall(pipeline_run: dict):
    home, job, shas = pipeline_run["home"], pipeline_run["job"], pipeline_run["shas"]
    assert job.state in ("done", "refused"), job.error
    done = [stage for stage, state in pipeline_run["stages"] if state == "complete"]
    assert done[:3] == ["snapshot", "study", "train"]
    run = home.run(job.run_id)
    info = read_json(run.train_json)
    study_counts = info["study"]
    assert study_counts["documents"] == 2 and study_counts["documents_studied"] == 1
    assert study_counts["conversations"] > 0 and study_counts["heldout"] > 0
    assert info["train_examples"] > study_counts["conversations"]  # the snapshot's own records too
    report = read_json(run.eval)
    recall = report["recall"]
    assert recall["questions"] == 12
    handbook = recall["documents"][shas["handbook.md"]]
    assert handbook["path"] == "handbook.md" and handbook["facts"] > 40 and handbook["questions"] == 12
    for side in ("candidate", "current"):
        assert 0.0 <= recall[side] <= 1.0 and 0 <= recall[f"{side}_correct"] <= 12
        assert handbook[side] == recall[side]
    assert recall["documents"][shas["wards.md"]]["questions"] == 0
    checks = {c["name"]: c for c in report["checks"]}
    assert "recall_kept" in checks
    gain = checks["recall_gain"]  # the handbook is new to the base: the candidate must know more of it
    assert gain["value"]["questions"] == 12 and gain["passed"] == (
        gain["value"]["candidate"] > gain["value"]["current"]
    )
    assert gain["detail"]


def test_sources_and_status_say_what_the_model_knows(pipeline_run: dict):
    from appliance.engine.local import LocalEngine

    home, job, shas = pipeline_run["home"], pipeline_run["job"], pipeline_run["shas"]
    engine = LocalEngine(home.root)
    docs = {d.path: d for d in engine.sources()}
    handbook = docs["handbook.md"]
    cache = read_json(home.study_cache(shas["handbook.md"]))
    assert handbook.facts == len(cache["statements"]) > 40
    assert handbook.questions == len(cache["conversations"]) > handbook.facts
    assert docs["wards.md"].facts == 0 and not docs["wards.md"].unknown  # no facts: nothing to flag
    assert docs["policies.jsonl"].facts is None  # conversations are not studied
    if job.state == "done":  # promoted: its gate's recall is the served model's
        assert (
            handbook.recall == read_json(home.run(job.run_id).eval)["recall"]["documents"][handbook.sha256]["candidate"]
        )
    else:
        assert handbook.recall is None and handbook.unknown
    status = engine.status()
    assert {k["path"] for k in status.knowledge} == {"handbook.md", "wards.md"}
    assert next(k for k in status.knowledge if k["path"] == "handbook.md")["facts"] == handbook.facts
