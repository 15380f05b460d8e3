"""Stage 2, ingest: turn stable inbox files into validated records in the store.

Files stay in the inbox once ingested. A file none of whose content is usable is
moved to ``quarantine/`` with a sidecar giving the reason(s) in plain words; in a
line-oriented file (.jsonl, .csv) the valid lines are kept and each invalid one is
reported by number. Work is proportional to what changed: a path whose size,
mtime and inode match the last look is not read again, and :func:`ingest_paths`
(what the watcher calls) touches only the paths it is given.

One file's problem never stops the others: every failure becomes a reason in the
report, against that file.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.contract.events import Emit, Message, Progress, StageFinished, StageStarted, ignore
from appliance.data.ingest import chat_jsonl, csv_pairs, passages, pdf, text, word
from appliance.data.ingest.parsed import FileError, Parsed, first_line
from appliance.data.ingest.quarantine import display_name, quarantine
from appliance.data.ingest.records import Record
from appliance.data.ingest.store import FileState, Store
from appliance.data.ingest.tokens import BaseTokenizer, chunk_shape
from appliance.data.watch import is_temporary, list_inbox
from appliance.home.catalog import of_path, problem
from appliance.home.config import DataSection, Settings, load
from appliance.home.fsutil import sha256_file, write_text_atomic
from appliance.home.paths import Home

STAGE = "ingest"
PARSERS: dict[str, Callable[[Path, DataSection], Parsed]] = {
    suffix: module.parse for module in (chat_jsonl, csv_pairs, text, pdf, word) for suffix in module.SUFFIXES
}
LINE_ORIENTED = {".jsonl", ".csv", ".tsv"}  # read a line at a time, so no limit on the whole file
TEXT_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".markdown"}
SNIFF_BYTES = 8192
MAX_REASONS = 20


@dataclass
class Quarantined:
    file: str
    reasons: list[str]


@dataclass
class Note:
    file: str
    reason: str


@dataclass
class IngestReport:
    accepted: int = 0  # new records stored
    duplicates: int = 0  # records already in the store, or repeated within a file
    files: int = 0  # files read and stored this time
    unchanged: int = 0  # files skipped: same size, mtime and inode as when last read
    duplicate_files: int = 0  # files whose exact bytes were already stored (a copy, a change undone)
    ignored: int = 0  # editor temp files, hidden files, partial downloads
    vanished: int = 0  # gone between being listed and being read
    skipped: int = 0  # invalid lines dropped from files that were kept
    truncated: int = 0  # kept examples longer than data.max_tokens; training cuts them
    tokens: int = 0  # tokens in the records stored (counted when a base tokenizer is there)
    indexed: int = 0  # documents whose passages entered the collection's passage index
    formats: dict[str, int] = field(default_factory=dict)  # records per format in the files stored
    superseded: list[str] = field(default_factory=list)  # files whose earlier version was replaced
    skipped_lines: list[str] = field(default_factory=list)  # "file: line N: reason" (first 100 a file)
    quarantined: list[Quarantined] = field(default_factory=list)
    waiting: list[Note] = field(default_factory=list)  # left in the inbox for a later ingest
    failed: list[Note] = field(default_factory=list)  # unexpected errors; the file stays put
    collections: dict[str, dict] = field(default_factory=dict)  # per collection: accepted, files, quarantined

    def to_dict(self) -> dict:
        return asdict(self)


def inbox_files(home: Home) -> list[Path]:
    """The files of ``home``'s collection (not those of collections in its sub-folders)."""
    return [p for p in list_inbox(home.inbox)[0] if p.parent == home.inbox]


def ingest(home: Home, emit: Emit = ignore, settings: Settings | None = None) -> IngestReport:
    """Scan the inbox once ('appliance ingest'; a watcher's start-up rescan): every
    collection, or only ``home``'s when it is a collection's view."""
    paths, ignored = list_inbox(home.top.inbox)
    with Ingestors(home, settings, emit) as ingestors:
        return ingestors.run(paths, ignored, only=home.collection or None)


def ingest_paths(
    home: Home, paths: Sequence[Path], emit: Emit = ignore, settings: Settings | None = None
) -> IngestReport:
    """Ingest just these inbox paths (the ones a watcher found stable)."""
    with Ingestors(home, settings, emit) as ingestors:
        return ingestors.run(paths, only=home.collection or None)


