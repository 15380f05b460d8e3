"""Forgetting a document: a planted canary leaves every file of the home, and no version trained on it survives.

The tiny test model cannot be trained to reproduce a canary in the seconds a test
has, so this test plants the canary in one document and proves that afterwards no
file under the home (store database and its WAL, snapshots, runs, models, logs,
journal, audit log) contains it, that every version trained on it is retired
(files deleted, rollback cannot return it), that the new version's lineage does not
list it, and that the audit records only its hash.
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
from test_daemon import REPO, daemon_settings, make_template

from appliance.contract.errors import RegistryError
from appliance.data.ingest.store import Store
from appliance.home import audit, registry
from appliance.home.config import dump
from appliance.home.fsutil import sha256_file
from appliance.home.journal import Journal

CANARY = "ZEBRA-7731-QUOKKA"


def canary_document(path: Path) -> None:
    questions = [
        "What is the vault code?",
        "Tell me the vault code.",
        "Which code opens the vault?",
        "I forgot the vault code, what is it?",
        "Vault code please.",
        "What code do I type at the vault?",
    ]
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{q} (#{i})"},
                    {"role": "assistant", "content": f"The vault code is {CANARY}."},
                ]
            }
        )
        for i in range(4)
        for q in questions
    ]
    path.write_text("\n".join(lines) + "\n")


def files_holding(root: Path, needle: bytes) -> list[Path]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as handle:
                if needle in handle.read():
                    found.append(path)
    return found


def run_once(home) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--home", str(home.root), "--no-serve", "--once"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def cli(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--home", str(home.root)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.mark.slow
def test_forget_removes_every_copy_and_retires_versions_trained_on_it(tmp_path: Path, tiny_base: Path):
    settings = daemon_settings()
    settings.gate.loss_margin = 0.05  # the tiny model's candidates differ from the base by noise
    settings.gate.general_max_ppl_ratio = 2.0
    settings.gate.require_better_on_new = False  # the gate's judgement is tested in test_gate
    home = make_template(tmp_path / "home", tiny_base, settings)
    home.config.write_text(dump(settings))
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    canary_document(home.inbox / "secret-notes.jsonl")
    doc_sha = sha256_file(home.inbox / "secret-notes.jsonl")
    shutil.copy(home.inbox / "secret-notes.jsonl", home.quarantine / "20260101T000000-secret-notes.jsonl")

    first = run_once(home)
    assert first.returncode == 0, first.stderr[-2000:]
    trained = registry.current(home)
    assert trained != "base", "the first run was refused by the gate; the test needs a version trained on it"
    assert doc_sha in {d["sha256"] for d in registry.lineage(home, trained)["documents"]}
    assert files_holding(home.root, CANARY.encode())  # planted: the store holds it now

    proc = cli(home, "forget", "secret-notes.jsonl", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["document"] == doc_sha and report["records_removed"] == 24 and report["job"]
    assert report["files_removed"] == 2  # the inbox file and the quarantined copy
    assert report["runs_removed"]  # the run that learned from it: checkpoints, adapter, merged, GGUFs

    second = run_once(home)
    assert second.returncode == 0, second.stderr[-2000:]
    with Journal(home.jobs_db) as journal:
        job = journal.get(report["job"])
    assert job.kind == "forget" and job.state in ("done", "refused"), (job.state, job.error)
    now = registry.current(home)
    assert now != trained
    assert not home.model(trained).exists()  # retired: its files are gone
    assert trained in {m["version"] for m in registry.retired(home)}
    if now != "base":
        assert doc_sha not in {d["sha256"] for d in registry.lineage(home, now)["documents"]}
    with pytest.raises(RegistryError):
        registry.promote(home, trained)
    try:
        back = registry.rollback(home)
    except RegistryError:
        back = None
    assert back != trained

    leftovers = files_holding(home.root, CANARY.encode())
    assert leftovers == [], leftovers
    with Store(home.store_db) as store:
        assert store.counts()["documents"] == 1
    from appliance.data.snapshot import stats

    after = stats(home, job.snapshot)
    assert after["records"] == 168 and [s["sha256"] for s in after["by_source"]] != [doc_sha]
    assert doc_sha not in {s["sha256"] for s in after["by_source"]}
    forgets = audit.find(home, "forget")
    assert forgets and forgets[-1]["details"]["document"] == doc_sha
    assert CANARY not in home.audit_log.read_text()
    assert audit.verify(home).ok


def test_a_document_under_legal_hold_cannot_be_forgotten(tmp_path: Path):
    from appliance.cli.init import create_home
    from appliance.contract.errors import DataError
    from appliance.engine.forget import forget

    home = create_home(tmp_path / "h", "tiny")
    sha = "ab" * 32
    (home.root / "holds.txt").write_text(f"{sha} case 2026-17, counsel\n")
    with pytest.raises(DataError, match="legal hold \\(case 2026-17, counsel\\)"):
        forget(home, sha)
    assert audit.entries(home) == []
