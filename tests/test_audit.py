"""The audit chain: every edit, removal, reordering or truncation of a line is detected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.init import create_home
from appliance.home import audit
from appliance.home.paths import Home


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    home = create_home(tmp_path / "h", "tiny")
    for i in range(6):
        audit.append(home, "ingest", document=f"{i:064x}")
    return home


def lines(home: Home) -> list[str]:
    return home.audit_log.read_text().splitlines()


def write(home: Home, rows: list[str]) -> None:
    home.audit_log.write_text("".join(r + "\n" for r in rows))


def cli_verify(home: Home) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "verify", "--home", str(home.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_intact_chain_verifies_and_entries_hold_user_and_prev(home: Home):
    verdict = audit.verify(home)
    assert verdict.ok and verdict.entries == 6
    first, second = (json.loads(x) for x in lines(home)[:2])
    assert first["prev"] == audit.GENESIS and second["prev"] == first["hash"]
    assert first["user"] == audit.user() and first["action"] == "ingest"
    assert audit.head(home) == f"6:{json.loads(lines(home)[-1])['hash']}"


def test_edited_line_is_named(home: Home):
    rows = lines(home)
    entry = json.loads(rows[2])
    entry["details"]["document"] = "f" * 64
    rows[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    write(home, rows)
    verdict = audit.verify(home)
    assert not verdict.ok and verdict.bad_line == 3 and "edited" in verdict.reason
    proc = cli_verify(home)
    assert proc.returncode != 0 and "line 3" in proc.stderr


def test_edit_with_recomputed_hash_breaks_the_next_link(home: Home):
    rows = lines(home)
    entry = json.loads(rows[1])
    entry["user"] = "mallory"
    entry["hash"] = audit.entry_hash(entry)
    rows[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    write(home, rows)
    verdict = audit.verify(home)
    assert not verdict.ok and verdict.bad_line == 3


def test_deleted_line_is_named(home: Home):
    rows = lines(home)
    del rows[3]
    write(home, rows)
    verdict = audit.verify(home)
    assert not verdict.ok and verdict.bad_line == 4


def test_reordered_lines_are_detected(home: Home):
    rows = lines(home)
    rows[1], rows[2] = rows[2], rows[1]
    write(home, rows)
    verdict = audit.verify(home)
    assert not verdict.ok and verdict.bad_line == 2


def test_truncated_log_is_detected_through_the_journal_head(home: Home):
    write(home, lines(home)[:4])
    verdict = audit.verify(home)
    assert not verdict.ok and "cut off" in verdict.reason
    proc = cli_verify(home)
    assert proc.returncode != 0 and "cut off" in proc.stderr


def test_emptied_log_is_detected(home: Home):
    home.audit_log.write_text("")
    assert not audit.verify(home).ok


def test_a_torn_last_line_is_reported_and_later_appends_stay_separate(home: Home):
    with open(home.audit_log, "a") as handle:
        handle.write('{"seq": 7, "act')  # a power cut mid-write
    entry = audit.append(home, "rollback", version="v1")
    assert entry["seq"] == 7
    verdict = audit.verify(home)
    assert not verdict.ok and verdict.bad_line == 7 and "not an audit entry" in verdict.reason


def test_init_starts_the_chain_with_the_home_its_admin_key_and_the_base(tmp_path: Path, tiny_base: Path):
    from appliance.cli.init import init
    from appliance.home import registry
    from appliance.home.config import Settings

    settings = Settings()
    settings.export.quant = "F16"  # the base's own file: no quantization ladder to wait for
    home = init(tmp_path / "h", base=str(tiny_base), settings=settings)
    first = audit.entries(home)
    assert [e["action"] for e in first] == ["home_created", "key_add", "base_import"]
    assert first[0]["seq"] == 1 and first[0]["prev"] == audit.GENESIS
    assert first[1]["details"] == {"key": "admin", "role": "admin", "collections": None}
    imported = first[2]["details"]
    assert imported["version"] == "base" and imported["sha256"] == registry.get(home, "base")["sha256"]
    assert imported["source"] == str(tiny_base.absolute())
    assert audit.verify(home).ok
    init(tmp_path / "h", base=str(tiny_base))  # finishing an existing home adds nothing
    assert audit.entries(home) == first
