"""The watcher's state machine, driven step by step with a controllable clock.

Real files in a real folder, a fake clock: the tracker's rules (quiet period,
close-after-write, temp names, renames, duplicate events, rescans) are checked
without sleeping, and the property test feeds every stable path to the real
ingest and checks the store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cli.init import create_home
from appliance.data.ingest import ingest_paths
from appliance.data.ingest.store import Store
from appliance.data.watch import StabilityTracker, is_temporary, list_inbox

REPO = Path(__file__).resolve().parents[1]
QUIET = 2.0
STAMPS = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker_for(root: Path, closes: bool = False, grace: float = 60.0) -> tuple[StabilityTracker, Clock]:
    clock = Clock()
    return StabilityTracker(root, QUIET, closes_reported=closes, open_grace=grace, clock=clock), clock


def write(path: Path, data: bytes, clock: Clock, mode: str = "wb") -> None:
    """Write and give the file an mtime from the test's clock (real mtimes are too coarse to tell
    writes a few milliseconds apart; real writes are seconds apart from the tracker's view)."""
    with open(path, mode) as handle:
        handle.write(data)
    stamp = int(clock.now * 1e9) + next(STAMPS)
    os.utime(path, ns=(stamp, stamp))


def settle(tracker: StabilityTracker, clock: Clock, seconds: float = QUIET) -> list[Path]:
    tracker.poll()
    clock.now += seconds
    return tracker.poll()


def test_temp_and_hidden_names_are_never_reported(tmp_path: Path):
    names = [
        "a.swp",
        ".a.jsonl.swp",
        "notes.md~",
        "x.part",
        "y.tmp",
        ".goutputstream-ABC12",
        ".hidden.jsonl",
        "~$report.docx",
        "dl.crdownload",
    ]
    assert all(is_temporary(n) for n in names)
    assert not any(is_temporary(n) for n in ["a.jsonl", "my notes.md", "-rf.csv", "ünïcode.txt"])
    tracker, clock = tracker_for(tmp_path)
    for name in names:
        write(tmp_path / name, b"x", clock)
        tracker.changed(tmp_path / name, wrote=True)
    (tmp_path / ".git").mkdir()
    write(tmp_path / ".git" / "config.jsonl", b"x", clock)
    tracker.rescan()
    assert settle(tracker, clock) == []
    assert list_inbox(tmp_path) == ([], len(names) + 1)


def test_a_file_counts_once_stable_and_duplicate_events_collapse(tmp_path: Path):
    tracker, clock = tracker_for(tmp_path)
    path = tmp_path / "a.jsonl"
    write(path, b"one\n", clock)
    for _ in range(5):
        tracker.changed(path)
    tracker.poll()
    clock.now += QUIET - 0.1
    assert tracker.poll() == []  # not yet quiet long enough
    clock.now += 0.2
    assert tracker.poll() == [path]
    for _ in range(5):  # touching events with no change: nothing new to report
        tracker.changed(path)
    tracker.rescan()
    assert settle(tracker, clock) == []
    write(path, b"two\n", clock)
    tracker.changed(path, wrote=True)
    assert settle(tracker, clock) == [path]


def test_a_file_that_keeps_growing_for_ten_seconds_is_reported_once_complete(tmp_path: Path):
    tracker, clock = tracker_for(tmp_path)
    path = tmp_path / "growing.jsonl"
    write(path, b"", clock)
    tracker.changed(path)
    for _ in range(20):  # 10 seconds of appends, half a second apart
        clock.now += 0.5
        write(path, b"more\n", clock, mode="ab")
        tracker.changed(path, wrote=True)
        assert tracker.poll() == []
    assert settle(tracker, clock) == [path]
    assert path.stat().st_size == 100


def test_writer_holding_the_file_open_is_waited_for_where_closes_are_reported(tmp_path: Path):
    tracker, clock = tracker_for(tmp_path, closes=True, grace=30.0)
    path = tmp_path / "download.pdf"
    write(path, b"%PDF-half", clock)
    tracker.changed(path, wrote=True)
    assert settle(tracker, clock, 10.0) == []  # a stalled writer: quiet, but not closed
    tracker.closed(path)
    assert settle(tracker, clock) == [path]
    # without a close event ever arriving, the grace period ends the wait
    other = tmp_path / "other.pdf"
    write(other, b"%PDF", clock)
    tracker.changed(other, wrote=True)
    assert settle(tracker, clock, 10.0) == []
    assert settle(tracker, clock, 30.0) == [other]


