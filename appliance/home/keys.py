"""API keys with roles: who may run which command, and on which collections.

``<home>/keys.json`` (0600, rewritten atomically) holds one entry per key: name, role,
collections (a list of collection names, "" being the shared one; null = every
collection), the sha256 of the secret, created and revoked (a time, or null). The secret
itself is printed once by ``appliance keys add`` and stored nowhere.

Roles are ordered, each including the ones before it::

    chat < contributor < approver < admin

:data:`COMMAND_ROLES` is the one table of which role each command (CLI) and each engine
method needs; the CLI checks it once before a command runs (:func:`authorize`), the
engine checks it on every public method (``engine.needs``) and the endpoint checks keys
with :meth:`KeyStore.authenticate` and :meth:`Key.sees`.

The key ``init`` writes to the home's ``api_key`` file is the admin key named "admin";
a home made before keys existed (an ``api_key`` file, no ``keys.json``) is migrated to
that on first use.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from appliance.contract.errors import AccessError, ApplianceError
from appliance.contract.names import ROLES
from appliance.contract.names import display as _display
from appliance.contract.names import parse as _parse_collection
from appliance.contract.names import problem as _collection_problem
from appliance.home.fsutil import write_text_atomic
from appliance.home.paths import Home

ADMIN_NAME = "admin"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
FORMAT = 1

#: The role each command needs. CLI commands by their name on the command line ("keys add",
#: "review approve", …), engine methods (appliance/engine/local.py, the api.Engine contract) by
#: their method name; where a name is both, the role is the same. Reading is cheap, changing
#: what is served or trained is not:
#:
#: * chat: look at the state (status, models and their gate reports, jobs, events) and chat
#:   with the models (tui).
#: * contributor: bring data in (ingest, correct), ask for a retrain, read the advisor and
#:   lineage (which documents trained a version).
#: * approver: decide what is served (eval, promote, rollback, review votes).
#: * admin: run and configure the machine (init, train, export, serve, run, forget, demo,
#:   audit, keys, the training method, pausing the watcher).
COMMAND_ROLES: dict[str, str] = {
    # --- CLI commands
    "init": "admin",  # exempt while the home does not exist yet (it creates it)
    "demo": "admin",  # likewise, when it creates its home
    "status": "chat",
    "models": "chat",
    "jobs": "chat",
    "tui": "chat",  # the TUI's engine checks each action it offers
    "ask": "chat",  # a question to the endpoint, as the caller's own key
    "ingest": "contributor",
    "retrain": "contributor",
    "advise": "contributor",
    "eval": "approver",
    "promote": "approver",
    "rollback": "approver",
    "review list": "approver",
    "review approve": "approver",
    "review reject": "approver",
    "train": "admin",
    "export": "admin",
    "serve": "admin",
    "run": "admin",
    "forget": "admin",
    "audit verify": "admin",
    "audit show": "admin",
    "keys whoami": "chat",
    "keys list": "admin",
    "keys add": "admin",
    "keys revoke": "admin",
    # --- engine methods
    "whoami": "chat",
    "collections": "chat",
    "scoped": "chat",
    "events": "chat",
    "eval_report": "chat",  # the gate numbers status shows anyway
    "lineage": "contributor",  # names the documents a version learnt from
    "sources": "contributor",  # names the documents in the store
    "quarantined": "contributor",  # names the refused files and why
    "correct": "contributor",
    "evaluate": "approver",
    "reviews": "approver",
    "vote": "approver",
    "pause_watching": "admin",
    "resume_watching": "admin",
    "audit_entries": "admin",
    "verify_audit": "admin",
    "set_method": "admin",
    "keys": "admin",
    "add_key": "admin",
    "revoke_key": "admin",
    "api_key": "admin",  # the home's admin key file, for the TUI's chat when the caller has no own key
}


#: Commands and engine methods about the home as a whole rather than one collection: only the
#: key's role is checked. Every other command acts on one collection (the CLI's --collection,
#: else the shared one; the engine's own), which the key must see; ``scoped`` checks the
#: collection it is asked for.
HOME_WIDE = frozenset(
    {
        "init",
        "demo",
        "serve",
        "run",
        "tui",
        "audit verify",
        "audit show",
        "keys add",
        "keys list",
        "keys revoke",
        "keys whoami",
        "whoami",
        "collections",
        "scoped",
        "keys",
        "add_key",
        "revoke_key",
        "audit_entries",
        "verify_audit",
        "pause_watching",
        "resume_watching",
        "set_method",
    }
)


class KeysError(ApplianceError):
    """A key cannot be added or revoked (bad name, duplicate, the last admin key, …)."""

    title = "API keys"


# --- keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """An authenticated caller. ``collections`` None: every collection ("" is the shared one)."""

    name: str
    role: str
    collections: tuple[str, ...] | None = None

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def sees(self, collection: str) -> bool:
        """Exact names: a key for ``legal`` does not see ``legal/matter-17`` (each matter is walled off)."""
        return self.collections is None or collection in self.collections

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "collections": None if self.collections is None else [_display(c) for c in self.collections],
        }


def require(key: Key, role: str, collection: str | None = None, action: str | None = None) -> None:
    """Raise :class:`AccessError` unless ``key`` has ``role`` and sees ``collection``.

    A collection the key may not see gets the same words as one that does not exist, so a
    refusal never tells that another collection is there."""
    if collection is not None and not key.sees(collection):
        raise AccessError(f"no collection '{_display(collection)}'")
    if not key.can(role):
        what = f"may not run '{action}'" if action else "may not do this"
        raise AccessError(f"key '{key.name}' (role {key.role}) {what}: it needs the {role} role")


def authorize(command: str, key: Key, collection: str | None = None) -> None:
    """The check the CLI makes before running ``command`` (a name in :data:`COMMAND_ROLES`; one
    missing from it needs admin: fail closed)."""
    require(key, COMMAND_ROLES.get(command, "admin"), collection, command)


T = TypeVar("T", bound=type)
_inside: ContextVar[bool] = ContextVar("appliance_engine_call", default=False)


def guarded(cls: T) -> T:
    """Class decorator for the engine: every public method checks the caller's key (``self.key``)
    against :data:`COMMAND_ROLES` (a method missing from the table needs admin: fail closed) and the
    engine's collection (``self.paths.collection``) before it runs. Only the outermost call is
    checked: a method may use others internally (status reads gate reports) on the caller's behalf."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not callable(member) or isinstance(member, (staticmethod, classmethod, type)):
            continue
        setattr(cls, name, _checked(member, COMMAND_ROLES.get(name, "admin")))
    return cls


