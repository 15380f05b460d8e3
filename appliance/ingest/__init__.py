"""Stage 2, ingest: turn stable inbox files into validated records in the store.

Files stay in the inbox once ingested. A file none of whose content is usable is
moved to ``quarantine/`` with a sidecar giving the reason(s) in plain words. Work
is proportional to what changed: a file whose size and mtime match the last scan
is not read again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..events import Emit, Message, Progress, StageFinished, StageStarted, ignore
from ..fsutil import sha256_file, write_json_atomic
from ..paths import Home
from . import chat_jsonl
from .parsed import Parsed
from .store import Store

STAGE = "ingest"
PARSERS = {suffix: module for module in (chat_jsonl,) for suffix in module.SUFFIXES}
# Editors and copy tools write these while a save is in progress; they are never data.
TEMP_SUFFIXES = (".swp", ".swx", ".swo", "~", ".part", ".tmp", ".crdownload", ".partial")
TEMP_PREFIXES = (".", "~$", ".goutputstream-")


@dataclass
class Quarantined:
    file: str
    reasons: list[str]


@dataclass
class IngestReport:
    accepted: int = 0          # new records stored
    duplicates: int = 0        # records already in the store
    files: int = 0             # files ingested this time
    unchanged: int = 0         # files skipped because they were ingested before
    ignored: int = 0           # editor temp files and the like
    skipped_lines: list[str] = field(default_factory=list)   # "file: line N: reason"
    quarantined: list[Quarantined] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIXES) or name.endswith(TEMP_SUFFIXES)


def inbox_files(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.rglob("*") if p.is_file() or p.is_symlink())


def ingest(home: Home, emit: Emit = ignore) -> IngestReport:
    started = time.monotonic()
    report = IngestReport()
    candidates = inbox_files(home.inbox)
    emit(StageStarted(STAGE, total=len(candidates), description="Reading the inbox"))
    store = Store(home.store_db)
    try:
        for done, path in enumerate(candidates, start=1):
            _ingest_one(home, store, path, report, emit)
            emit(Progress(STAGE, completed=done, total=len(candidates)))
    finally:
        store.close()
    summary = (f"{report.accepted} new records from {report.files} file(s), {report.duplicates} duplicate(s), "
               f"{len(report.quarantined)} quarantined")
    emit(StageFinished(STAGE, summary=summary, seconds=time.monotonic() - started))
    return report


def _ingest_one(home: Home, store: Store, path: Path, report: IngestReport, emit: Emit) -> None:
    rel = path.relative_to(home.inbox).as_posix()
    if any(is_temporary(part) for part in Path(rel).parts):
        report.ignored += 1
        return
    if path.is_symlink():
        # Never follow links: one could point at any file on the machine.
        _reject(home, path, rel, ["it is a symbolic link; copy the file itself into the inbox"], report, emit,
                move=False)
        return
    stat = path.stat()
    known = store.file_state(rel)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        report.unchanged += 1
        return
    parser = PARSERS.get(path.suffix.lower())
    if parser is None:
        supported = ", ".join(sorted(PARSERS))
        _reject(home, path, rel, [f"unsupported file type '{path.suffix or '(none)'}' (supported: {supported})"],
                report, emit)
        return
    sha = sha256_file(path)
    if store.has_document(sha):
        store.remember_file(rel, stat.st_size, stat.st_mtime_ns, sha)
        report.unchanged += 1
        return
    parsed: Parsed = parser.parse(path)
    if not parsed.records:
        reasons = [str(e) for e in parsed.errors[:20]] or ["the file holds no records"]
        _reject(home, path, rel, reasons, report, emit)
        return
    new, dup = store.add_document(sha, rel, parsed.format, stat.st_size, parsed.records,
                                  supersedes=known[2] if known else None)
    store.remember_file(rel, stat.st_size, stat.st_mtime_ns, sha)
    report.files += 1
    report.accepted += new
    report.duplicates += dup
    for error in parsed.errors:
        report.skipped_lines.append(f"{rel}: {error}")
        emit(Message(STAGE, f"{rel}: skipped {error}", level="warning"))


def _reject(home: Home, path: Path, rel: str, reasons: list[str], report: IngestReport, emit: Emit,
            move: bool = True) -> None:
    """Move a file with nothing usable to quarantine/ beside a sidecar of reasons."""
    report.quarantined.append(Quarantined(rel, reasons))
    emit(Message(STAGE, f"{rel}: quarantined: {reasons[0]}", level="warning"))
    home.quarantine.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = home.quarantine / f"{stamp}-{rel.replace('/', '__')}"
    write_json_atomic(target.with_name(target.name + ".reason.json"),
                      {"file": rel, "reasons": reasons, "quarantined_at": time.time()})
    if move:
        shutil.move(os.fspath(path), target)
    else:
        path.unlink()