def test_save_by_temp_file_and_rename_reports_the_real_name(tmp_path: Path):
    tracker, clock = tracker_for(tmp_path, closes=True)
    path = tmp_path / "notes.md"
    write(path, b"first", clock)
    tracker.changed(path, wrote=True)
    tracker.closed(path)
    assert settle(tracker, clock) == [path]
    temp = tmp_path / ".goutputstream-Q1W2E3"
    write(temp, b"second version", clock)
    tracker.changed(temp, wrote=True)  # ignored: a temp name
    os.replace(temp, path)
    tracker.moved(temp, path)
    assert settle(tracker, clock) == [path]


def test_a_file_deleted_before_it_became_stable_is_never_reported(tmp_path: Path):
    tracker, clock = tracker_for(tmp_path)
    gone, kept = tmp_path / "gone.jsonl", tmp_path / "kept.jsonl"
    for path in (gone, kept):
        write(path, b"x", clock)
        tracker.changed(path, wrote=True)
    tracker.poll()
    gone.unlink()
    assert settle(tracker, clock) == [kept]
    assert tracker.pending == set()


def test_rescan_reconciles_missed_events(tmp_path: Path):
    tracker, clock = tracker_for(tmp_path)
    write(tmp_path / "landed-while-down.jsonl", b"x", clock)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "deep.csv", b"x", clock)
    assert settle(tracker, clock) == []  # no events: nothing known yet
    tracker.rescan()
    assert [p.name for p in settle(tracker, clock)] == ["landed-while-down.jsonl", "deep.csv"]
    (tmp_path / "sub" / "deep.csv").unlink()  # removed unseen, then back: it counts again
    tracker.rescan()
    write(tmp_path / "sub" / "deep.csv", b"x", clock)
    tracker.rescan()
    assert [p.name for p in settle(tracker, clock)] == ["deep.csv"]


def test_paths_outside_the_inbox_are_ignored(tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    tracker, clock = tracker_for(inbox)
    write(tmp_path / "outside.jsonl", b"x", clock)
    tracker.changed(tmp_path / "outside.jsonl")
    tracker.rescan(tmp_path)
    assert settle(tracker, clock) == []


def test_watch_imports_no_ml_or_ui_code():
    code = "import sys, appliance.data.watch; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded = set(out.stdout.split())
    for heavy in ("torch", "transformers", "textual", "tui", "pypdf", "docx", "appliance.data.ingest"):
        assert heavy not in loaded, f"import appliance.data.watch loaded {heavy}"


# --- the property: exactly one record set per stable file content --------------------------

NAMES = ["a.jsonl", "b.jsonl", "with space.jsonl"]


def chat_lines(tag: str, n: int) -> bytes:
    return "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"{tag} q{i}"}, {"role": "assistant", "content": f"{tag} a{i}"}]}
        )
        + "\n"
        for i in range(n)
    ).encode()


slow_write = st.tuples(
    st.just("write"),
    st.sampled_from(NAMES),
    st.integers(1, 3),
    st.lists(st.tuples(st.floats(0.01, 0.99), st.floats(0, QUIET * 0.9), st.booleans()), min_size=1, max_size=6),
    st.booleans(),
)
save_by_rename = st.tuples(st.just("save"), st.sampled_from(NAMES), st.integers(1, 3), st.booleans())
move_over = st.tuples(st.just("move"), st.sampled_from(NAMES), st.sampled_from(NAMES), st.booleans())
delete = st.tuples(st.just("delete"), st.sampled_from(NAMES), st.booleans())
duplicate = st.tuples(st.just("duplicate"), st.sampled_from(NAMES), st.integers(1, 4))
wait = st.tuples(st.just("wait"), st.floats(0, QUIET * 3))
rescan = st.tuples(st.just("rescan"))
# slow writes are where partial files come from: draw them most often
operations = st.lists(
    st.one_of(slow_write, slow_write, slow_write, save_by_rename, move_over, delete, duplicate, wait, rescan),
    min_size=1,
    max_size=25,
)


