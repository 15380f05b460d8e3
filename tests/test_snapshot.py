"""Snapshots: parent + records added and retired, deterministic ids and splits, stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli.init import create_home
from appliance.contract.errors import DataError
from appliance.data import snapshot
from appliance.data.ingest import ingest
from appliance.data.ingest.store import Store
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.paths import Home


def chat(q: str, a: str = "a") -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


def put(home: Home, name: str, *questions: str) -> None:
    (home.inbox / name).write_text("".join(chat(q) for q in questions))
    ingest(home)


def expected(home: Home, fraction: float) -> tuple[list[str], list[str]]:
    """The split computed from scratch from the store's active records."""
    with Store(home.store_db) as store:
        hashes = store.active_record_hashes()
    return (
        [h for h in hashes if not snapshot.is_validation(h, fraction)],
        [h for h in hashes if snapshot.is_validation(h, fraction)],
    )


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    return create_home(tmp_path / "h", "none")


def test_snapshot_is_deterministic_and_split_by_hash(home: Home):
    put(home, "a.jsonl", *[f"q{i}" for i in range(200)])
    first = snapshot.cut(home, 0.2)
    second = snapshot.cut(home, 0.2)
    assert first.id == second.id and first.val == second.val
    assert 20 <= len(first.val) <= 60 and len(first.train) + len(first.val) == 200
    assert set(first.train).isdisjoint(first.val)
    assert (first.train, first.val) == expected(home, 0.2)
    assert len(list(home.snapshots.iterdir())) == 1


def test_a_later_snapshot_stores_only_what_was_added_and_retired(home: Home):
    put(home, "a.jsonl", *[f"q{i}" for i in range(50)])
    first = snapshot.cut(home, 0.2)
    put(home, "b.jsonl", "new one", "new two", "q1")  # q1: a duplicate, not added again
    put(home, "a.jsonl", *[f"q{i}" for i in range(1, 50)])  # supersedes: q0 retired
    second = snapshot.cut(home, 0.2)
    manifest = read_json(second.manifest)
    with Store(home.store_db) as store:
        new = {r.body["messages"][0]["content"]: r.hash for r in store.records(manifest["added"] + manifest["retired"])}
    assert manifest["parent"] == first.id and "records" not in manifest and "train" not in manifest
    assert sorted(new) == ["new one", "new two", "q0"]
    assert manifest["retired"] == [new["q0"]]
    assert [s["path"] for s in manifest["sources_added"]] == ["a.jsonl", "b.jsonl"]
    assert len(manifest["sources_retired"]) == 1  # the earlier a.jsonl
    assert (second.train, second.val) == expected(home, 0.2)
    assert snapshot.load(home, second.id) == second


def test_the_same_data_gives_the_same_snapshot_whatever_the_history(home: Home):
    put(home, "a.jsonl", "x", "y")
    first = snapshot.cut(home, 0.1)
    put(home, "a.jsonl", "x")
    middle = snapshot.cut(home, 0.1)
    put(home, "a.jsonl", "x", "y")
    assert middle.id != first.id and snapshot.cut(home, 0.1).id == first.id


def test_stats_count_records_tokens_formats_and_sources(home: Home):
    put(home, "chats.jsonl", "q1", "q2", "q3")
    (home.inbox / "faq.csv").write_text("prompt,response\nq3,a\nq4,a\n")
    ingest(home)
    snap = snapshot.cut(home, 0.0)
    stats = snapshot.stats(home, snap.id)
    assert (stats["records"], stats["train"], stats["val"], stats["documents"]) == (4, 4, 0, 2)
    assert stats["by_format"] == {"csv": 1, "openai-messages": 3}  # a record's format: where it was first seen
    assert (stats["tokens"], stats["untokenized"]) == (0, 4)  # no base tokenizer in this home
    assert [(s["path"], s["records"]) for s in stats["by_source"]] == [("chats.jsonl", 3), ("faq.csv", 2)]
    put(home, "chats.jsonl", "q1")
    later = snapshot.stats(home, snapshot.cut(home, 0.0).id)
    assert (later["records"], later["by_format"]) == (3, {"csv": 1, "openai-messages": 2})
    assert [(s["path"], s["records"]) for s in later["by_source"]] == [("chats.jsonl", 1), ("faq.csv", 2)]


def test_a_full_manifest_is_written_every_chain_limit_cuts(home: Home, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(snapshot, "CHAIN_LIMIT", 2)
    ids = []
    for i in range(5):
        put(home, f"f{i}.jsonl", f"q{i}")
        ids.append(snapshot.cut(home, 0.0).id)
    kinds = ["full" if "records" in read_json(home.snapshot(i) / "manifest.json") else "delta" for i in ids]
    assert kinds == ["full", "delta", "delta", "full", "delta"]
    assert snapshot.load(home, ids[-1]).train == expected(home, 0.0)[0]


def test_changing_the_validation_fraction_cuts_a_full_manifest(home: Home):
    put(home, "a.jsonl", *[f"q{i}" for i in range(100)])
    a = snapshot.cut(home, 0.1)
    b = snapshot.cut(home, 0.3)
    assert a.id != b.id and "records" in read_json(b.manifest)
    assert (b.train, b.val) == expected(home, 0.3) and len(b.val) > len(a.val)


def test_an_edited_or_missing_manifest_is_detected(home: Home):
    put(home, "a.jsonl", "q1")
    first = snapshot.cut(home, 0.0)
    put(home, "b.jsonl", "q2")
    second = snapshot.cut(home, 0.0)
    manifest = read_json(second.manifest)
    write_json_atomic(second.manifest, {**manifest, "added": []})
    with pytest.raises(DataError, match="do not add up"):
        snapshot.load(home, second.id)
    write_json_atomic(second.manifest, manifest)
    (first.manifest).unlink()
    with pytest.raises(DataError, match=f"its parent {first.id} is missing"):
        snapshot.load(home, second.id)


def test_a_manifest_from_the_walking_skeleton_still_loads(home: Home):
    write_json_atomic(home.snapshot("old") / "manifest.json", {"id": "old", "train": ["a", "b"], "val": ["c"]})
    old = snapshot.load(home, "old")
    assert (old.train, old.val) == (["a", "b"], ["c"])


def test_no_data_is_a_clear_error(home: Home):
    with pytest.raises(DataError, match="no usable training data"):
        snapshot.cut(home, 0.1)
