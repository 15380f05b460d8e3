"""The audit chain: ``audit.log``, append-only JSON lines, each holding the previous line's hash.

An entry is ``{"seq", "at", "user", "action", "details", "prev", "hash"}`` where
``hash`` is the sha256 of the entry's other fields (canonical JSON). Details hold
hashes, counts and identifiers, never document content. The latest ``seq:hash`` is
also written to the job journal (and into each version's lineage), so a log cut
short at the end is detected too, not only an edited, removed or reordered line.

Appends take an exclusive ``flock`` on the log, so the daemon, the CLI and the TUI
can all record without interleaving.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from appliance.home.journal import Journal
from appliance.home.paths import Home

GENESIS = "0" * 64
HEAD_KEY = "audit_head"
TAIL_BYTES = 1 << 16


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


# The API key an engine call acts for (set by appliance/home/keys.py around each call), so an entry
# says which person's key asked for it, beside the OS user the process runs as.
ACTING_KEY: ContextVar[str | None] = ContextVar("appliance_acting_key", default=None)


def append(home: Home, action: str, **details: Any) -> dict[str, Any]:
    """Append one entry (fsynced) and record the new head in the journal."""
    if (key := ACTING_KEY.get()) is not None:
        details.setdefault("key", key)
    if home.collection:  # work done in a collection says which
        details.setdefault("collection", home.collection)
    home.audit_log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(home.audit_log, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_entry(fd)
        entry: dict[str, Any] = {
            "seq": (last["seq"] + 1) if last else 1,
            "at": time.time(),
            "user": user(),
            "action": action,
            "details": details,
            "prev": last["hash"] if last else GENESIS,
        }
        entry["hash"] = entry_hash(entry)
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # keep a torn line on its own line
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        os.write(fd, (("\n" if torn else "") + line).encode("utf-8"))
        os.fsync(fd)
        _store_head(home, entry)
    finally:
        os.close(fd)  # closing releases the lock
    return entry


def head(home: Home) -> str | None:
    """``seq:hash`` of the latest entry as the journal knows it."""
    if not home.jobs_db.exists():
        return None
    with Journal(home.jobs_db) as journal:
        return journal.get_meta(HEAD_KEY)


def entries(home: Home) -> list[dict[str, Any]]:
    if not home.audit_log.exists():
        return []
    out = []
    for line in home.audit_log.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"unreadable": line[:80]})
    return out


def find(home: Home, action: str, **match: Any) -> list[dict[str, Any]]:
    """Entries of ``action`` whose details contain every ``match`` item."""
    return [
        e
        for e in entries(home)
        if e.get("action") == action and all(e.get("details", {}).get(k) == v for k, v in match.items())
    ]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    bad_line: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "bad_line": self.bad_line, "reason": self.reason}


def verify(home: Home) -> Verdict:
    """Check the chain end to end; name the first bad line (1-based)."""
    lines = home.audit_log.read_text(encoding="utf-8").splitlines() if home.audit_log.exists() else []
    prev, seq = GENESIS, 0
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            claimed = entry["hash"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return Verdict(False, number - 1, number, f"line {number} is not an audit entry")
        if entry_hash(entry) != claimed:
            return Verdict(
                False,
                number - 1,
                number,
                f"line {number} (seq {entry.get('seq')}) was edited: its hash does not match its content",
            )
        if entry.get("prev") != prev:
            return Verdict(
                False,
                number - 1,
                number,
                f"line {number} (seq {entry.get('seq')}) does not follow the "
                "line before it: a line was removed, inserted or reordered",
            )
        if entry.get("seq") != seq + 1:
            return Verdict(
                False,
                number - 1,
                number,
                f"line {number} has seq {entry.get('seq')}, expected {seq + 1}: lines were removed or reordered",
            )
        prev, seq = claimed, entry["seq"]
    known = head(home)
    if known:
        head_seq, head_hash = known.split(":", 1)
        if seq < int(head_seq):
            return Verdict(
                False,
                seq,
                seq + 1,
                f"the log ends at seq {seq} but the journal recorded seq {head_seq}: entries were cut off the end",
            )
        if seq == int(head_seq) and prev != head_hash:
            return Verdict(
                False, seq, seq, f"line {seq}: the last entry's hash differs from the one the journal recorded"
            )
    return Verdict(True, seq)


def _last_entry(fd: int) -> dict[str, Any] | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - TAIL_BYTES)
    data = os.pread(fd, size - start, start)
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    while lines:  # a torn last line (power cut mid-write) is skipped; verify reports it
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return None


def _store_head(home: Home, entry: dict[str, Any]) -> None:
    with Journal(home.jobs_db) as journal:
        journal.set_meta(HEAD_KEY, f"{entry['seq']}:{entry['hash']}")