def split(home: Home, paths: Sequence[Path]) -> tuple[dict[str, list[Path]], list[Note]]:
    """Inbox paths by collection (their folder); files in a folder that cannot name a
    collection stay where they are, each with the reason."""
    groups: dict[str, list[Path]] = {}
    misplaced: list[Note] = []
    for path in paths:
        try:
            collection = of_path(home, path)
        except ValueError:
            continue  # not under the inbox
        why = problem(collection)
        if why is not None:
            misplaced.append(Note(display_name(os.path.relpath(path, home.top.inbox)), f"{why}; rename the folder"))
        else:
            groups.setdefault(collection, []).append(path)
    return groups, misplaced


class Ingestors:
    """One :class:`Ingestor` per collection (each with its own store), one tokenizer for all."""

    def __init__(self, home: Home, settings: Settings | None = None, emit: Emit = ignore):
        self.home = home.top
        self.settings = settings or load(home.config)
        self.emit = emit
        self._by: dict[str, Ingestor] = {}
        self._tokens: BaseTokenizer | None = None

    def __enter__(self) -> Ingestors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, collection: str) -> Ingestor:
        if collection not in self._by:
            if self._tokens is None:
                self._tokens = BaseTokenizer(self.home.base(self.settings.base.name))
            self._by[collection] = Ingestor(self.home.scoped(collection), self.settings, self.emit, self._tokens)
        return self._by[collection]

    def run(self, paths: Sequence[Path], ignored: int = 0, only: str | None = None) -> IngestReport:
        groups, misplaced = split(self.home, paths)
        if only is not None:  # one collection's view: its files only
            groups, misplaced = {only: groups.get(only, [])}, []
        else:
            groups.setdefault("", [])  # the shared collection reports even when nothing is new
        first = min(groups)  # temp files passed over are counted once
        reports = {c: self.get(c).run(found, ignored if c == first else 0) for c, found in sorted(groups.items())}
        report = combine(reports)
        report.waiting += misplaced
        for note in misplaced:
            self.emit(Message(STAGE, f"{note.file}: left in the inbox: {note.reason}", level="warning"))
        return report

    def close(self) -> None:
        for ingestor in self._by.values():
            ingestor.close()


def combine(reports: dict[str, IngestReport]) -> IngestReport:
    """One report for several collections; file names carry their collection's folder."""
    total = IngestReport()
    for collection, report in reports.items():
        prefix = f"{collection}/" if collection else ""
        for name in (
            "accepted",
            "duplicates",
            "files",
            "unchanged",
            "duplicate_files",
            "ignored",
            "vanished",
            "skipped",
            "truncated",
            "tokens",
            "indexed",
        ):
            setattr(total, name, getattr(total, name) + getattr(report, name))
        for fmt, n in report.formats.items():
            total.formats[fmt] = total.formats.get(fmt, 0) + n
        total.superseded += [prefix + f for f in report.superseded]
        total.skipped_lines += [prefix + f for f in report.skipped_lines]
        total.quarantined += [Quarantined(prefix + q.file, q.reasons) for q in report.quarantined]
        total.waiting += [Note(prefix + n.file, n.reason) for n in report.waiting]
        total.failed += [Note(prefix + n.file, n.reason) for n in report.failed]
        if collection or len(reports) > 1:
            total.collections[collection] = {
                "accepted": report.accepted,
                "files": report.files,
                "quarantined": len(report.quarantined),
            }
    return total


class Ingestor:
    """Ingests batches of inbox paths, one batch at a time, from any one thread at a time.

    A watcher keeps one for its whole life: the tokenizer loads once, and the store
    stays open (closing SQLite's last connection checkpoints the log, which would
    otherwise be paid on every file).
    """

    def __init__(
        self, home: Home, settings: Settings | None = None, emit: Emit = ignore, tokens: BaseTokenizer | None = None
    ):
        self.home = home
        self.inbox = os.fspath(home.inbox) + os.sep
        self.settings = settings or load(home.config)
        self.emit = emit
        self.tokens = tokens or BaseTokenizer(home.base(self.settings.base.name))
        self._store: Store | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Ingestor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def run(self, paths: Sequence[Path], ignored: int = 0) -> IngestReport:
        with self._lock:
            started = time.monotonic()
            report = IngestReport(ignored=ignored)
            self.emit(StageStarted(STAGE, total=len(paths), description="Reading the inbox"))
            if self._store is None:
                self._store = Store(self.home.store_db, any_thread=True)
            batch = _Batch(self, self._store, report, self._store.file_states() if len(paths) > 100 else None)
            shown = 0.0
            for done, path in enumerate(paths, start=1):
                batch.guarded(path)
                if time.monotonic() - shown > 0.1 or done == len(paths):  # a full scan of a big inbox
                    self.emit(Progress(STAGE, completed=done, total=len(paths)))
                    shown = time.monotonic()
            self._index(report)
            self.emit(StageFinished(STAGE, summary=_summary(report), seconds=time.monotonic() - started))
            return report

    def _index(self, report: IngestReport) -> None:
        """The passage index follows the store (the changed documents only); a failure to write it
        is one line, never a failed ingest: the store has the data, and the index is rebuilt from it."""
        assert self._store is not None
        try:
            synced = passages.sync(self.home, self._store)
        except (OSError, sqlite3.Error) as exc:
            self.emit(Message(STAGE, f"passage index {self.home.passage_index}: not updated: {exc}", level="warning"))
            return
        report.indexed += len(synced.added)


