"""Import contracts: front ends depend on appliance.api, which pulls in no heavy machinery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


def test_api_loads_neither_torch_nor_textual():
    loaded = _loaded_after("import appliance.api")
    for heavy in ("torch", "textual", "transformers", "llama_cpp", "peft"):
        assert heavy not in loaded, f"import appliance.api loaded {heavy}"


def test_cli_help_is_light():
    loaded = _loaded_after("import appliance.cli")
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