def _checked(method: Callable[..., Any], role: str) -> Callable[..., Any]:
    name = method.__name__

    @wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _inside.get():
            return method(self, *args, **kwargs)
        if name == "scoped":
            target = args[0] if args else kwargs.get("collection", "")
            collection: str | None = _parse_collection(target)
        else:
            collection = None if name in HOME_WIDE else self.paths.collection
        require(self.key, role, collection, name)
        if not _store(self.paths.top).active(self.key.name):  # revoked since this engine was made
            raise AccessError(f"key '{self.key.name}' is revoked")
        from appliance.home.audit import ACTING_KEY

        token, acting = _inside.set(True), ACTING_KEY.set(self.key.name)  # audit entries name the key
        try:
            return method(self, *args, **kwargs)
        finally:
            ACTING_KEY.reset(acting)
            _inside.reset(token)

    call.required_role = role  # type: ignore[attr-defined]
    return call


_stores: dict[Path, KeyStore] = {}


def _store(home: Home) -> KeyStore:
    """One KeyStore per home in this process, so engine calls share its stat-checked cache."""
    if (store := _stores.get(home.root)) is None:
        store = _stores[home.root] = KeyStore(home)
    return store


def digest(secret: str) -> str:
    # A fast hash is right here: secrets are 256 random bits (secrets.token_urlsafe(32)), so
    # there is nothing to guess or look up and no dictionary for a slow KDF to slow down;
    # a cheap hash keeps every endpoint request's check in microseconds.
    return hashlib.sha256(secret.strip().encode("utf-8")).hexdigest()


