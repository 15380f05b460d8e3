"""Human review before promotion, through the engine API on the tiny model.

The candidate is the base's own GGUF under a new run (parity passed): the automatic
gate passes it for real (llama.cpp child processes), so a job reaches review in
seconds without training. Votes then decide it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE
from test_daemon import copy_home, daemon_settings, make_template

from appliance.contract.errors import ApplianceError
from appliance.data.snapshot import cut_id
from appliance.engine.local import LocalEngine
from appliance.engine.pipeline import Context, run_job
from appliance.home import audit, registry
from appliance.home.config import dump, load
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.journal import Journal
from appliance.home.paths import Home

REPO = Path(__file__).resolve().parents[1]


def review_settings(approvals: int = 1):
    s = daemon_settings()
    s.gate.promotion = "review"
    s.gate.approvals = approvals
    s.gate.require_better_on_new = False  # the candidate is the current model's own file
    s.gate.review_questions = 3
    s.gate.review_tokens = 8
    s.gate.max_examples = 4
    s.gate.bootstrap_samples = 100
    return s


def set_config(home: Home, settings) -> None:
    home.config.write_text(dump(settings))


def job_at_gate(home: Home, run_id: str, parity_passed: bool = True) -> int:
    """A train job whose snapshot, train and export stages are complete: its run holds a
    copy of the current GGUF as the exported candidate."""
    snapshot = cut_id(home, load(home.config).data.val_fraction)
    run = home.run(run_id)
    run.gguf.mkdir(parents=True)
    shutil.copy(registry.gguf_path(home, "base"), run.gguf / "model-Q8_0.gguf")
    write_json_atomic(
        run.parity,
        {
            "gguf": "model-Q8_0.gguf",
            "quant": "Q8_0",
            "passed": parity_passed,
            "checks": [] if parity_passed else [{"name": "logit_cosine", "passed": False}],
        },
    )
    write_json_atomic(run.root / "train.json", {"run": run_id, "snapshot": snapshot, "steps": 1, "best_val_loss": None})
    with Journal(home.jobs_db) as journal:
        job, _ = journal.enqueue("train", reason="test")
        journal.next_job()
        journal.stage_complete(job.id, "snapshot", snapshot=snapshot)
        journal.stage_complete(job.id, "train", run_id=run_id)
        journal.stage_complete(job.id, "export")
    return job.id


def drive(home: Home, job_id: int):
    with Journal(home.jobs_db) as journal:
        return run_job(Context(home, journal, load(home.config)), journal.get(job_id))


@pytest.fixture(scope="module")
def waiting(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict:
    """A home whose candidate passed the gate and waits for review (built once, copied per test)."""
    home = make_template(tmp_path_factory.mktemp("review") / "home", tiny_base, review_settings())
    (home.inbox / "policies.jsonl").write_text((SAMPLE / "policies.jsonl").read_text())
    LocalEngine(home.root).ingest()
    job_id = job_at_gate(home, "run-cand")
    job = drive(home, job_id)
    return {"home": home, "job": job_id, "state": job.state}


@pytest.fixture()
def home(waiting: dict, tmp_path: Path) -> Home:
    return copy_home(waiting["home"], tmp_path / "home")


def test_a_gated_candidate_waits_registered_but_not_current(waiting: dict, home: Home):
    assert waiting["state"] == "awaiting_review"
    assert registry.current(home) == "base"
    versions = {v["version"]: v for v in registry.versions(home)}
    assert versions["v1"]["run"] == "run-cand"  # registered, not served
    reviews = LocalEngine(home.root).reviews()
    assert [r["run"] for r in reviews] == ["run-cand"]
    review = reviews[0]
    assert review["approvals"] == 0 and review["approvals_needed"] == 1 and not review["voted"]
    assert len(review["items"]) == 3 and all(i["question"] and "answer_a" in i for i in review["items"])
    flat = json.dumps(review)
    assert "reveal" not in review and "candidate" not in flat and "v1" not in flat  # versions hidden
    stored = read_json(home.run("run-cand").root / "review.json")
    assert {i["a"] for i in stored["items"]} <= {"candidate", "current"}
    assert audit.find(home, "review_opened", run="run-cand")
    # the waiting job is not the daemon's to run, and it does not hold up the next one
    with Journal(home.jobs_db) as journal:
        assert journal.next_job() is None
        queued, _ = journal.enqueue("train", reason="more data")
        assert journal.next_job().id == queued.id


@pytest.mark.slow
def test_the_daemon_parks_each_candidate_and_goes_on(home: Home):
    first, second = job_at_gate(home, "run-two"), job_at_gate(home, "run-three")
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--home", str(home.root), "--no-serve", "--once"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Journal(home.jobs_db) as journal:
        assert [journal.get(j).state for j in (first, second)] == ["awaiting_review"] * 2
    assert {r["run"] for r in LocalEngine(home.root).reviews()} == {"run-cand", "run-two", "run-three"}
    assert registry.current(home) == "base"


def test_approve_promotes_with_lineage_and_the_vote_audited(home: Home):
    engine = LocalEngine(home.root)
    result = engine.vote("run-cand", True, comment="answers read well", preferences={0: "a", 2: "B"})
    assert result["state"] == "approved" and result["job_state"] == "done"
    assert registry.current(home) == "v1" and result["current"] == "v1"
    stored = read_json(home.run("run-cand").root / "review.json")
    assert [(r["a_is"], r["b_is"]) for r in result["reveal"]] == [
        (i["a"], "current" if i["a"] == "candidate" else "candidate") for i in stored["items"]
    ]
    assert {r["a"] for r in result["reveal"]} | {r["b"] for r in result["reveal"]} == {"v1", "base"}
    votes = audit.find(home, "review_vote", run="run-cand")
    assert len(votes) == 1 and votes[0]["user"] == audit.user()
    assert votes[0]["details"]["approve"] is True and votes[0]["details"]["comment"] == "answers read well"
    assert votes[0]["details"]["preferences"] == {"0": "a", "2": "b"}
    assert audit.find(home, "promote", version="v1")
    lineage = registry.lineage(home, "v1")
    assert lineage["review"]["votes"][0]["user"] == audit.user() and lineage["gate"]["passed"]
    with Journal(home.jobs_db) as journal:
        assert journal.get(read_json(home.run("run-cand").root / "review.json")["job"]).version == "v1"
    assert engine.reviews() == []
    with pytest.raises(ApplianceError, match="closed"):
        engine.vote("run-cand", True)
    assert audit.verify(home).ok


def test_reject_keeps_the_current_model_and_refuses_the_job(home: Home):
    engine = LocalEngine(home.root)
    result = engine.vote("run-cand", False, comment="too terse on refunds")
    assert result["state"] == "rejected" and result["job_state"] == "refused"
    assert registry.current(home) == "base" and result["reveal"]
    jobs = engine.jobs()
    assert jobs[0]["state"] == "refused" and "too terse on refunds" in jobs[0]["error"]
    assert audit.user() in jobs[0]["error"]
    vote = audit.find(home, "review_vote", run="run-cand")[0]
    assert vote["details"]["approve"] is False and vote["user"] == audit.user()
    assert audit.find(home, "job_refused", run="run-cand")[0]["details"]["comment"] == "too terse on refunds"
    assert engine.reviews() == []


def test_each_reviewer_votes_once_and_approvals_add_up(home: Home, monkeypatch: pytest.MonkeyPatch):
    set_config(home, review_settings(approvals=2))
    engine = LocalEngine(home.root)
    monkeypatch.setenv("LOGNAME", "alice")  # getpass.getuser() reads LOGNAME first: another OS user
    first = engine.vote("run-cand", True, comment="fine")
    assert first["state"] == "pending" and first["approvals"] == 1 and registry.current(home) == "base"
    assert engine.reviews()[0]["voted"] and engine.reviews()[0]["reveal"]  # revealed to alice only
    with pytest.raises(ApplianceError, match="alice has already voted"):
        engine.vote("run-cand", True)
    with pytest.raises(ApplianceError, match="not 'a' or 'b'"):
        monkeypatch.setenv("LOGNAME", "bob")
        engine.vote("run-cand", True, preferences={0: "c"})
    assert "reveal" not in engine.reviews()[0]  # bob has not voted yet
    second = engine.vote("run-cand", True, comment="agreed")
    assert second["state"] == "approved" and registry.current(home) == "v1"
    assert [v["user"] for v in audit.find(home, "review_vote", run="run-cand")] == ["alice", "bob"]


def test_cli_review_list_and_reject(home: Home):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "review", *args, "--home", str(home.root)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["run"] for r in json.loads(listed.stdout)["reviews"]] == ["run-cand"]
    missing = cli("approve")
    assert missing.returncode != 0 and "name the candidate's run" in missing.stderr
    rejected = cli("reject", "run-cand", "--comment", "not yet", "--json")
    assert rejected.returncode == 0, rejected.stderr
    assert json.loads(rejected.stdout)["job_state"] == "refused" and registry.current(home) == "base"


def test_a_failed_gate_never_reaches_review(waiting: dict, tmp_path: Path):
    home = copy_home(waiting["home"], tmp_path / "home")
    job_id = job_at_gate(home, "run-bad", parity_passed=False)
    job = drive(home, job_id)
    assert job.state == "refused"
    assert not (home.run("run-bad").root / "review.json").exists()
    assert [r["run"] for r in LocalEngine(home.root).reviews()] == ["run-cand"]
    assert not any(v.get("run") == "run-bad" for v in registry.versions(home))


def test_auto_promotion_is_unchanged(waiting: dict, tmp_path: Path):
    home = copy_home(waiting["home"], tmp_path / "home")
    s = review_settings()
    s.gate.promotion = "auto"
    set_config(home, s)
    job = drive(home, job_at_gate(home, "run-auto"))
    assert job.state == "done" and registry.current(home) == job.version
    assert not (home.run("run-auto").root / "review.json").exists()
    # the waiting candidate was compared with a model no longer served: it cannot be approved now
    engine = LocalEngine(home.root)
    assert engine.reviews()[0]["stale"] is True
    with pytest.raises(ApplianceError, match="current model changed"):
        engine.vote("run-cand", True)
    assert engine.vote("run-cand", False, "superseded")["job_state"] == "refused"
    assert registry.current(home) == job.version


def test_a_waiting_candidate_cannot_be_promoted_around_the_review(home: Home):
    engine = LocalEngine(home.root)
    with pytest.raises(ApplianceError, match="waits for review"):
        engine.promote("v1")
    assert registry.current(home) == "base"
