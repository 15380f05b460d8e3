"""Ingest: valid lines kept, invalid ones reported by number, unusable files quarantined,
and the inbox semantics (supersede, removal keeps data, shared records) in the store."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from appliance.cli.command import main
from appliance.cli.init import create_home
from appliance.data import snapshot
from appliance.data.ingest import ingest
from appliance.data.ingest.store import Store
from appliance.home.fsutil import read_json
from appliance.home.paths import Home


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


def lines(*rows: str) -> str:
    return "".join(row + "\n" for row in rows)


def active_questions(home: Home) -> list[str]:
    with Store(home.store_db) as store:
        return sorted(r.body["messages"][0]["content"] for r in store.records(store.active_record_hashes()))


def test_mixed_file_keeps_good_lines_and_reports_bad(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "mixed.jsonl").write_text(
        lines(
            chat("q1", "a1"),
            "{not json",
            json.dumps({"messages": [{"role": "user", "content": "ends on user"}]}),
            json.dumps({"messages": [{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            chat("q2", "a2"),
        )
    )
    report = ingest(home)
    assert report.accepted == 2 and report.files == 1 and report.skipped == 3
    assert [line.split(":")[1].strip() for line in report.skipped_lines] == ["line 2", "line 3", "line 4"]
    assert "not valid JSON" in report.skipped_lines[0]
    assert "does not end with an assistant turn" in report.skipped_lines[1]
    assert "unknown role 'doctor'" in report.skipped_lines[2]
    assert (home.inbox / "mixed.jsonl").exists()  # ingested files stay in the inbox


def test_unusable_files_are_quarantined_with_a_reason(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "junk.jsonl").write_bytes(b"\x00\xff\xfe binary junk \x89PNG")
    (home.inbox / "empty.jsonl").write_text("")
    (home.inbox / "blank.jsonl").write_text("\n\n  \n")
    (home.inbox / "notes.xyz").write_text("what is this")
    (home.inbox / "bad.jsonl").write_text(lines("{", "[1]"))
    (home.inbox / "good.jsonl").write_text(lines(chat("q", "a")))
    report = ingest(home)
    assert report.accepted == 1
    reasons = {q.file: q.reasons for q in report.quarantined}
    assert set(reasons) == {"junk.jsonl", "empty.jsonl", "blank.jsonl", "notes.xyz", "bad.jsonl"}
    assert "binary data, not text" in reasons["junk.jsonl"][0]
    assert reasons["empty.jsonl"] == ["the file is empty (0 bytes)"]
    assert reasons["blank.jsonl"] == ["the file holds no records"]
    assert "unsupported file type '.xyz'" in reasons["notes.xyz"][0]
    assert reasons["bad.jsonl"][0].startswith("line 1: not valid JSON")
    assert reasons["bad.jsonl"][1] == "line 2: expected a JSON object, found list"
    sidecars = sorted(home.quarantine.glob("*.reason.json"))
    assert len(sidecars) == 5
    sidecar = read_json(next(p for p in sidecars if "junk" in p.name))
    assert sidecar["file"] == "junk.jsonl" and (home.quarantine / sidecar["moved_to"]).is_file()
    assert not (home.inbox / "junk.jsonl").exists() and (home.inbox / "good.jsonl").exists()


def test_many_bad_lines_give_a_bounded_list_of_reasons(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "all-bad.jsonl").write_text(lines(*["{"] * 500))
    report = ingest(home)
    reasons = report.quarantined[0].reasons
    assert len(reasons) == 21 and reasons[-1] == "and 480 more unusable lines"


def test_rescan_is_incremental_and_duplicates_collapse(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "a.jsonl").write_text(lines(chat("q", "a"), chat("q2", "a2"), chat("q", "a")))
    first = ingest(home)
    assert (first.accepted, first.duplicates) == (2, 1)  # the repeat within the file
    again = ingest(home)
    assert (again.accepted, again.files, again.unchanged) == (0, 0, 1)
    (home.inbox / "other.jsonl").write_text(lines(chat("q", "a")))
    third = ingest(home)
    assert (third.accepted, third.duplicates) == (0, 1)
    (home.inbox / "copy.jsonl").write_bytes((home.inbox / "a.jsonl").read_bytes())
    fourth = ingest(home)
    assert (fourth.files, fourth.duplicate_files, fourth.accepted) == (0, 1, 0)
    (home.inbox / ".a.jsonl.swp").write_text("editor temp")
    (home.inbox / "b.jsonl.part").write_text("partial download")
    assert ingest(home).ignored == 2
    assert active_questions(home) == ["q", "q2"]


def test_changed_file_supersedes_its_earlier_version_and_both_are_recorded(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    path = home.inbox / "a.jsonl"
    path.write_text(lines(chat("old q", "old a"), chat("kept q", "kept a")))
    ingest(home)
    path.write_text(lines(chat("new q", "new a"), chat("kept q", "kept a")))
    report = ingest(home)
    assert report.superseded == ["a.jsonl"] and (report.accepted, report.duplicates) == (1, 1)
    assert active_questions(home) == ["kept q", "new q"]
    with Store(home.store_db) as store:
        assert [status for _, status in store.versions("a.jsonl")] == ["superseded", "current"]
    snap = snapshot.cut(home, 0.0)
    assert sorted(r.body["messages"][0]["content"] for r in snapshot.records(home, snap.train)) == ["kept q", "new q"]


def test_changing_a_file_back_restores_its_earlier_records(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    path = home.inbox / "a.jsonl"
    original = lines(chat("v1 q", "v1 a"))
    path.write_text(original)
    ingest(home)
    path.write_text(lines(chat("v2 q", "v2 a")))
    ingest(home)
    path.write_text(original)
    report = ingest(home)
    assert (report.duplicate_files, report.superseded) == (1, ["a.jsonl"])
    assert active_questions(home) == ["v1 q"]


def test_removing_a_file_from_the_inbox_keeps_its_data(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "a.jsonl").write_text(lines(chat("q", "a")))
    ingest(home)
    (home.inbox / "a.jsonl").unlink()
    ingest(home)
    assert active_questions(home) == ["q"]


def test_a_record_shared_by_two_documents_stays_while_either_holds_it(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "a.jsonl").write_text(lines(chat("shared", "x"), chat("only a", "x")))
    (home.inbox / "b.jsonl").write_text(lines(chat("shared", "x"), chat("only b", "x")))
    ingest(home)
    (home.inbox / "a.jsonl").write_text(lines(chat("a again", "x")))
    ingest(home)
    assert active_questions(home) == ["a again", "only b", "shared"]  # b still holds "shared"
    (home.inbox / "b.jsonl").write_text(lines(chat("b again", "x")))
    ingest(home)
    assert active_questions(home) == ["a again", "b again"]


def test_a_copy_keeps_content_alive_when_the_original_changes(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    content = lines(chat("q", "a"))
    (home.inbox / "a.jsonl").write_text(content)
    (home.inbox / "copy.jsonl").write_text(content)
    ingest(home)
    (home.inbox / "a.jsonl").write_text(lines(chat("new", "a")))
    ingest(home)
    assert active_questions(home) == ["new", "q"]  # copy.jsonl's current version is still that content


def test_symlink_is_refused_not_followed_and_kept_in_quarantine(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    outside = tmp_path / "secret.jsonl"
    outside.write_text(lines(chat("q", "a")))
    (home.inbox / "link.jsonl").symlink_to(outside)
    report = ingest(home)
    assert report.accepted == 0 and "symbolic link" in report.quarantined[0].reasons[0]
    assert outside.read_text() == lines(chat("q", "a"))
    moved = [p for p in home.quarantine.iterdir() if p.is_symlink()]
    assert len(moved) == 1 and os.readlink(moved[0]) == str(outside)


def test_odd_names_are_ingested_and_unreadable_names_and_pipes_refused(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    names = ["my notes.jsonl", "ünïcödé 日本.jsonl", "-rf.jsonl", "--help.jsonl", "sub dir/-x.jsonl"]
    for i, name in enumerate(names):
        (home.inbox / name).parent.mkdir(exist_ok=True)
        (home.inbox / name).write_text(lines(chat(f"q{i}", "a")))
    bad_name = os.path.join(os.fsencode(home.inbox), b"caf\xe9.jsonl")
    with open(bad_name, "w") as handle:
        handle.write(lines(chat("latin-1 name", "a")))
    os.mkfifo(home.inbox / "pipe.jsonl")  # opening it to read would block forever
    report = ingest(home)
    assert report.accepted == len(names)
    reasons = {q.file: q.reasons[0] for q in report.quarantined}
    assert reasons == {
        "caf\ufffd.jsonl": "its name is not valid UTF-8; rename it",
        "pipe.jsonl": "it is not a regular file (a pipe, socket or device)",
    }


def test_the_same_name_quarantined_twice_keeps_both(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    for _ in range(2):
        (home.inbox / "bad.jsonl").write_text("{\n")
        ingest(home)
    assert len([p for p in home.quarantine.iterdir() if not p.name.endswith(".reason.json")]) == 2


def test_cli_json_report(tmp_path: Path, capsys):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "good.jsonl").write_text(lines(chat("q", "a"), "{"))
    (home.inbox / "bad.jsonl").write_text("{\n")
    (home.inbox / "x.tmp").write_text("temp")
    assert main(["ingest", "--home", str(home.root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["accepted"], report["duplicates"], report["ignored"]) == (1, 0, 1)
    assert [q["file"] for q in report["quarantined"]] == ["bad.jsonl"]
    assert report["quarantined"][0]["reasons"][0].startswith("line 1: not valid JSON (Expecting property name")
    assert len(report["skipped_lines"]) == 1
    assert report["skipped_lines"][0].startswith("good.jsonl: line 2: not valid JSON")
    assert report["formats"] == {"openai-messages": 1} and report["waiting"] == [] and report["failed"] == []


SCHEMA_1 = """
CREATE TABLE documents (sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, format TEXT NOT NULL, size INTEGER NOT NULL,
    records INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'active', ingested_at REAL NOT NULL);
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE records (hash TEXT PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE doc_records (doc_sha256 TEXT NOT NULL, record_hash TEXT NOT NULL, PRIMARY KEY (doc_sha256, record_hash));
INSERT INTO documents VALUES ('d-old', 'a.jsonl', 'openai-messages', 10, 1, 'superseded', 1.0);
INSERT INTO documents VALUES ('d-new', 'a.jsonl', 'openai-messages', 10, 2, 'active', 2.0);
INSERT INTO records VALUES ('r-old', 'chat', '{}'), ('r-new', 'chat', '{}'), ('r-both', 'chat', '{}');
INSERT INTO doc_records VALUES ('d-old', 'r-old'), ('d-old', 'r-both'), ('d-new', 'r-new'), ('d-new', 'r-both');
"""


def test_a_store_from_the_walking_skeleton_is_upgraded(tmp_path: Path):
    path = tmp_path / "index.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.close()
    with Store(path) as store:
        assert store.active_record_hashes() == ["r-both", "r-new"]
        assert store.versions("a.jsonl") == [("d-old", "superseded"), ("d-new", "current")]
        assert sorted(store.changes_since(0).added) == ["r-both", "r-new"]
