"""Promotion is atomic; rollback walks back; only files whose hash matches are served."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import registry
from appliance.errors import RegistryError
from appliance.init import create_home


def fake_gguf(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"GGUF" + name.encode() * 100)
    return path


def test_promote_and_rollback(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    for version in ("base", "v1", "v2"):
        registry.add(home, version, fake_gguf(tmp_path, version), {"quant": "Q4_K_M"})
        registry.promote(home, version)
    assert registry.current(home) == "v2"
    assert registry.rollback(home) == "v1"
    assert registry.rollback(home) == "base"  # walks back rather than toggling to v2
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(home)
    registry.promote(home, "v2")
    assert registry.current(home) == "v2" and registry.rollback(home) == "base"


def test_tampered_file_is_not_promoted(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    registry.add(home, "base", fake_gguf(tmp_path, "base"), {})
    registry.promote(home, "base")
    registry.add(home, "v1", fake_gguf(tmp_path, "v1"), {})
    (home.model("v1") / "model.gguf").write_bytes(b"GGUF tampered")
    with pytest.raises(RegistryError, match="does not match the sha256"):
        registry.promote(home, "v1")
    assert registry.current(home) == "base"


def test_unknown_version(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    with pytest.raises(RegistryError, match="no model version 'v9'"):
        registry.get(home, "v9")
    with pytest.raises(RegistryError):
        registry.get(home, "../../etc")
