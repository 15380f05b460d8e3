"""``appliance init``: create a home, its config and API key, import the base model,
and export the base itself as the first version, ``base``, so the endpoint answers
from the first minute and later versions have something to be compared with.

The audit chain starts here: the home's creation, its admin key and the base's import
(with the registered file's sha256) are its first entries, so every later entry
follows from the model the home began with.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from appliance.contract.errors import HomeError
from appliance.contract.events import Emit, ignore
from appliance.export.run import export_model, gguf_metadata, require_parity
from appliance.home import audit, registry
from appliance.home.config import Settings, dump, load
from appliance.home.fsutil import read_json, write_text_atomic
from appliance.home.keys import ADMIN_NAME, KeyStore
from appliance.home.paths import Home
from appliance.training.basemodel import import_base, name_for


def create_home(root: Path, base_name: str, settings: Settings | None = None) -> Home:
    """Folders (0700), config.toml, api_key and keys.json (0600); existing files are kept."""
    home = Home(root)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        for folder in home.folders():
            folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HomeError(f"{root}: cannot create the home ({exc.strerror})") from None
    if not home.config.exists():
        settings = settings or Settings()
        settings.base.name = base_name
        write_text_atomic(home.config, dump(settings), mode=0o600)
    if not home.api_key.exists():
        write_text_atomic(home.api_key, secrets.token_urlsafe(32) + "\n", mode=0o600)
    KeyStore(home).adopt_api_key(audited=False)  # the init key is the admin key "admin" (keys.json)
    return home


def init(root: Path, base: str = "embedded", emit: Emit = ignore, settings: Settings | None = None) -> Home:
    """Create (or finish creating) the home at ``root``; each step is audited when it happens."""
    home = Home(root)
    visible = [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
    if visible and not home.config.exists():
        raise HomeError(f"{root}: folder exists, is not empty and is not an appliance home; choose another --home")
    new_home, new_key = not home.config.exists(), not home.keys.exists()
    home = create_home(root, name_for(base), settings)
    if new_home:
        audit.append(home, "home_created", root=str(home.root))
    if new_key:
        audit.append(home, "key_add", key=ADMIN_NAME, role="admin", collections=None)
    settings = load(home.config)
    import_base(base, home.base(settings.base.name), emit)
    if registry.current(home) is None:
        export_base(home, settings, emit)
    # once, in a chain this init began (an init interrupted after the import logs it when rerun)
    if audit.find(home, "home_created") and not audit.find(home, "base_import", base=settings.base.name):
        meta = read_json(home.base_meta(settings.base.name))
        record = registry.get(home, "base")
        audit.append(
            home,
            "base_import",
            base=settings.base.name,
            source=meta.get("source"),
            source_sha256=meta.get("source_sha256"),
            version="base",
            sha256=record["sha256"],
        )
    return home


def export_base(home: Home, settings: Settings, emit: Emit = ignore) -> None:
    """The base model through the same converter and parity check as every version."""
    out = home.run("base").gguf
    result = export_model(
        home.base(settings.base.name),
        out,
        settings.export.quant,
        gguf_metadata(settings.base.name, "base", None),
        settings,
        emit,
    )
    require_parity(result)
    if not home.version_json("base").exists():
        registry.add(
            home,
            "base",
            result.gguf,
            {
                "run": None,
                "snapshot": None,
                "quant": result.qtype,
                "base": settings.base.name,
                "parity": result.parity.to_dict(),
                "registered_at": time.time(),
            },
        )
    registry.promote(home, "base")
