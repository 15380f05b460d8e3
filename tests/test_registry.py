"""Promotion is atomic; rollback walks back; only files whose hash matches are served."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli.init import create_home
from appliance.contract.errors import RegistryError
from appliance.home import registry


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


def _promoted(home, tmp_path: Path, names: tuple[str, ...]) -> None:
    for version in names:
        registry.add(home, version, fake_gguf(tmp_path, version), {"quant": "Q4_K_M"})
        registry.promote(home, version)


def test_retired_version_is_gone_and_no_rollback_or_promote_returns_it(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    _promoted(home, tmp_path, ("base", "v1", "v2"))
    with pytest.raises(RegistryError, match="current version"):
        registry.retire(home, "v2", "test")
    registry.retire(home, "v1", "trained on a forgotten document")
    assert not home.model("v1").exists() and [m["version"] for m in registry.retired(home)] == ["v1"]
    with pytest.raises(RegistryError):
        registry.promote(home, "v1")
    assert registry.rollback(home) == "base"  # skips the retired v1
    assert registry.next_version(home) == "v3"  # a retired name is never reused


def test_prune_keeps_current_previous_and_base(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    _promoted(home, tmp_path, ("base", "v1", "v2", "v3", "v4", "v5"))
    removed = registry.prune(home, keep=3)
    assert removed == ["v1", "v2", "v3"]
    assert [v["version"] for v in registry.versions(home)] == ["base", "v4", "v5"]
    assert registry.prune(home, keep=2) == []  # base, previous (v4) and current (v5) are never deleted
    assert registry.rollback(home) == "v4"


def test_lineage_and_model_card_are_written_beside_the_model(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    _promoted(home, tmp_path, ("base", "v1"))
    registry.write_lineage(
        home,
        "v1",
        {
            "version": "v1",
            "base": "tiny",
            "run": "run-1",
            "snapshot": "s1",
            "documents": [{"sha256": "a" * 64, "path": "x.jsonl"}],
            "records": 3,
            "gguf_sha256": "b" * 64,
            "quant": "Q4_K_M",
            "job": 1,
            "kind": "train",
            "gate": {"verdict": "promote", "checks": [{"name": "parity", "passed": True, "detail": "ok"}]},
        },
    )
    assert registry.lineage(home, "v1")["documents"][0]["sha256"] == "a" * 64
    card = (home.model("v1") / "README.md").read_text()
    assert "# Model v1" in card and "1 source document(s)" in card and "- parity: pass" in card
    assert "Intended use" in card
