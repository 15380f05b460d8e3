"""The vocabulary the engine and its front ends share: collection names, model ids, roles, the key file.

A file's collection is the inbox folder it sits in ("" for the top of the inbox, called
``shared`` by people); a collection's served model is ``appliance/<collection>`` (the shared
one's ``appliance``), a version of it ``appliance/<collection>@vN`` (the shared one's ``vN``).
Pure standard library: the TUI imports this module (tests/test_boundaries.py).
"""

from __future__ import annotations

import re
from pathlib import Path

SHARED = ""
SHARED_NAME = "shared"
PREFIX = "appliance"
MAX_DEPTH = 3
# Folder names as people make them ("Cardiology", "matter-17", "Legal Office"): letters of
# any script, digits, spaces, '.', '_' and '-'; never '/', '@' (they separate model ids)
# or a leading dot (hidden folders are skipped by the watcher).
SEGMENT = re.compile(r"^\w(?:[\w .-]{0,62}[\w.-])?$")
VERSION = re.compile(r"^v\d+$")

#: API key roles, ordered: each includes the ones before it (appliance/home/keys.py says who needs which).
ROLES = ("chat", "contributor", "approver", "admin")

#: The environment variable holding the caller's own API key (before the home's admin key file).
KEY_ENV = "APPLIANCE_API_KEY"
KEY_FILE = "api_key"


def display(collection: str) -> str:
    """'shared' for the top of the inbox, else the collection's own name."""
    return collection or SHARED_NAME


def parse(name: str) -> str:
    """A collection as people write it ("shared" is the top of the inbox)."""
    name = name.strip().strip("/")
    return SHARED if name in ("", SHARED_NAME) else name


def problem(name: str) -> str | None:
    """Why ``name`` cannot be a collection, or None."""
    if name == SHARED:
        return None
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        return f"collections nest at most {MAX_DEPTH} folders deep"
    if parts[0] == SHARED_NAME:
        return f"'{SHARED_NAME}' is the name of the top of the inbox"
    for part in parts:
        if not SEGMENT.match(part):
            return (
                f"folder name {part!r} cannot name a collection: use letters, digits, spaces, '.', '_' "
                "and '-', starting with a letter or digit, at most 64 characters"
            )
    return None


def model_id(collection: str, version: str | None = None) -> str:
    """``appliance`` / ``vN`` for the shared collection; ``appliance/<c>`` / ``appliance/<c>@vN`` otherwise."""
    if collection == SHARED:
        return version or PREFIX
    return f"{PREFIX}/{collection}" + (f"@{version}" if version else "")


def parse_model_id(model: str) -> tuple[str, str | None]:
    """(collection, version or None for the collection's current one); LookupError otherwise."""
    if model in (PREFIX, f"{PREFIX}/{SHARED_NAME}"):
        return SHARED, None
    if model == "base" or VERSION.match(model):
        return SHARED, model
    if model.startswith(PREFIX + "/"):
        name, _, version = model[len(PREFIX) + 1 :].partition("@")
        if name == SHARED_NAME:
            name = SHARED
        if problem(name) is None and name and (not version or VERSION.match(version)):
            return name, version or None
    raise LookupError(model)


def read_api_key(home: Path) -> str | None:
    """The home's admin key from ``<home>/api_key`` (written 0600 by ``appliance init``); None when the
    file is missing, unreadable (another user's home) or empty: the caller says what to do."""
    try:
        key = (Path(home) / KEY_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return key or None