@dataclass
class _Batch:
    """One run over a list of paths: the store connection and the report being filled."""

    ingestor: Ingestor
    store: Store
    report: IngestReport
    known: dict[str, FileState] | None  # every path's last state, preloaded for a large batch

    @property
    def data(self) -> DataSection:
        return self.ingestor.settings.data

    def guarded(self, path: Path) -> None:
        """One path; whatever goes wrong is reported against it and the batch goes on."""
        try:
            self.one(path)
        except Exception as exc:  # noqa: BLE001  (R5: one file never stops the others)
            shown = display_name(os.path.relpath(path, self.ingestor.home.inbox))
            self.report.failed.append(
                Note(
                    shown,
                    f"unexpected error while ingesting it ({type(exc).__name__}: "
                    f"{first_line(exc)}); it stays in the inbox",
                )
            )
            self._say(f"{shown}: unexpected error: {exc}", "error")

    def one(self, path: Path) -> None:
        full = os.fspath(path)
        if not full.startswith(self.ingestor.inbox):
            return  # not ours
        rel = full[len(self.ingestor.inbox) :]
        if "/" in rel:
            return  # a sub-folder is another collection (Ingestors routes each path to its own)
        if any(is_temporary(part) for part in rel.split("/")):
            self.report.ignored += 1
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.report.vanished += 1
            return
        refusal = _refusal(rel, st, self.data)
        if refusal:
            self.refuse(path, rel, [refusal])
            return
        known = self.known.get(rel) if self.known is not None else self.store.file_state(rel)
        if known and (known.size, known.mtime_ns, known.inode) == (st.st_size, st.st_mtime_ns, st.st_ino):
            self.report.unchanged += 1
            return
        self.read(path, rel, st)

    def read(self, path: Path, rel: str, st: os.stat_result) -> None:
        problems: list[str] = []
        parsed: Parsed | None = None
        try:
            state = FileState(st.st_size, st.st_mtime_ns, st.st_ino, sha256_file(path))
            if self.store.has_document(state.sha256):
                self.report.duplicate_files += 1
                self._stored(rel, self.store.put(rel, state).superseded)
                return
            parsed = self.parse(path, rel)
        except FileNotFoundError:
            self.report.vanished += 1
            return
        except FileError as exc:
            problems = [str(exc)]
        except OSError as exc:
            problems = [f"it cannot be read ({exc.strerror or exc})"]
        if parsed is not None and not parsed.records:
            problems = _reasons(parsed)
        if _changed(path, st):  # what was read is not what is there now: judge it when stable
            self.report.waiting.append(Note(rel, "it changed while being read; it will be read again once stable"))
        elif problems:
            self.refuse(path, rel, problems)
        elif parsed is not None:
            self.keep(rel, state, parsed)

    def parse(self, path: Path, rel: str) -> Parsed | None:
        """Records with their token counts; None when a document must wait for a tokenizer."""
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES and _looks_binary(path):
            raise FileError(f"it holds binary data, not text (a {suffix} file must be UTF-8 text)")
        parsed = PARSERS[suffix](path, self.data)
        if parsed.text is not None:
            return self._chunked(rel, parsed)
        if self.ingestor.tokens.available:
            self._check_lengths(parsed)
        return parsed

    def keep(self, rel: str, state: FileState, parsed: Parsed) -> None:
        if parsed.text is not None:  # the whole text, before the chunks are stored: the study stage reads it
            write_text_atomic(self.ingestor.home.document_text(state.sha256), parsed.text)
        added = self.store.put(rel, state, parsed.format, parsed.records, parsed.tokens)
        report = self.report
        report.files += 1
        report.accepted += added.new
        report.duplicates += added.duplicates
        report.skipped += parsed.error_count
        report.tokens += sum(n for n in parsed.tokens or [] if n)
        report.skipped_lines.extend(f"{rel}: {error}" for error in parsed.errors)
        formats = Counter(record.format or parsed.format for record in parsed.records)
        for fmt, n in formats.items():
            report.formats[fmt] = report.formats.get(fmt, 0) + n
        self._stored(rel, added.superseded)
        if parsed.error_count:
            self._say(
                f"{rel}: kept {len(parsed.records)} record(s), skipped {parsed.error_count} "
                f"(first: {parsed.errors[0]})",
                "warning",
            )

    def refuse(self, path: Path, rel: str, reasons: list[str]) -> None:
        shown = display_name(rel)
        moved = quarantine(self.ingestor.home.quarantine, path, rel, reasons)
        if moved is None:
            reasons = [*reasons, "it could not be moved to quarantine, so it stays in the inbox"]
        self.report.quarantined.append(Quarantined(shown, reasons))
        self._say(f"{shown}: quarantined: {reasons[0]}", "warning")

    def _stored(self, rel: str, superseded: str | None) -> None:
        if superseded:
            self.report.superseded.append(rel)

    def _chunked(self, rel: str, parsed: Parsed) -> Parsed | None:
        tokens = self.ingestor.tokens
        if not tokens.available:
            self.report.waiting.append(
                Note(
                    rel,
                    f"documents are cut into chunks by the base model's tokenizer, and there is none: {tokens.problem}",
                )
            )
            return None
        size, overlap = chunk_shape(self.data.chunk_tokens, self.data.chunk_overlap, self.data.max_tokens)
        parsed.tokens = []
        for number, (piece, count) in enumerate(tokens.chunks(parsed.text or "", size, overlap), start=1):
            parsed.add(number, Record("text", {"text": piece}, format=parsed.format))
            parsed.tokens.append(count)
        return parsed

    def _check_lengths(self, parsed: Parsed) -> None:
        """Count each example's tokens; drop (and report) those the base model's template
        refuses, and those too long when so configured."""
        limit, reject = self.data.max_tokens, self.data.too_long == "reject"
        kept: list[tuple[Record, int, int]] = []
        for record, line, n in zip(parsed.records, parsed.lines, self.ingestor.tokens.count(parsed.records)):
            if n is None:
                parsed.reject(line, "the base model's chat template cannot render this conversation")
            elif n > limit and reject:
                parsed.reject(
                    line, f"{n} tokens, longer than the {limit}-token training context (data.too_long = reject)"
                )
            else:
                self.report.truncated += n > limit
                kept.append((record, line, n))
        parsed.errors.sort(key=lambda e: e.line)
        parsed.records = [r for r, _, _ in kept]
        parsed.lines = [line for _, line, _ in kept]
        parsed.tokens = [n for _, _, n in kept]

    def _say(self, text: str, level: str) -> None:
        self.ingestor.emit(Message(STAGE, text, level=level))


