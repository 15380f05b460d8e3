"""Quarantine: a file with nothing usable leaves the inbox, never silently.

The file is moved into ``quarantine/`` as it is (a link stays a link and is never
followed) next to ``<name>.reason.json``, which gives the reasons in one plain
sentence each. The sidecar is written first: a crash between the two leaves the
reason behind, never a file with no explanation.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

from appliance.home.fsutil import write_json_atomic
from appliance.home.paths import quarantine_reason

MAX_NAME_BYTES = 180  # room for the time stamp, a counter and ".reason.json" within 255


def display_name(rel: str) -> str:
    """The path as text, even when the name's bytes are not valid UTF-8."""
    return os.fsencode(rel).decode("utf-8", "replace")


def quarantine(folder: Path, path: Path, rel: str, reasons: list[str]) -> Path | None:
    """Move ``path`` to ``folder`` beside its reasons; return where, or None if it had to stay."""
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, rel)
    sidecar = quarantine_reason(target)
    record = {"file": display_name(rel), "reasons": reasons, "quarantined_at": time.time(), "moved_to": target.name}
    write_json_atomic(sidecar, record)
    try:
        _move(path, target)
    except OSError as exc:
        write_json_atomic(sidecar, {**record, "moved_to": None, "not_moved": exc.strerror or str(exc)})
        return None
    return target


def _move(path: Path, target: Path) -> None:
    try:
        os.rename(path, target)  # moves a link or a pipe as itself
    except OSError as exc:
        if exc.errno != errno.EXDEV or not stat.S_ISREG(os.lstat(path).st_mode):  # inbox on another mount
            raise
        shutil.move(os.fspath(path), target)


def _free_name(folder: Path, rel: str) -> Path:
    safe = display_name(rel).replace("/", "__").encode("utf-8")[-MAX_NAME_BYTES:].decode("utf-8", "ignore")
    stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{safe}"
    target, n = folder / stem, 1
    while target.exists() or target.is_symlink():
        n += 1
        target = folder / f"{stem}-{n}"
    return target
