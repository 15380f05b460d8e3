"""The real watchdog observer on a real temporary inbox, feeding the real ingest (R4, R5).

No event is mocked: files are written, renamed and deleted the way people and
programs do, and the store is checked for 0 partial, 0 duplicate, 0 missed.
Waiting is by polling for an outcome with a generous limit, never by asserting a
duration.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.cli.init import create_home
from appliance.data.ingest import Ingestors, IngestReport
from appliance.data.ingest.store import Store
from appliance.data.watch import InboxWatcher
from appliance.home.catalog import names
from appliance.home.config import WatchSection
from appliance.home.paths import Home

FAST = WatchSection(quiet_seconds=0.3, open_grace_seconds=5.0, rescan_seconds=60.0, poll_seconds=0.1)


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


def wait_for(condition: Callable[[], bool], limit: float = 20.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class Inbox:
    """A home, a watcher on its inbox, and every batch the watcher handed over."""

    def __init__(self, home: Home, settings: WatchSection = FAST, fail_first: bool = False):
        self.home = home
        self.ingestor = Ingestors(home)  # a sub-folder of the inbox is its own collection
        self.batches: list[list[str]] = []
        self.reports: list[IngestReport] = []
        self.errors: list[BaseException] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()
        self.watcher = InboxWatcher(home.inbox, self.on_stable, settings, on_error=self.errors.append)

    def __enter__(self) -> Inbox:
        self.watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.watcher.stop()
        self.ingestor.close()

    def on_stable(self, paths: list[Path]) -> None:
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("the consumer failed once")
        report = self.ingestor.run(paths)
        with self.lock:
            self.batches.append([p.relative_to(self.home.inbox).as_posix() for p in paths])
            self.reports.append(report)

    def seen(self) -> list[str]:
        with self.lock:
            return [name for batch in self.batches for name in batch]

    def stores(self) -> list[tuple[str, Path]]:
        """Each collection's folder prefix and store (files in sub-folders are their collections')."""
        return [
            (f"{c}/" if c else "", self.home.scoped(c).store_db)
            for c in names(self.home)
            if self.home.scoped(c).store_db.exists()
        ]

    def current(self) -> dict[str, str]:
        found = {}
        for prefix, db in self.stores():
            with Store(db) as store:
                found.update(
                    (prefix + path, sha)
                    for path, sha in store.db.execute(
                        "SELECT path, sha256 FROM versions WHERE status='current'"
                    ).fetchall()
                )
        return found

    def documents(self) -> int:
        total = 0
        for _, db in self.stores():
            with Store(db) as store:
                total += store.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        return total

    def quarantined(self) -> list[str]:
        with self.lock:
            return [q.file for r in self.reports for q in r.quarantined]


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    return create_home(tmp_path / "home", "none")


def test_slow_chunked_write_is_ingested_once_and_complete(home: Home):
    inbox = Inbox(home)
    with inbox:
        with open(home.inbox / "slow.jsonl", "w") as handle:
            for i in range(12):  # pauses shorter than the quiet period, line halves split across writes
                line = chat(f"q{i}", f"a{i}")
                handle.write(line[:10])
                handle.flush()
                time.sleep(0.05)
                handle.write(line[10:])
                handle.flush()
                time.sleep(0.05)
        assert wait_for(lambda: "slow.jsonl" in inbox.current())
    assert inbox.seen() == ["slow.jsonl"]
    assert inbox.documents() == 1 and inbox.reports[0].accepted == 12 and inbox.reports[0].skipped == 0


def test_a_file_that_keeps_growing_is_taken_only_when_it_stops(home: Home):
    inbox = Inbox(home)
    with inbox:
        with open(home.inbox / "growing.jsonl", "w") as handle:
            deadline = time.monotonic() + 2.0
            i = 0
            while time.monotonic() < deadline:
                handle.write(chat(f"q{i}", f"a{i}"))
                handle.flush()
                i += 1
                time.sleep(0.1)
        assert wait_for(lambda: "growing.jsonl" in inbox.current())
    assert inbox.seen() == ["growing.jsonl"] and inbox.reports[0].accepted == i


@pytest.mark.slow
def test_a_file_that_keeps_growing_for_ten_seconds(home: Home):
    inbox = Inbox(home, WatchSection(quiet_seconds=1.0, open_grace_seconds=30.0))
    with inbox:
        deadline, i = time.monotonic() + 10.0, 0
        while time.monotonic() < deadline:
            with open(home.inbox / "growing.jsonl", "a") as handle:  # reopened each time: closes in between
                handle.write(chat(f"q{i}", f"a{i}"))
            i += 1
            time.sleep(0.25)
        assert wait_for(lambda: "growing.jsonl" in inbox.current())
    assert inbox.seen() == ["growing.jsonl"] and inbox.reports[0].accepted == i


def test_save_by_temp_then_rename_and_rename_over_supersede(home: Home):
    inbox = Inbox(home)
    target = home.inbox / "notes.jsonl"
    with inbox:
        for version in ("one", "two"):
            temp = home.inbox / ".goutputstream-7QX2"
            temp.write_text(chat(f"{version} q", f"{version} a"))
            os.replace(temp, target)
            assert wait_for(lambda version=version: len(inbox.seen()) == (1 if version == "one" else 2))
        stray = home.inbox / "incoming.jsonl.part"  # a download that is renamed when done
        stray.write_text(chat("three q", "three a"))
        os.replace(stray, target)
        assert wait_for(lambda: len(inbox.seen()) == 3)
    with Store(home.store_db) as store:
        statuses = [status for _, status in store.versions("notes.jsonl")]
        texts = [r.body["messages"][0]["content"] for r in store.records(store.active_record_hashes())]
    assert inbox.seen() == ["notes.jsonl"] * 3
    assert statuses == ["superseded", "superseded", "current"] and texts == ["three q"]


def test_a_burst_of_hundreds_of_files_is_each_ingested_once(home: Home):
    inbox = Inbox(home)
    with inbox:
        for i in range(300):
            (home.inbox / f"f{i:03}.jsonl").write_text(chat(f"q{i}", f"a{i}"))
        assert wait_for(lambda: len(inbox.current()) == 300, limit=60)
    seen = inbox.seen()
    assert len(seen) == len(set(seen)) == 300
    assert inbox.documents() == 300 and sum(r.accepted for r in inbox.reports) == 300


def test_editor_temp_files_and_vanishing_files_are_never_ingested(home: Home):
    inbox = Inbox(home)
    with inbox:
        for name in (".notes.md.swp", "notes.md~", "big.csv.part", "x.tmp", ".hidden.jsonl", "~$draft.docx"):
            (home.inbox / name).write_text("in progress")
        brief = home.inbox / "brief.jsonl"
        brief.write_text(chat("q", "a"))
        brief.unlink()  # deleted before it became stable
        (home.inbox / "kept.jsonl").write_text(chat("kept q", "kept a"))
        assert wait_for(lambda: "kept.jsonl" in inbox.current())
        time.sleep(FAST.quiet_seconds * 2)  # room for a wrong report to show up
    assert inbox.seen() == ["kept.jsonl"] and inbox.errors == []


def test_files_that_landed_while_down_are_picked_up_at_start_and_not_twice(home: Home):
    (home.inbox / "early.jsonl").write_text(chat("early q", "early a"))
    first = Inbox(home)
    with first:
        assert wait_for(lambda: "early.jsonl" in first.current())
    (home.inbox / "while-down.jsonl").write_text(chat("down q", "down a"))
    (home.inbox / "sub").mkdir()
    (home.inbox / "sub" / "deep.jsonl").write_text(chat("deep q", "deep a"))
    second = Inbox(home)
    with second:
        assert wait_for(lambda: {"while-down.jsonl", "sub/deep.jsonl"} <= set(second.current()))
    report = second.reports[0]
    assert (report.files, report.unchanged) == (2, 1)  # the early file was offered again but not re-read
    assert second.documents() == 3


def test_a_folder_moved_into_the_inbox_is_picked_up(home: Home, tmp_path: Path):
    inbox = Inbox(home)
    outside = tmp_path / "export"
    outside.mkdir()
    for i in range(3):
        (outside / f"part{i}.jsonl").write_text(chat(f"q{i}", f"a{i}"))
    with inbox:
        time.sleep(0.2)
        shutil.move(outside, home.inbox / "export")
        assert wait_for(lambda: len(inbox.current()) == 3)
    assert sorted(inbox.seen()) == [f"export/part{i}.jsonl" for i in range(3)]


def test_polling_observer_for_network_file_systems(home: Home):
    inbox = Inbox(home, FAST.model_copy(update={"polling": True}))
    with inbox:
        assert inbox.watcher.polling and not inbox.watcher.tracker.closes_reported
        (home.inbox / "nfs.jsonl").write_text(chat("q", "a"))
        assert wait_for(lambda: "nfs.jsonl" in inbox.current())
        (home.inbox / "nfs.jsonl").write_text(chat("q2", "a2") + chat("q3", "a3"))
        assert wait_for(lambda: len(inbox.seen()) == 2)
    assert inbox.reports[-1].superseded == ["nfs.jsonl"]


def test_a_failing_consumer_does_not_stop_the_watcher_and_the_file_is_offered_again(home: Home):
    inbox = Inbox(home, FAST.model_copy(update={"rescan_seconds": 0.5}), fail_first=True)
    with inbox:
        (home.inbox / "a.jsonl").write_text(chat("q", "a"))
        assert wait_for(lambda: "a.jsonl" in inbox.current())
    assert [str(e) for e in inbox.errors] == ["the consumer failed once"]


def test_bad_files_mixed_with_good_ones_never_stop_the_watcher(home: Home, tmp_path: Path):
    (tmp_path / "secret.jsonl").write_text(chat("secret q", "secret a"))
    inbox = Inbox(home)
    good = ["my notes.jsonl", "ünïcödé.jsonl", "-rf.jsonl", "--help.jsonl"]
    with inbox:
        (home.inbox / "junk.jsonl").write_bytes(os.urandom(2048).replace(b"\n", b"") + b"\x00")
        (home.inbox / "empty.jsonl").write_text("")
        (home.inbox / "user-last.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}))
        (home.inbox / "zero.pdf").write_bytes(b"")
        (home.inbox / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
        (home.inbox / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
        for i, name in enumerate(good):
            (home.inbox / name).write_text(chat(f"good q{i}", f"good a{i}"))
        bad = {"junk.jsonl", "empty.jsonl", "user-last.jsonl", "zero.pdf", "broken.docx", "link.jsonl"}
        assert wait_for(lambda: set(good) <= set(inbox.current()) and set(inbox.quarantined()) == bad)
    assert inbox.errors == [] and (tmp_path / "secret.jsonl").exists()
    assert sorted(p.name for p in home.inbox.iterdir()) == sorted(good)
    assert len(list(home.quarantine.glob("*.reason.json"))) == len(bad)
