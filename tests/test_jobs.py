"""The job journal: coalescing, stage transitions, resuming after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.home.journal import STAGES, Journal, iter_stages


@pytest.fixture()
def journal(tmp_path: Path) -> Journal:
    with Journal(tmp_path / "jobs.db") as j:
        yield j


def test_wal_and_full_sync(journal: Journal):
    assert journal.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_burst_queues_one_train_job_and_one_follow_up_while_running(journal: Journal):
    first, new = journal.enqueue("train", "file a")
    again, new_again = journal.enqueue("train", "file b")
    assert new and not new_again and again.id == first.id
    running = journal.next_job()
    assert running is not None and running.id == first.id and running.state == "running"
    follow, new = journal.enqueue("train", "file c arrived during the run")
    for name in "defgh":
        same, fresh = journal.enqueue("train", f"file {name}")
        assert same.id == follow.id and not fresh
    assert [j.id for j in journal.queue()] == [follow.id]


def test_stages_in_order_and_resume_from_the_last_complete(journal: Journal):
    job, _ = journal.enqueue("train")
    job = journal.next_job()
    assert job.next_stage() == "snapshot"
    journal.stage_started(job.id, "snapshot")
    journal.stage_complete(job.id, "snapshot", snapshot="abc")
    journal.stage_started(job.id, "study")
    journal.stage_complete(job.id, "study")
    journal.stage_started(job.id, "train")
    journal.remember(job.id, run_id="run-1")
    # a crash here: the next start finds the same job, train not complete, its run id kept
    with Journal(Path(journal.db.execute("PRAGMA database_list").fetchone()[2])) as again:
        resumed = again.next_job()
    assert resumed.id == job.id and resumed.next_stage() == "train" and resumed.run_id == "run-1"
    assert resumed.snapshot == "abc"
    states = [(t["stage"], t["state"]) for t in journal.transitions(job.id)]
    assert ("snapshot", "complete") in states and ("train", "started") in states
    assert ("train", "complete") not in states


def test_a_job_journalled_before_the_study_stage_continues_with_it(tmp_path: Path):
    """A journal written when the stages were snapshot -> train: a job whose snapshot was
    complete resumes with study, then train; one past train does not study again."""
    with Journal(tmp_path / "jobs.db") as journal:
        job, _ = journal.enqueue("train")
        job = journal.next_job()
        journal.stage_started(job.id, "snapshot")
        journal.stage_complete(job.id, "snapshot", snapshot="abc")
        later, _ = journal.enqueue("train")
        journal.db.execute("UPDATE jobs SET state='running', stage='train' WHERE id=?", (later.id,))
    with Journal(tmp_path / "jobs.db") as again:
        resumed = again.next_job()
        assert resumed.id == job.id and resumed.next_stage() == "study"
        assert list(iter_stages(resumed.stage)) == ["study", "train", "export", "gate", "promote"]
        assert again.get(later.id).next_stage() == "export"
        assert "study" not in list(iter_stages("train"))


def test_finish_states_and_all_stages(journal: Journal):
    job, _ = journal.enqueue("forget", document="a" * 64)
    job = journal.next_job()
    for stage in STAGES:
        journal.stage_started(job.id, stage)
        job = journal.stage_complete(job.id, stage)
    assert job.next_stage() is None
    done = journal.finish(job.id, "done")
    assert done.state == "done" and journal.active() is None and journal.next_job() is None


WRITER = """
import sys, time
from pathlib import Path
from appliance.home.journal import STAGES, Journal
j = Journal(Path(sys.argv[1]))
n = 0
while True:
    job, _ = j.enqueue("forget", document=str(n))
    job = j.next_job()
    for stage in STAGES:
        j.stage_started(job.id, stage)
        j.stage_complete(job.id, stage)
    j.finish(job.id, "done")
    n += 1
"""


def test_kill_9_mid_write_leaves_a_consistent_journal(tmp_path: Path):
    db = tmp_path / "jobs.db"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)])
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Journal(db) as journal:
            assert journal.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            for job in journal.jobs(1000):
                done = [t["stage"] for t in journal.transitions(job.id) if t["state"] == "complete"]
                assert done == list(STAGES[: len(done)])  # stages complete in order, never skipped
                assert job.stage == (done[-1] if done else "")
            # an interrupted job is resumed; finish it so the next writer starts clean
            while (job := journal.next_job()) is not None:
                journal.finish(job.id, "failed", "killed in test")