class Model:
    """The test's side: a real inbox, the tracker, the real ingest, and what was written."""

    def __init__(self, root: Path, closes: bool):
        self.home = create_home(root / "home", "none")
        self.inbox = self.home.inbox
        self.tracker, self.clock = tracker_for(self.inbox, closes=closes, grace=QUIET * 2)
        self.complete: set[bytes] = set()  # every complete content written
        self.versions = 0
        self.touched: set[str] = set()  # names changed since they were last reported

    def tick(self, seconds: float) -> None:
        self.clock.now += seconds
        ready = self.tracker.poll()
        for path in ready:  # exactly once: never reported again without a change in between
            assert path.name in self.touched, f"{path.name} reported twice for one change"
            self.touched.discard(path.name)
        ingest_paths(self.home, ready)

    def content(self, name: str, lines: int) -> bytes:
        self.versions += 1
        data = chat_lines(f"{name} v{self.versions}", lines)
        self.complete.add(data)
        return data

    def apply(self, op: tuple) -> None:
        getattr(self, "op_" + op[0])(*op[1:])

    def op_write(self, name: str, lines: int, pieces: list[tuple[float, float, bool]], events: bool) -> None:
        """Truncate and write in chunks, pausing (less than the quiet period) between them."""
        path, data = self.inbox / name, self.content(name, lines)
        self.touched.add(name)
        cuts = sorted({int(f * len(data)) for f, _, _ in pieces} - {0}) + [len(data)]
        write(path, b"", self.clock)
        start = 0
        for cut, (_, pause, rescan_now) in zip(cuts, pieces + [(0, 0, False)]):
            write(path, data[start:cut], self.clock, mode="ab")
            start = cut
            if events:
                self.tracker.changed(path, wrote=True)
            if rescan_now:
                self.tracker.rescan()
            self.tick(pause)
        if events:
            self.tracker.closed(path)

    def op_save(self, name: str, lines: int, events: bool) -> None:
        temp = self.inbox / f".goutputstream-{self.versions}"
        self.touched.add(name)
        write(temp, self.content(name, lines), self.clock)
        os.replace(temp, self.inbox / name)
        if events:
            self.tracker.moved(temp, self.inbox / name)

    def op_move(self, src: str, dest: str, events: bool) -> None:
        if src != dest and (self.inbox / src).exists():
            self.touched.update((src, dest))
            os.replace(self.inbox / src, self.inbox / dest)
            if events:
                self.tracker.moved(self.inbox / src, self.inbox / dest)

    def op_delete(self, name: str, events: bool) -> None:
        if (self.inbox / name).exists():
            self.touched.add(name)
            (self.inbox / name).unlink()
            if events:
                self.tracker.gone(self.inbox / name)

    def op_duplicate(self, name: str, times: int) -> None:
        for _ in range(times):
            self.tracker.changed(self.inbox / name)

    def op_wait(self, seconds: float) -> None:
        self.tick(seconds)

    def op_rescan(self) -> None:
        self.tracker.rescan()

    def finish(self) -> None:
        """What the periodic rescan and the passing of time do in the end."""
        self.tracker.rescan()
        for _ in range(3):
            self.tick(QUIET * 2.5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, closes=st.booleans())
def test_store_holds_exactly_one_record_set_per_stable_content(ops: list[tuple], closes: bool):
    with tempfile.TemporaryDirectory() as tmp:
        model = Model(Path(tmp), closes)
        for op in ops:
            model.apply(op)
        model.finish()
        with Store(model.home.store_db) as store:
            documents = {row[0]: row[1] for row in store.db.execute("SELECT sha256, path FROM documents")}
            current = dict(store.db.execute("SELECT path, sha256 FROM versions WHERE status='current'").fetchall())
            linked = {
                row[0]
                for row in store.db.execute(
                    "SELECT DISTINCT r.record_hash FROM doc_records r JOIN versions v ON v.sha256 = r.doc_sha256 "
                    "WHERE v.status = 'current'"
                )
            }
            active = set(store.active_record_hashes())
        complete = {hashlib.sha256(c).hexdigest() for c in model.complete}
        # none partial: every document the store ever took is a complete content
        assert set(documents) <= complete
        # none missed: every file in the inbox is stored as its current content
        for path in model.inbox.iterdir():
            if not is_temporary(path.name):
                assert current.get(path.name) == hashlib.sha256(path.read_bytes()).hexdigest(), path.name
        # the active records are exactly those of the current versions (deleted files keep theirs)
        assert active == linked
        assert not (model.inbox.parent / "quarantine").exists() or not any(
            (model.inbox.parent / "quarantine").iterdir()
        )