class KeyStore:
    """The home's keys.json. Cheap to ask: :meth:`authenticate` re-reads the file only when its
    stat (mtime_ns, size, inode) changed, so a key revoked by another process is refused on
    the very next request."""

    def __init__(self, home: Home | Path):
        self.home = home if isinstance(home, Home) else Home(Path(home))
        # (stat stamp, entries) as one value, so a reader in another thread never pairs a new
        # stamp with old entries
        self._cache: tuple[tuple[int, int, int], list[dict[str, Any]]] | None = None

    # --- reading -------------------------------------------------------------------
    def _load(self) -> list[dict[str, Any]]:
        path = self.home.keys
        if not path.exists():
            self.adopt_api_key()
        try:
            st = path.stat()
        except FileNotFoundError:  # neither keys.json nor an api_key file: no keys at all
            self._cache = None
            return []
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cache = self._cache
        if cache is None or cache[0] != stamp:
            cache = self._cache = (stamp, self._read(path))
        return cache[1]

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["keys"]
            for e in entries:
                if e["role"] not in ROLES or not isinstance(e["sha256"], str):
                    raise ValueError(f"key {e.get('name')!r} has role {e['role']!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeysError(f"{path}: unreadable key file ({exc}); restore it from a backup") from None
        return entries

    def _write(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps({"format": FORMAT, "keys": entries}, indent=2, sort_keys=True) + "\n"
        write_text_atomic(self.home.keys, text, mode=0o600)

    @contextmanager
    def _locked(self) -> Iterator[list[dict[str, Any]]]:
        """Read-modify-write under an exclusive lock on the home folder itself (no lock file
        to leave behind); keys.json is replaced by rename, so its own inode cannot be locked."""
        fd = os.open(self.home.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._cache = None
            entries = [dict(e) for e in self._read(self.home.keys)] if self.home.keys.exists() else []
            yield entries
        finally:
            os.close(fd)

    def adopt_api_key(self, audited: bool = True) -> None:
        """Register the api_key file's secret as the admin key "admin" if there is no keys.json yet:
        at ``init`` (not audited: creating the home is not a change to it), and on first use of
        a home made before keys existed (audited as a migration)."""
        if not self.home.api_key.is_file() or not self.home.root.is_dir():
            return
        with self._locked() as entries:
            if self.home.keys.exists():  # another process migrated first
                return
            secret = self.home.api_key.read_text(encoding="utf-8").strip()
            if not secret:
                return
            entries.append(_entry(ADMIN_NAME, "admin", None, digest(secret)))
            self._write(entries)
        if audited:
            from appliance.home import audit

            audit.append(self.home, "key_add", key=ADMIN_NAME, role="admin", collections=None, migrated=True)

    # --- the API -------------------------------------------------------------------
    def authenticate(self, secret: str) -> Key | None:
        """The key whose secret this is, or None (unknown or revoked). Every entry is compared,
        in constant time, so timing tells nothing about which hashes are close."""
        wanted = digest(secret).encode()
        found = None
        for e in self._load():
            if hmac.compare_digest(wanted, e["sha256"].encode()) and e.get("revoked") is None:
                found = e
        if found is None:
            return None
        cols = found.get("collections")
        return Key(found["name"], found["role"], None if cols is None else tuple(cols))

    def active(self, name: str) -> bool:
        """Whether a key of that name exists and is not revoked (cheap: cached like authenticate)."""
        return any(e["name"] == name and e.get("revoked") is None for e in self._load())

    def list(self) -> list[dict[str, Any]]:
        """name, role, collections (display names; None = all), created, revoked. Never secrets or hashes."""
        return [
            {
                "name": e["name"],
                "role": e["role"],
                "collections": None if e.get("collections") is None else [_display(c) for c in e["collections"]],
                "created": e.get("created"),
                "revoked": e.get("revoked"),
            }
            for e in self._load()
        ]

    def add(self, name: str, role: str, collections: builtins.list[str] | None = None) -> str:
        """Create a key; returns its secret, which is stored nowhere (show it once)."""
        if not NAME.fullmatch(name or ""):
            raise KeysError(
                f"key name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
            )
        if role not in ROLES:
            raise KeysError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        stored = _collections(collections)
        if role == "admin" and stored is not None:
            raise KeysError("an admin key sees every collection; leave out --collections")
        self._load()  # migrates an old home first, so "admin" stays the init key's name
        secret = secrets.token_urlsafe(32)
        with self._locked() as entries:
            if any(e["name"] == name for e in entries):
                raise KeysError(f"a key named '{name}' exists already (names are never reused, revoked or not)")
            entries.append(_entry(name, role, stored, digest(secret)))
            self._write(entries)
        from appliance.home import audit

        audit.append(
            self.home,
            "key_add",
            key=name,
            role=role,
            collections=None if stored is None else [_display(c) for c in stored],
        )
        return secret

    def revoke(self, name: str) -> None:
        self._load()
        with self._locked() as entries:
            entry = next((e for e in entries if e["name"] == name), None)
            if entry is None:
                raise KeysError(f"no key named '{name}' (see 'appliance keys list')")
            if entry.get("revoked") is not None:
                raise KeysError(f"key '{name}' is revoked already")
            admins = [e for e in entries if e["role"] == "admin" and e.get("revoked") is None]
            if entry["role"] == "admin" and len(admins) == 1:
                raise KeysError(f"key '{name}' is the last admin key; add another admin key first")
            entry["revoked"] = time.time()
            self._write(entries)
        from appliance.home import audit

        audit.append(self.home, "key_revoke", key=name, role=entry["role"])


def _entry(name: str, role: str, collections: list[str] | None, sha256: str) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "collections": collections,
        "sha256": sha256,
        "created": time.time(),
        "revoked": None,
    }


def _collections(names: list[str] | None) -> list[str] | None:
    """Collection names as given ("shared" for the top level) to their stored form; None = all."""
    if names is None:
        return None
    out: list[str] = []
    for name in names:
        collection = _parse_collection(name)
        if collection and (why := _collection_problem(collection)):
            raise KeysError(f"collection {name!r}: {why}")
        if collection not in out:
            out.append(collection)
    if not out:
        raise KeysError("--collections: name at least one collection (or leave it out for all)")
    return out


# --- who is calling ---------------------------------------------------------------------


def read_secret(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AccessError(f"{path}: cannot read the key file ({exc.strerror})") from None
    if not secret:
        raise AccessError(f"{path}: the key file is empty")
    return secret


def caller_secret(home: Home | Path, explicit_secret: str | None = None) -> str:
    """The caller's secret: ``explicit_secret`` (the CLI's --key-file), else $APPLIANCE_API_KEY,
    else the home's api_key file (the admin key of whoever may read it)."""
    home = home if isinstance(home, Home) else Home(Path(home))
    if explicit_secret:
        return explicit_secret.strip()
    if env := os.environ.get("APPLIANCE_API_KEY", "").strip():
        return env
    if not home.api_key.exists():
        raise AccessError(f"no API key: set APPLIANCE_API_KEY or pass --key-file ({home.api_key} is missing)")
    return read_secret(home.api_key)


def caller_key(home: Home | Path, explicit_secret: str | None = None) -> Key:
    """The key of whoever runs this process; an unknown or revoked secret is an AccessError."""
    home = home if isinstance(home, Home) else Home(Path(home))
    key = KeyStore(home).authenticate(caller_secret(home, explicit_secret))
    if key is None:
        raise AccessError("the API key is unknown or revoked; ask an admin for a key ('appliance keys add')")
    return key
