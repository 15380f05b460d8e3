"""Import contracts: front ends depend on appliance.contract.api, which pulls in no heavy machinery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


def test_api_loads_neither_torch_nor_textual():
    loaded = _loaded_after("import appliance.contract.api")
    for heavy in ("torch", "textual", "transformers", "llama_cpp", "peft"):
        assert heavy not in loaded, f"import appliance.contract.api loaded {heavy}"


def test_cli_help_is_light():
    loaded = _loaded_after("import appliance.cli.command")
    assert "torch" not in loaded and "textual" not in loaded


def test_engine_never_imports_the_ui():
    for path in (REPO / "appliance").rglob("*.py"):
        text = path.read_text()
        for word in ("import textual", "from textual", "import tui", "from tui"):
            assert word not in text, f"{path.relative_to(REPO)} contains '{word}'"


def test_importing_appliance_makes_the_process_offline():
    code = "import os, appliance; print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])"
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["1", "1"]


# The terminal app depends on the engine's contract package only.
TUI_MAY_IMPORT = {
    "appliance",
    "appliance.contract",
    "appliance.contract.api",
    "appliance.contract.events",
    "appliance.contract.errors",
    "appliance.contract.names",
}


def test_tui_loads_no_heavy_machinery_and_only_the_engine_contract():
    loaded = _loaded_after("import tui.app")
    for heavy in ("torch", "transformers", "llama_cpp", "peft", "numpy"):
        assert heavy not in loaded, f"import tui.app loaded {heavy}"
    engine_modules = {m for m in loaded if m == "appliance" or m.startswith("appliance.")}
    assert engine_modules <= TUI_MAY_IMPORT, f"tui pulled in {sorted(engine_modules - TUI_MAY_IMPORT)}"


def test_tui_source_names_only_the_engine_contract():
    import re

    pattern = re.compile(r"^\s*(?:from\s+(appliance[\w.]*)\s+import|import\s+(appliance[\w.]*))", re.M)
    for path in (REPO / "tui").rglob("*.py"):
        for match in pattern.finditer(path.read_text()):
            module = match.group(1) or match.group(2)
            assert module in TUI_MAY_IMPORT, f"{path.relative_to(REPO)} imports {module} (deferred imports count too)"


def test_the_contract_is_pure_standard_library():
    loaded = _loaded_after("import appliance.contract.api, appliance.contract.names")
    appliance_modules = {m for m in loaded if m == "appliance" or m.startswith("appliance.")}
    assert appliance_modules <= TUI_MAY_IMPORT, f"the contract pulled in {sorted(appliance_modules - TUI_MAY_IMPORT)}"
    for third_party in ("httpx", "pydantic", "torch", "textual"):
        assert third_party not in loaded


def test_a_type_checker_confirms_the_local_engine_keeps_the_contract(tmp_path):
    """appliance/engine/local.py assigns LocalEngine to a ``type[Engine]`` for mypy: a method missing from
    the engine, or one whose signature drifted from appliance/contract/api.py, fails this."""
    pytest.importorskip("mypy")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--ignore-missing-imports",
            "--follow-imports=silent",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "mypy"),
            "appliance/contract",
            "appliance/engine/local.py",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