def _refusal(rel: str, st: os.stat_result, data: DataSection) -> str | None:
    """Why a path is refused before it is opened, or None."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename it"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link, which the appliance never follows; copy the file itself into the inbox"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a pipe, socket or device)"
    suffix = os.path.splitext(rel)[1].lower()
    if suffix not in PARSERS:
        return f"unsupported file type '{suffix or '(none)'}' (supported: {', '.join(sorted(PARSERS))})"
    if st.st_size == 0:
        return "the file is empty (0 bytes)"
    if suffix not in LINE_ORIENTED and st.st_size > data.max_file_bytes:
        return (
            f"it is {st.st_size:,} bytes, more than the {data.max_file_bytes:,}-byte limit for a file read "
            "whole (data.max_file_bytes)"
        )
    return None


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\x00" in handle.read(SNIFF_BYTES)


def _changed(path: Path, before: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return True
    return (now.st_size, now.st_mtime_ns, now.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino)


def _reasons(parsed: Parsed) -> list[str]:
    if not parsed.errors:
        return ["the file holds no records"]
    reasons = [str(error) for error in parsed.errors[:MAX_REASONS]]
    if parsed.error_count > MAX_REASONS:
        reasons.append(f"and {parsed.error_count - MAX_REASONS} more unusable lines")
    return reasons


def _summary(report: IngestReport) -> str:
    text = (
        f"{report.accepted} new records from {report.files} file(s), {report.duplicates} duplicate(s), "
        f"{len(report.quarantined)} quarantined"
    )
    if report.waiting:
        text += f", {len(report.waiting)} waiting"
    return text
