"""Stage 9, registry: model versions, the ``current`` pointer, promotion and rollback.

``models/<version>/`` holds ``model.gguf`` and ``version.json`` (with the file's
sha256). ``models/current`` is a symlink replaced atomically with ``os.replace``,
so a reader sees either the old or the new version, never a mix. ``history.json``
lists promotions, newest last, for one-step rollback.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.contract.errors import RegistryError
from appliance.home.fsutil import fsync_dir, read_json, sha256_file, staging_dir, write_json_atomic, write_text_atomic
from appliance.home.paths import Home

VERSION_RE = re.compile(r"^(base|v\d+)$")
MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"


def versions(home: Home) -> list[dict[str, Any]]:
    out = []
    for folder in sorted(home.models.iterdir() if home.models.exists() else []):
        if folder.is_dir() and not folder.is_symlink() and home.version_json(folder.name).exists():
            out.append(read_json(home.version_json(folder.name)))
    return sorted(out, key=lambda v: v["created"])


def next_version(home: Home) -> str:
    # retired and pruned names are never reused: history and lineage keep referring to them
    names = [v["version"] for v in versions(home)] + [m["version"] for m in retired(home)]
    names += [e["version"] for e in history(home)]
    numbers = [int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1}"


# check(gguf) -> why the file must not be served, or None (llamacpp_child.problem: header,
# gguf-py and a llama.cpp load, in a child process)
Check = Callable[[Path], "str | None"]


def add(
    home: Home, version: str, gguf: Path, info: dict[str, Any], check: Check | None = None, name: str = MODEL_FILE
) -> dict[str, Any]:
    """Register a built GGUF as ``version`` (complete or absent).

    With ``check``, the exact file about to be registered is validated first; a corrupt
    one never gets a version, so it can never be promoted. ``name`` is ``adapter.gguf``
    for a collection's LoRA adapter (served on the base version's model, see collections.py).
    """
    if not VERSION_RE.match(version):
        raise RegistryError(f"invalid version name {version!r}")
    target = home.model(version)
    if home.version_json(version).exists():
        raise RegistryError(f"version {version} already exists")
    with staging_dir(target) as tmp:
        try:
            os.link(gguf, tmp / name)  # same file system: no copy of hundreds of MB
        except OSError:
            shutil.copy2(gguf, tmp / name)
        if check is not None and (reason := check(tmp / name)):
            raise RegistryError(f"{gguf}: not registering a file llama.cpp cannot use safely: {reason}")
        record = {
            "version": version,
            "created": time.time(),
            "sha256": sha256_file(tmp / name),
            "size": (tmp / name).stat().st_size,
            **({"file": name} if name != MODEL_FILE else {}),
            **info,
        }
        write_json_atomic(tmp / home.version_json(version).name, record)  # renamed into place with the folder
    return record


def get(home: Home, version: str) -> dict[str, Any]:
    path = home.version_json(version)
    if not VERSION_RE.match(version) or not path.exists():
        known = ", ".join(v["version"] for v in versions(home)) or "none"
        raise RegistryError(f"no model version {version!r} (known: {known})")
    return read_json(path)


def current(home: Home) -> str | None:
    link = home.current
    if not link.is_symlink():
        return None
    return os.readlink(link)


def gguf_path(home: Home, version: str) -> Path:
    """The version's own file: its model, or for an adapter version its adapter."""
    folder = home.model(version)
    if (folder / MODEL_FILE).exists() or not (folder / ADAPTER_FILE).exists():
        return folder / MODEL_FILE
    return folder / ADAPTER_FILE


def verify(home: Home, version: str) -> None:
    """Only files the appliance built are served: the hash must match the record."""
    record = get(home, version)
    path = gguf_path(home, version)
    if not path.exists() or sha256_file(path) != record["sha256"]:
        raise RegistryError(f"{path}: the file does not match the sha256 recorded when it was built; not serving it")


def promote(home: Home, version: str, action: str = "promote", **extra: Any) -> None:
    verify(home, version)
    _point_current(home, version)
    entries = history(home)
    entries.append({"version": version, "action": action, "at": time.time(), "user": _user(), **extra})
    write_json_atomic(home.history, entries)


