"""Collections: separate data, models and access inside one home (issue 11).

A file's collection is the inbox folder it sits in: ``inbox/cardiology/a.txt`` belongs to
``cardiology``, ``inbox/legal/matter-17/b.jsonl`` to ``legal/matter-17``, and a file at the
top of the inbox to the *shared* collection (``""`` here, ``shared`` to people). Each
collection has its own store, snapshots, runs, gate and versions under
``collections/<name>/`` (``Home.scoped``), so one collection's data can never train
another's model. The shared collection keeps the home's top-level layout and is served as
a merged model (model id ``appliance``); the others are served, by default, as LoRA
adapters on the one loaded base model (model id ``appliance/<name>``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# The names themselves (shared, model ids, what may name a collection) are the contract's, since the
# TUI needs them too; they are re-exported here for the engine's callers (catalog.model_id, …).
from appliance.contract.names import (
    MAX_DEPTH,
    PREFIX,
    SEGMENT,
    SHARED,
    SHARED_NAME,
    VERSION,
    display,
    model_id,
    parse,
    parse_model_id,
    problem,
)
from appliance.home.fsutil import read_json
from appliance.home.paths import Home

if TYPE_CHECKING:
    from appliance.home.config import Settings


def of_path(home: Home, path: Path) -> str:
    """The collection of an inbox path (its parent folder relative to the inbox)."""
    rel = Path(path).parent.relative_to(home.top.inbox)
    return "" if str(rel) == "." else rel.as_posix()


def names(home: Home) -> list[str]:
    """Every collection: the shared one first, then inbox sub-folders and collections with data."""
    found: set[str] = set()
    for name, folders, files in _folders(home.top.inbox):
        # a folder holding only other folders ("legal" for "legal/matter-17") is not one itself
        if files or not folders:
            found.add(name)
    return [SHARED, *sorted((found | set(with_data(home))) - {SHARED})]


def with_data(home: Home) -> list[str]:
    """Collections (not the shared one) that have a store or models under ``collections/``."""
    return [
        name
        for name, folders, _ in _folders(home.top.collections_dir, skip=DATA_FOLDERS)
        if "store" in folders or "models" in folders
    ]


def stores(home: Home) -> list[tuple[str, Home]]:
    """Each collection that has a store, with its view of the home (no walk of the inbox: the
    daemon asks for every batch the watcher hands over)."""
    scopes = [(name, home.top.scoped(name)) for name in (SHARED, *with_data(home))]
    return [(name, scope) for name, scope in scopes if scope.store_db.exists()]


DATA_FOLDERS = frozenset({"store", "snapshots", "runs", "models"})


def _folders(root: Path, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, list[str], list[str]]]:
    """(name, sub-folders, visible files) of each folder under ``root`` that can name a collection,
    at most MAX_DEPTH deep. Only folders are descended into (never hidden ones, links or ``skip``,
    e.g. a collection's runs with their checkpoints), so the cost follows the folders, not the files."""
    for path, folders, files in os.walk(root):
        rel = Path(path).relative_to(root)
        depth = len(rel.parts)
        subs = [f for f in folders if not f.startswith(".") and not os.path.islink(os.path.join(path, f))]
        folders[:] = [f for f in subs if f not in skip] if depth < MAX_DEPTH else []
        name = rel.as_posix()
        if depth and problem(name) is None:
            yield name, subs, [f for f in files if not f.startswith(".")]


# --- adapters ---------------------------------------------------------------------------------------


def adapter_mode(home: Home, settings: Settings) -> bool:
    """Whether ``home``'s collection is trained and served as a LoRA adapter on the base."""
    return bool(home.collection) and settings.collection(home.collection).serve == "adapter"


def base_model(home: Home) -> tuple[str, Path]:
    """The base version adapters are applied to, and its file (made by 'appliance init')."""
    from appliance.home import registry

    return "base", registry.gguf_path(home.top, "base")


# --- what is served --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    collection: str
    version: str
    mode: str  # "merged" or "adapter"
    gguf: Path  # the model file llama.cpp loads (the base version's for an adapter)
    adapter: Path | None  # the LoRA applied on it (adapter mode)
    sha256: str  # of the version's own file (model or adapter)


def served(home: Home, collection: str, version: str | None = None) -> Served | None:
    """How ``collection``'s current version (or ``version``) is served; None when there is none."""
    from appliance.home import registry

    scope = home.top.scoped(collection)
    version = version or registry.current(scope)
    if version is None or not (scope.model(version) / "version.json").exists():
        return None
    record = read_json(scope.model(version) / "version.json")
    if registry.gguf_path(scope, version).name == registry.ADAPTER_FILE:
        base = record.get("base_version", "base")
        return Served(
            collection,
            version,
            "adapter",
            registry.gguf_path(home.top, base),
            registry.gguf_path(scope, version),
            record["sha256"],
        )
    return Served(collection, version, "merged", registry.gguf_path(scope, version), None, record["sha256"])


__all__ = [
    "MAX_DEPTH",
    "PREFIX",
    "SEGMENT",
    "SHARED",
    "SHARED_NAME",
    "VERSION",
    "Served",
    "adapter_mode",
    "base_model",
    "display",
    "model_id",
    "names",
    "of_path",
    "parse",
    "parse_model_id",
    "problem",
    "served",
    "stores",
    "with_data",
]
