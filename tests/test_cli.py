"""Bad input at the command line: one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.init import create_home
from appliance.contract.errors import ConfigError, ServeError, ToolchainError
from appliance.home.config import load
from appliance.serving.server import Server


def appliance(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("appliance: error: ")
    return lines[0]


def test_wrong_base_path(tmp_path: Path):
    line = one_error_line(appliance("init", "--home", str(tmp_path / "h"), "--base", str(tmp_path / "nope")))
    assert "no such file or folder" in line and "nope" in line


def test_base_folder_without_weights(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    line = one_error_line(appliance("init", "--home", str(tmp_path / "h"), "--base", str(folder)))
    assert "no weights" in line
    assert not (tmp_path / "h" / "base" / "model").exists()  # nothing half-written left looking complete


def test_unreadable_gguf(tmp_path: Path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    line = one_error_line(appliance("init", "--home", str(tmp_path / "h"), "--base", str(bad)))
    assert "broken.gguf" in line and "cannot load" in line


def test_not_a_home(tmp_path: Path):
    line = one_error_line(appliance("status", "--home", str(tmp_path / "missing")))
    assert "not an appliance home" in line and "appliance init" in line


def test_refuses_to_take_over_a_non_empty_folder(tmp_path: Path):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "thesis.docx").write_text("precious")
    line = one_error_line(appliance("init", "--home", str(tmp_path / "h")))
    assert "not an appliance home" in line
    assert (tmp_path / "h" / "thesis.docx").read_text() == "precious"


def test_inbox_with_no_usable_data(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    (home.inbox / "bad.jsonl").write_text("{not json}\n")
    ingest = appliance("ingest", "--home", str(home.root), "--json")
    assert ingest.returncode == 0
    report = json.loads(ingest.stdout)
    assert report["accepted"] == 0 and report["quarantined"][0]["file"] == "bad.jsonl"
    line = one_error_line(appliance("train", "--home", str(home.root)))
    assert "no usable training data" in line


def test_missing_converter_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from appliance.runtime.toolchain import llama_cpp_dir

    monkeypatch.setenv("APPLIANCE_LLAMA_CPP_DIR", str(tmp_path / "empty"))
    with pytest.raises(ToolchainError, match="fetch_converter.sh"):
        llama_cpp_dir()


def test_unknown_config_key_is_rejected(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    home.config.write_text(home.config.read_text() + "\n[train]\nlearnin_rate = 1.0\n")
    with pytest.raises(ConfigError):
        load(home.config)
    home.config.write_text("[serve]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load(home.config)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = create_home(tmp_path / "h", "tiny")
    monkeypatch.setenv("APPLIANCE_SERVE__PORT", "9123")
    assert load(home.config).serve.port == 9123


def test_port_in_use(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            Server(home, load(home.config), port=port)


def test_non_loopback_bind_needs_config(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    with pytest.raises(ServeError, match="non-loopback"):
        Server(home, load(home.config), host="0.0.0.0", port=0)


def test_home_and_key_are_private(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    assert home.root.stat().st_mode & 0o777 == 0o700
    assert home.api_key.stat().st_mode & 0o777 == 0o600
    assert len(home.api_key.read_text().strip()) >= 32


def test_forget_of_an_unknown_document_is_one_clear_line(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    proc = appliance("forget", "--home", str(home.root), "doc.jsonl")
    line = one_error_line(proc)
    assert proc.returncode == 1 and "doc.jsonl: no such document" in line


def test_audit_verify_on_a_fresh_home_passes_and_retrain_queues_once(tmp_path: Path):
    home = create_home(tmp_path / "h", "tiny")
    first = appliance("retrain", "--home", str(home.root), "--json")
    second = appliance("retrain", "--home", str(home.root), "--json")
    assert json.loads(first.stdout)["id"] == json.loads(second.stdout)["id"]  # coalesced
    proc = appliance("audit", "verify", "--home", str(home.root))
    assert proc.returncode == 0 and "audit chain intact: 1 entries" in proc.stdout


def test_demo_with_port_in_use_fails_before_any_work(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = appliance("demo", "--home", str(tmp_path / "demo"), "--port", str(port), "--no-wait")
    line = one_error_line(proc)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert not (tmp_path / "demo").exists()