def rollback(home: Home) -> str:
    """Point ``current`` back at the version promoted before it.

    A version left by a rollback is not returned to by a later rollback, so
    rolling back twice walks further back instead of toggling.
    """
    now = current(home)
    left: set[str] = set()
    candidates: list[str] = []
    for entry in history(home):
        if entry.get("action") == "rollback":
            left.add(entry["from"])
        else:
            left.discard(entry["version"])
            candidates.append(entry["version"])
    previous = [v for v in candidates if v != now and v not in left and home.version_json(v).exists()]
    if not previous:
        raise RegistryError("nothing to roll back to: no earlier version is available")
    target = previous[-1]
    promote(home, target, action="rollback", **{"from": now})
    return target


def _point_current(home: Home, version: str) -> None:
    tmp = home.models / f".current.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(version, tmp)
    os.replace(tmp, home.current)
    fsync_dir(home.models)


def history(home: Home) -> list[dict[str, Any]]:
    """Promotions and rollbacks, oldest first."""
    path = home.history
    return read_json(path) if path.exists() else []


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


# --- lineage, model cards, retirement and pruning ------------------------------------------------


def lineage(home: Home, version: str) -> dict[str, Any] | None:
    path = home.lineage(version)
    return read_json(path) if path.exists() else None


def write_lineage(home: Home, version: str, data: dict[str, Any]) -> None:
    """``lineage.json`` and a short model card (README.md) in the version's folder."""
    write_json_atomic(home.lineage(version), data)
    write_text_atomic(home.model_card(version), model_card(version, data))


def model_card(version: str, data: dict[str, Any]) -> str:
    gate = data.get("gate") or {}
    checks = "\n".join(
        f"- {c['name']}: {'pass' if c['passed'] else 'n/a' if c['passed'] is None else 'FAIL'} - {c['detail']}"
        for c in gate.get("checks", [])
    )
    docs = data.get("documents", [])
    return (
        f"# Model {version}\n\n"
        f"- Base: {data.get('base')} (sha256 {str(data.get('base_sha256') or '-')[:16]})\n"
        f"- Trained: run {data.get('run')} on snapshot {data.get('snapshot')}, "
        f"{len(docs)} source document(s), {data.get('records', '?')} record(s)\n"
        f"- File: model.gguf ({data.get('quant')}), sha256 {data.get('gguf_sha256')}\n"
        f"- Job: {data.get('job')} ({data.get('kind')}), promoted {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(data.get('promoted_at', time.time())))}\n\n"
        f"## Intended use\n\nAnswering in the style and with the facts of the documents listed in "
        f"lineage.json, on this appliance's local endpoint. A small model fine-tuned on a small private "
        f"data set: check important answers against the sources.\n\n"
        f"## Gate\n\n{gate.get('verdict', '-')}\n\n{checks}\n"
    )


def retired(home: Home) -> list[dict[str, Any]]:
    path = home.retired
    return read_json(path) if path.exists() else []


def retire(home: Home, version: str, reason: str) -> None:
    """Delete a version's files and record it as retired: no promote or rollback can return it.

    The current version is never retired here; the caller points ``current`` elsewhere first.
    """
    if current(home) == version:
        raise RegistryError(f"{version} is the current version; promote another one before retiring it")
    marks = retired(home)
    if not any(m["version"] == version for m in marks):
        marks.append({"version": version, "reason": reason, "at": time.time(), "user": _user()})
        write_json_atomic(home.retired, marks)  # first: a crash below leaves it retired
    folder = home.model(version)
    if folder.exists():
        graveyard = folder.with_name(f".{version}.retired")
        shutil.rmtree(graveyard, ignore_errors=True)
        os.replace(folder, graveyard)  # gone from the listing at once; then the bytes
        shutil.rmtree(graveyard)
        fsync_dir(home.models)


def previous(home: Home) -> str | None:
    """The version a rollback would return to now, or None."""
    now = current(home)
    candidates = [e["version"] for e in history(home) if e.get("action") != "rollback"]
    gone = {m["version"] for m in retired(home)}
    earlier = [v for v in candidates if v != now and v not in gone and home.version_json(v).exists()]
    return earlier[-1] if earlier else None


def prune(home: Home, keep: int) -> list[str]:
    """Delete the oldest versions beyond ``keep``; never the current, the previous or ``base``."""
    protected = {current(home), previous(home), "base"}
    records = [v for v in versions(home) if v["version"] not in protected]
    excess = len(versions(home)) - keep
    removed = []
    for record in records[: max(0, excess)]:
        shutil.rmtree(home.model(record["version"]))
        removed.append(record["version"])
    if removed:
        fsync_dir(home.models)
    return removed
