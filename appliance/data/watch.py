"""Stage 1, watch: say which inbox paths are complete and new, each exactly once.

Two layers:

* :class:`StabilityTracker`, a pure state machine. Events ("something happened at
  this path") go in; :meth:`StabilityTracker.poll` returns the paths that have been
  stable for the quiet period and were not reported in that state before. Time
  comes from an injected clock and file state from an injected ``stat``, so tests
  (hypothesis among them) drive it step by step without sleeping.
* :class:`InboxWatcher`, a thin adapter that feeds the tracker from a watchdog
  observer (inotify, or polling for network file systems), ticks it from one
  thread and hands stable paths to a plain callback.

A file is stable when its (size, mtime, inode) has not changed for ``quiet_seconds``.
Where the observer reports close-after-write (inotify), a file written to and not
yet closed is also waited for, up to ``open_grace_seconds``: a download that
stalls longer than the quiet period while holding the file open is not taken
half-done. Editor and download temp files are never reported; a save that writes
a temp file and renames it over the real name is seen as a change of the real
name. A full rescan at start and every ``rescan_seconds`` reconciles anything the
event stream missed (the watcher was down, the kernel queue overflowed).

This module imports no ML or UI code (tests/test_watch.py checks it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog import events as ev
from watchdog.events import FileSystemEventHandler

from appliance.home.config import WatchSection

log = logging.getLogger(__name__)

# Editors and copy tools write these while a save is in progress; they are never data.
TEMP_SUFFIXES = (".swp", ".swx", ".swo", "~", ".part", ".tmp", ".crdownload", ".partial", ".download")
TEMP_PREFIXES = (".", "~$", ".goutputstream-")

Signature = tuple[int, int, int]  # size, mtime_ns, inode
Clock = Callable[[], float]
Stat = Callable[[Path], "Signature | None"]


def is_temporary(name: str) -> bool:
    """Hidden files, editor swap and backup files, partial downloads."""
    return name.startswith(TEMP_PREFIXES) or name.endswith(TEMP_SUFFIXES)


def signature(path: Path) -> Signature | None:
    """The file's state without following a link; None when it is gone."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def list_inbox(root: Path) -> tuple[list[Path], int]:
    """Every candidate path under ``root`` (files, links, anything not a folder), and
    how many temp entries were passed over. Links are listed, never followed."""
    found: list[str] = []  # plain strings until the end: pathlib is slow for 10,000 files
    ignored = 0
    stack = [os.fspath(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if is_temporary(entry.name):
                ignored += 1
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                found.append(entry.path)
    return [Path(p) for p in sorted(found)], ignored


@dataclass
class _Pending:
    seen: Signature | None  # state at the last look; None until first looked at
    since: float  # when that state was first seen
    writing: bool = False  # a write was reported and no close-after-write since


class StabilityTracker:
    """The watcher's rules, free of threads, real time and watchdog."""

    def __init__(
        self,
        root: Path,
        quiet: float,
        *,
        closes_reported: bool = False,
        open_grace: float = 60.0,
        clock: Clock = time.monotonic,
        stat: Stat = signature,
        lister: Callable[[Path], tuple[list[Path], int]] = list_inbox,
    ):
        self.root = root
        self.quiet = quiet
        self.closes_reported = closes_reported
        self.open_grace = open_grace
        self.clock = clock
        self.stat = stat
        self.lister = lister
        self._pending: dict[Path, _Pending] = {}
        self._reported: dict[Path, Signature] = {}

    # --- events ---------------------------------------------------------------------
    def changed(self, path: Path, *, wrote: bool = False) -> None:
        """Something happened at ``path`` (created, written, attributes, moved here)."""
        if not self._watched(path):
            return
        pending = self._pending.setdefault(path, _Pending(None, self.clock()))
        pending.since = self.clock()
        if wrote and self.closes_reported:
            pending.writing = True

    def closed(self, path: Path) -> None:
        """The writer closed the file (inotify IN_CLOSE_WRITE)."""
        if not self._watched(path):
            return
        pending = self._pending.setdefault(path, _Pending(None, self.clock()))
        pending.since = self.clock()
        pending.writing = False

    def gone(self, path: Path) -> None:
        """Deleted or moved away: a later file at this path is new again."""
        self._pending.pop(path, None)
        self._reported.pop(path, None)

    def moved(self, src: Path, dest: Path) -> None:
        """A rename: a temp-then-rename save lands here with the file already closed."""
        self.gone(src)
        self.closed(dest)

    def rescan(self, under: Path | None = None) -> None:
        """List the folder and reconcile: new or changed paths become pending, and
        paths no longer there are forgotten (so they count again if they return)."""
        top = under or self.root
        if not top.is_relative_to(self.root):
            return
        paths, _ = self.lister(top)
        listed = set(paths)
        now = self.clock()
        for path in paths:
            if path in self._pending or not self._watched(path):
                continue
            current = self.stat(path)
            if current is not None and self._reported.get(path) != current:
                self._pending[path] = _Pending(current, now)
        for path in [p for p in self._reported if p not in listed and p.is_relative_to(top)]:
            del self._reported[path]

    # --- time passing -----------------------------------------------------------------
    def poll(self) -> list[Path]:
        """Look at every pending path; return those now stable and not yet reported."""
        now = self.clock()
        ready: list[Path] = []
        for path, pending in list(self._pending.items()):
            current = self.stat(path)
            if current is None:  # deleted before it became stable: nothing to report
                del self._pending[path]
            elif current != pending.seen:
                pending.seen, pending.since = current, now
            elif self._settled(pending, now):
                del self._pending[path]
                if self._reported.get(path) != current:
                    self._reported[path] = current
                    ready.append(path)
        return sorted(ready)

    def unreport(self, paths: Iterable[Path]) -> None:
        """Forget that these were reported (their consumer failed): the next rescan offers them again."""
        for path in paths:
            self._reported.pop(path, None)

    @property
    def pending(self) -> set[Path]:
        return set(self._pending)

    def _settled(self, pending: _Pending, now: float) -> bool:
        quiet_for = now - pending.since
        if pending.writing and quiet_for < self.open_grace:
            return False
        return quiet_for >= self.quiet

    def _watched(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        return bool(rel.parts) and not any(is_temporary(part) for part in rel.parts)


# --- the watchdog adapter ---------------------------------------------------------------

OnStable = Callable[[list[Path]], None]
OnError = Callable[[BaseException], None]


def _log_error(exc: BaseException) -> None:
    log.error("inbox watcher: %s", exc, exc_info=exc)


class InboxWatcher:
    """Watch ``inbox`` with watchdog and call ``on_stable(paths)`` from one thread.

    ``on_stable`` may take as long as it needs (an ingest); events keep arriving
    meanwhile. An exception from it is passed to ``on_error`` and the paths are
    offered again at the next rescan; the watcher keeps running.
    """

    def __init__(
        self,
        inbox: Path,
        on_stable: OnStable,
        settings: WatchSection | None = None,
        on_error: OnError = _log_error,
        tick_seconds: float | None = None,
    ):
        self.inbox = inbox
        self.settings = settings or WatchSection()
        self.on_stable = on_stable
        self.on_error = on_error
        self.tick = tick_seconds or min(0.5, self.settings.quiet_seconds / 4)
        self.tracker: StabilityTracker | None = None
        self.polling = self.settings.polling
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._next_rescan = 0.0

    def start(self) -> InboxWatcher:
        self.tracker = StabilityTracker(
            self.inbox, self.settings.quiet_seconds, open_grace=self.settings.open_grace_seconds
        )
        self._observer = self._start_observer()
        self.tracker.closes_reported = _reports_closes(self._observer)
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._observer:
            self._observer.stop()
            self._observer.join()

    def __enter__(self) -> InboxWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_observer(self) -> Any:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        handler = _Handler(self)
        if not self.polling:
            observer = Observer()
            try:
                observer.schedule(handler, os.fspath(self.inbox), recursive=True, event_filter=_event_filter())
                observer.start()
                return observer
            except OSError as exc:  # e.g. the inotify watch limit: polling still works
                log.warning("inbox watcher: %s; falling back to polling", exc)
                self.polling = True
        observer = PollingObserver(timeout=self.settings.poll_seconds)
        observer.schedule(handler, os.fspath(self.inbox), recursive=True)
        observer.start()
        return observer

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception as exc:  # never let one bad step end the watcher
                self.on_error(exc)
            if self._stop.wait(self.tick):
                return

    def _step(self) -> None:
        assert self.tracker is not None
        with self._lock:
            if time.monotonic() >= self._next_rescan:  # the first step is the start-up rescan
                self.tracker.rescan()
                self._next_rescan = time.monotonic() + self.settings.rescan_seconds
            ready = self.tracker.poll()
        if not ready:
            return
        try:
            self.on_stable(ready)
        except Exception as exc:
            with self._lock:
                self.tracker.unreport(ready)
            self.on_error(exc)

    def event(self, kind: str, src: str, dest: str = "", is_directory: bool = False) -> None:
        """One watchdog event, reduced to the tracker's vocabulary."""
        if self.tracker is None:
            return
        with self._lock:
            if is_directory:  # files may land before a new folder is watched; a folder may leave whole
                for folder in {src, dest} - {""}:
                    self.tracker.rescan(Path(folder))
                return
            path = Path(src)
            if kind == "moved":
                self.tracker.moved(path, Path(dest))
            elif kind == "deleted":
                self.tracker.gone(path)
            elif kind == "closed":
                self.tracker.closed(path)
            elif kind in ("created", "modified", "attrib"):
                self.tracker.changed(path, wrote=kind == "modified")


def _event_filter() -> list[type]:
    """What the inotify observer is asked for: not open/close-without-write (our own reads)."""
    return [
        ev.FileCreatedEvent,
        ev.FileModifiedEvent,
        ev.FileAttribEvent,
        ev.FileClosedEvent,
        ev.FileMovedEvent,
        ev.FileDeletedEvent,
        ev.DirCreatedEvent,
        ev.DirMovedEvent,
        ev.DirDeletedEvent,
    ]


def _reports_closes(observer: Any) -> bool:
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return False
    return isinstance(observer, InotifyObserver)


class _Handler(FileSystemEventHandler):
    """watchdog's handler (``dispatch``), forwarding every event to :meth:`InboxWatcher.event`."""

    def __init__(self, watcher: InboxWatcher):
        self.watcher = watcher

    def dispatch(self, event: Any) -> None:
        self.watcher.event(
            event.event_type, os.fsdecode(event.src_path), os.fsdecode(event.dest_path or ""), event.is_directory
        )
