"""R11: the pipeline runs with networking disabled and never tries to reach the network.

The commands run inside a network namespace with only loopback (``unshare -n``), and
every Python process (the converter and llama.cpp children included) carries an audit
hook that records any attempt to resolve a name or connect to a non-loopback address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SAMPLE

HOOK = textwrap.dedent("""
    import os, sys
    _log = os.environ["NET_ATTEMPTS_LOG"]
    _LOCAL = ("127.", "::1", "localhost", "/")
    def _hook(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
            target = args[1] if event == "socket.connect" else args[0]
            host = target[0] if isinstance(target, tuple) else target
            if isinstance(host, bytes):
                host = host.decode()
            if not str(host).startswith(_LOCAL):
                with open(_log, "a") as f:
                    f.write(f"{os.getpid()} {event} {target!r}\\n")
    sys.addaudithook(_hook)
""")


# the word vectors retrieval uses by default load from their wheel, never from the hub
WORD_VECTORS = (
    "from appliance.data import wordvectors as w; assert w.available(); assert len(w.embed(['badge'])[0]) == 256"
)


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def hooked(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose Python processes carry the audit hook, and the log it writes to."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    attempts = tmp_path / "attempts.log"
    path = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "NET_ATTEMPTS_LOG": str(attempts)}, attempts


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -n (root or user namespaces)")
def test_pipeline_without_network(tmp_path: Path, tiny_base: Path):
    env, attempts = hooked(tmp_path)
    home = tmp_path / "home"
    cli = f"{sys.executable} -m appliance.cli.command"
    script = f"""
        set -e
        ip link set lo up
        {cli} init --home {home} --base {tiny_base}
        cp {SAMPLE / "policies.jsonl"} {home}/inbox/
        {cli} ingest --home {home} --json
        RUN=$({cli} train --home {home} --max-steps 2 --json | {sys.executable} -c 'import json,sys; print(json.load(sys.stdin)["run"])')
        {cli} export --home {home} "$RUN" --json
        {cli} promote --home {home} v1
        {sys.executable} -c "{WORD_VECTORS}"
    """
    proc = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (home / "models" / "v1" / "model.gguf").exists()
    assert not attempts.exists(), attempts.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -n (root or user namespaces)")
def test_training_on_two_processes_without_network(tmp_path: Path, tiny_base: Path):
    """torchrun's rendezvous and gloo stay on the loopback interface (the worker's unit has no other)."""
    env, attempts = hooked(tmp_path)
    home = tmp_path / "home"
    cli = f"{sys.executable} -m appliance.cli.command"
    two = (
        "from appliance.home.config import load, dump; import sys, pathlib; p = pathlib.Path(sys.argv[1]); "
        "s = load(p); s.train.processes = 2; p.write_text(dump(s))"
    )
    script = f"""
        set -e
        ip link set lo up
        {cli} init --home {home} --base {tiny_base}
        {sys.executable} -c "{two}" {home}/config.toml
        cp {SAMPLE / "policies.jsonl"} {home}/inbox/
        {cli} ingest --home {home} --json
        {cli} train --home {home} --max-steps 2 --json
    """
    proc = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [d for d in (home / "runs").iterdir() if (d / "train.json").exists()]  # runs/base holds no training
    train = json.loads((run / "train.json").read_text())
    assert train["processes"] == 2 and train["steps"] == 2
    assert not attempts.exists(), attempts.read_text()


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -n (root or user namespaces)")
def test_the_hook_would_see_an_attempt(tmp_path: Path):
    """Control: the hook records a non-loopback connection attempt. It runs in an empty
    network namespace too, so the attempt fails at once and no packet leaves the machine."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    attempts = tmp_path / "attempts.log"
    code = (
        "import socket; s = socket.socket(); s.settimeout(0.01)\ntry: s.connect(('192.0.2.1', 9))\nexcept OSError: pass"
    )
    subprocess.run(
        ["unshare", "-n", sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(hook_dir), "NET_ATTEMPTS_LOG": str(attempts)},
        check=True,
    )
    assert "192.0.2.1" in attempts.read_text()
