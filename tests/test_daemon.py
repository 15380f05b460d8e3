"""``appliance run``: the daemon end to end on the tiny model, with real processes, signals and kills."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLE, free_port, tiny_settings

from appliance.cli.init import create_home, export_base
from appliance.data.ingest.store import Store
from appliance.engine.daemon import sd_notify
from appliance.home import audit, registry
from appliance.home.config import Settings, dump, load
from appliance.home.fsutil import read_json, sha256_file
from appliance.home.journal import STAGES, Journal
from appliance.home.paths import Home

REPO = Path(__file__).resolve().parents[1]


def daemon_settings(**train: object) -> Settings:
    s = tiny_settings()
    s.train.threads = 1
    s.train.max_steps = 6
    s.train.checkpoint_every = 2
    s.watch.quiet_seconds = 0.3
    s.daemon.poll_seconds = 0.2
    s.disk.min_free_gb = 0.1
    s.train.eval_every = 3
    for key, value in train.items():
        setattr(s.train, key, value)
    return s


def make_template(root: Path, tiny_base: Path, settings: Settings | None = None) -> Home:
    """A home on the tiny base with the base exported and current (what 'appliance init' leaves)."""
    home = create_home(root, "tiny", settings or daemon_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text('{"source": "tiny test model"}')
    export_base(home, load(home.config))
    return home


def copy_home(template: Home, dest: Path) -> Home:
    shutil.copytree(template.root, dest, symlinks=True)
    return Home(dest)


def start(home: Home, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "--home", str(home.root), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=REPO,
    )


def open_jobs(home: Home) -> int:
    if not home.jobs_db.exists():
        return -1
    with Journal(home.jobs_db) as journal:
        return len([j for j in journal.jobs(100) if j.state in ("queued", "running")])


def current_stage(home: Home) -> str:
    with Journal(home.jobs_db) as journal:
        job = journal.active()
        return (job.current or f"after-{job.stage or 'start'}") if job else "idle"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Home:
    return make_template(tmp_path_factory.mktemp("daemon") / "template", tiny_base)


def test_sd_notify_sends_a_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert server.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_full_disk_refuses_the_stage_with_a_clear_line_and_keeps_the_job(tmp_path: Path):
    s = daemon_settings()
    s.disk.min_free_gb = 1e9  # more than any disk: the refusal a full disk gives
    home = create_home(tmp_path / "home", "tiny", s)
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    proc = start(home, "--no-serve", "--once")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    line = [x for x in err.splitlines() if x.startswith("appliance: error:")][-1]
    assert "GB free, the snapshot stage needs at least" in line and "disk.min_free_gb" in line
    with Journal(home.jobs_db) as journal:
        job = journal.active()
        assert job is not None and job.stage == ""  # nothing done, nothing lost: it resumes later


def _native_server_missing() -> str | None:
    from appliance.contract.errors import ServeError

    try:
        from appliance.runtime.llama_server import binary

        binary()
    except (ImportError, ServeError) as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_serving_daemon_notifies_ready_holds_the_lock_and_stops_on_sigterm(template: Home, tmp_path: Path):
    if reason := _native_server_missing():
        pytest.skip(reason)
    home = copy_home(template, tmp_path / "home")
    sock_path = tmp_path / "notify.sock"
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sock_path))
        notify.settimeout(240)
        proc = start(home, "--port", str(port), env={"NOTIFY_SOCKET": str(sock_path)})
        try:
            assert notify.recv(100) == b"READY=1"
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
            second = subprocess.run(
                [sys.executable, "-m", "appliance", "run", "--home", str(home.root), "--no-serve", "--once"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert second.returncode != 0 and "another appliance engine is running" in second.stderr
            status = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "appliance", "status", "--home", str(home.root), "--json"],
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout
            )
            assert status["server"]["health"] == "ok" and status["inbox"]["watching"]
            assert status["server"]["address"] == f"http://127.0.0.1:{port}/v1"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert notify.recv(100) == b"STOPPING=1"
    actions = [e["action"] for e in audit.entries(home)]
    assert "daemon_start" in actions and "server_start" in actions
    assert audit.verify(home).ok


# Where each kill is aimed: the stage to wait for, and how long into it to strike at most (s).
# Waiting for a stage means the stages before it ran uninterrupted in that round, so the
# job advances between kills and the kills spread over every stage.
KILL_PLAN = [
    ("snapshot", 0.2),
    ("train", 6.0),
    ("train", 12.0),
    ("export", 3.0),
    ("export", 10.0),
    ("export", 20.0),
    ("gate", 2.0),
    ("gate", 8.0),
    ("promote", 0.5),
    ("promote", 3.0),
    ("train", 8.0),
    ("export", 8.0),
    ("gate", 5.0),
    ("promote", 1.5),
]


@pytest.mark.slow
def test_kill_9_at_random_points_then_the_jobs_complete_once(template: Home, tmp_path: Path):
    """>= 10 kill -9 across stages; restart; every job completes; nothing promoted twice or half;
    no document lost; data arriving mid-way queues exactly one follow-up job."""
    home = copy_home(template, tmp_path / "home")
    s = load(home.config)
    s.gate.require_better_on_new = False  # durability is tested here, the gate's judgement in test_gate
    s.gate.loss_margin = 0.05
    home.config.write_text(dump(s))
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    rng = random.Random(7)
    kills: list[str] = []
    for round_number, (target, within) in enumerate(KILL_PLAN):
        proc = start(home, "--no-serve")
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and not _reached(home, target):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, within))
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited by itself: {proc.communicate()[1][-2000:]}")
        if current_stage(home) == "idle" and round_number >= 10:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=300)
            break
        kills.append(current_stage(home))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        if round_number == 3:  # new data while the first job is in flight: one follow-up job
            for name in ("a", "b", "c"):
                (home.inbox / f"extra-{name}.jsonl").write_text(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": f"What is code {name}?"},
                                {"role": "assistant", "content": f"Code {name} means the blue form, section {name}."},
                            ]
                        }
                    )
                    + "\n"
                )
    print("kill points:", kills)
    assert len(kills) >= 10, kills
    assert {"train", "export", "gate", "promote"} <= set(kills), kills
    # restart and let everything finish, then stop with SIGTERM
    proc = start(home, "--no-serve")
    end = time.monotonic() + 900
    while time.monotonic() < end and (open_jobs(home) != 0 or _unread(home)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 0

    with Journal(home.jobs_db) as journal:
        jobs = journal.jobs(100)
    assert all(j.state in ("done", "refused") for j in jobs), [(j.id, j.state, j.error) for j in jobs]
    # The first file, then the three written while the first job was in flight: they queue
    # one follow-up, not one each. (A file the watcher finds stable only after that follow-up
    # has started is new data for a running job and rightly gets its own run; on a loaded
    # machine the three stability checks can straddle that start.)
    follow_ups = sorted(jobs, key=lambda j: j.id)[1:]
    assert 1 <= len(follow_ups) <= 2, [(j.id, j.reason) for j in jobs]
    history = read_json(home.models / "history.json")
    for job in jobs:
        promoted = [h for h in history if h.get("job") == job.id]
        assert len(promoted) == (1 if job.state == "done" else 0), (job.id, history)
        assert len(audit.find(home, "promote", job=job.id)) == len(promoted)
    assert any(j.state == "done" for j in jobs)
    current = registry.current(home)
    registry.verify(home, current)  # the served file is complete and the one recorded
    for record in registry.versions(home):
        assert sha256_file(registry.gguf_path(home, record["version"])) == record["sha256"]
        if record["version"] != "base":
            assert registry.lineage(home, record["version"]) is not None
    assert not list(home.models.glob(".*"))  # no half-written version folder
    with Store(home.store_db) as store:
        assert store.counts()["documents"] == 4  # no document lost
    for job in jobs:  # intermediates go once a run is gated
        run = home.run(job.run_id)
        assert not run.checkpoints.exists() and not run.merged.exists()
        assert not (run.gguf / "model-f16.gguf").exists()
    assert audit.verify(home).ok


def _reached(home: Home, target: str) -> bool:
    """Whether the active job is in (or past) ``target``; an idle journal counts as past."""
    if not home.jobs_db.exists():
        return False
    with Journal(home.jobs_db) as journal:
        job = journal.active() or (journal.queue() or [None])[0]
    if job is None:
        return open_jobs(home) == 0 and bool(list(home.runs.glob("run-*")))
    now = job.current or job.next_stage() or "promote"
    return job.state == "running" and bool(job.current) and STAGES.index(now) >= STAGES.index(target)


def _unread(home: Home) -> bool:
    with Store(home.store_db) as store:
        known = store.file_states()
    return any(p.name not in known for p in home.inbox.iterdir())


def test_engine_commands_and_views_for_other_processes(tmp_path: Path):
    from appliance.contract.events import Message, Progress
    from appliance.engine.daemon import EventLog
    from appliance.engine.local import LocalEngine

    home = create_home(tmp_path / "home", "tiny", daemon_settings())
    engine = LocalEngine(home.root)
    first, again = engine.retrain(), engine.retrain()
    assert first["id"] == again["id"] and first["state"] == "queued"
    status = engine.status()
    assert status.job is None and [j["id"] for j in status.queue] == [first["id"]]
    assert status.server["health"] == "no daemon running" and status.inbox["paused"] is False
    engine.pause_watching()
    assert engine.status().inbox["paused"] is True
    engine.resume_watching()
    assert engine.status().inbox["paused"] is False
    log = EventLog(home.events_log)
    log(Message("daemon", "ready"))
    events, offset = engine.events()
    assert [e["text"] for e in events] == ["ready"]
    log(Progress("train", completed=3, total=6))
    with open(home.events_log, "a") as handle:
        handle.write('{"kind": "Message", "te')  # a line being written is left for the next poll
    more, offset2 = engine.events(offset)
    assert [e["kind"] for e in more] == ["Progress"] and more[0]["completed"] == 3
    assert engine.events(offset2) == ([], offset2)
    actions = [e["action"] for e in engine.audit_entries()]
    assert actions == ["retrain_requested", "pause_watching", "resume_watching"]
    assert engine.verify_audit()["ok"]
    (home.inbox / "new.jsonl").write_text('{"messages": []}\n')
    assert engine.status().inbox["new"] == 1


@pytest.mark.slow
def test_sigterm_mid_training_exits_0_and_the_next_start_resumes(template: Home, tmp_path: Path):
    home = copy_home(template, tmp_path / "home")
    s = load(home.config)
    s.gate.require_better_on_new = False
    s.gate.loss_margin = 0.05
    home.config.write_text(dump(s))
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    proc = start(home, "--no-serve")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        with Journal(home.jobs_db) if home.jobs_db.exists() else _Nothing() as journal:
            job = journal.active() if journal else None
        if job and job.current == "train" and job.progress:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resumes at its next start" in err
    with Journal(home.jobs_db) as journal:
        job = journal.active()
    assert (
        job is not None and job.stage == "study" and job.run_id
    )  # train (after study) not complete; its run remembered
    again = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--home", str(home.root), "--no-serve", "--once"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    with Journal(home.jobs_db) as journal:
        done = journal.get(job.id)
    assert done.state in ("done", "refused") and done.run_id == job.run_id


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
