"""Ingest: valid lines kept, invalid ones reported by number, unusable files quarantined."""

from __future__ import annotations

import json
from pathlib import Path

from appliance import snapshot
from appliance.ingest import ingest
from appliance.init import create_home


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


def test_mixed_file_keeps_good_lines_and_reports_bad(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "mixed.jsonl").write_text("\n".join([
        chat("q1", "a1"),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "ends on user"}]}),
        json.dumps({"messages": [{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        chat("q2", "a2"),
    ]) + "\n")
    report = ingest(home)
    assert report.accepted == 2 and report.files == 1
    assert [line.split(":")[1].strip() for line in report.skipped_lines] == ["line 2", "line 3", "line 4"]
    assert "does not end with an assistant turn" in report.skipped_lines[1]
    assert (home.inbox / "mixed.jsonl").exists()  # ingested files stay in the inbox


def test_unusable_files_are_quarantined_with_a_reason(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "junk.jsonl").write_bytes(b"\x00\xff\xfe binary junk \x89PNG")
    (home.inbox / "empty.jsonl").write_text("")
    (home.inbox / "notes.docx").write_text("not supported yet")
    (home.inbox / "good.jsonl").write_text(chat("q", "a") + "\n")
    report = ingest(home)
    assert report.accepted == 1
    assert {q.file for q in report.quarantined} == {"junk.jsonl", "empty.jsonl", "notes.docx"}
    reasons = {q.file: q.reasons[0] for q in report.quarantined}
    assert "not valid UTF-8" in reasons["junk.jsonl"]
    assert "no records" in reasons["empty.jsonl"]
    assert "unsupported file type" in reasons["notes.docx"]
    sidecars = sorted(p.name for p in home.quarantine.glob("*.reason.json"))
    assert len(sidecars) == 3
    assert not (home.inbox / "junk.jsonl").exists() and len(list(home.quarantine.glob("*junk.jsonl"))) == 1


def test_rescan_is_incremental_and_duplicates_collapse(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "a.jsonl").write_text(chat("q", "a") + "\n" + chat("q2", "a2") + "\n")
    assert ingest(home).accepted == 2
    again = ingest(home)
    assert (again.accepted, again.unchanged) == (0, 1)
    (home.inbox / "copy.jsonl").write_text(chat("q", "a") + "\n")
    third = ingest(home)
    assert (third.accepted, third.duplicates) == (0, 1)
    (home.inbox / ".a.jsonl.swp").write_text("editor temp")
    (home.inbox / "b.jsonl.part").write_text("partial download")
    assert ingest(home).ignored == 2


def test_changed_file_supersedes_its_earlier_version(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    path = home.inbox / "a.jsonl"
    path.write_text(chat("old q", "old a") + "\n")
    ingest(home)
    path.write_text(chat("new q", "new a") + "\n")
    ingest(home)
    snap = snapshot.cut(home, 0.0)
    texts = [r.body["messages"][0]["content"] for r in snapshot.records(home, snap.train)]
    assert texts == ["new q"]


def test_symlink_is_refused_and_target_untouched(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    outside = tmp_path / "secret.jsonl"
    outside.write_text(chat("q", "a") + "\n")
    (home.inbox / "link.jsonl").symlink_to(outside)
    report = ingest(home)
    assert report.accepted == 0 and "symbolic link" in report.quarantined[0].reasons[0]
    assert outside.exists()


def test_snapshot_is_deterministic_and_split_by_hash(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "a.jsonl").write_text("".join(chat(f"q{i}", f"a{i}") + "\n" for i in range(200)))
    ingest(home)
    first = snapshot.cut(home, 0.2)
    second = snapshot.cut(home, 0.2)
    assert first.id == second.id and first.val == second.val
    assert 20 <= len(first.val) <= 60 and len(first.train) + len(first.val) == 200
    assert set(first.train).isdisjoint(first.val)
