"""Stage 6, convert: HF checkpoint -> GGUF f16 with llama.cpp's own converter.

The converter runs in a subprocess with its own gguf-py (toolchain.py). Architectures
are checked against an explicit list before it runs: an unsupported one is refused
with a clear message rather than handed to the converter to guess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .errors import ExportError
from .events import Emit, StageFinished, StageStarted, ignore
from .toolchain import converter_env, llama_cpp_dir

STAGE = "convert"
# Architectures whose conversion the test suite exercises on tiny models.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


def architecture(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise ExportError(f"{model_dir}/config.json: expected one architecture, found {archs}")
    return archs[0]


def convert(model_dir: Path, out_file: Path, outtype: str = "f16", metadata: dict | None = None,
            emit: Emit = ignore) -> Path:
    """Write ``out_file`` (complete or absent). Skips work if it already exists."""
    if out_file.exists():
        return out_file
    arch = architecture(model_dir)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"{model_dir}: architecture {arch} is not supported for export "
                          f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    started = time.monotonic()
    emit(StageStarted(STAGE, description=f"Converting to GGUF {outtype}"))
    tool_dir = llama_cpp_dir()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    cmd = [sys.executable, str(tool_dir / "convert_hf_to_gguf.py"), str(model_dir),
           "--outfile", str(partial), "--outtype", outtype]
    if metadata:
        meta_file = out_file.with_name(out_file.name + ".metadata.json")
        meta_file.write_text(json.dumps(metadata))
        cmd += ["--metadata", str(meta_file)]
    proc = subprocess.run(cmd, env=converter_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ExportError(f"{model_dir}: llama.cpp's converter failed: {_reason(proc.stderr)}")
    partial.replace(out_file)
    emit(StageFinished(STAGE, summary=f"{out_file.name} ({out_file.stat().st_size / 1e6:.0f} MB)",
                       seconds=time.monotonic() - started))
    return out_file


def _reason(stderr: str) -> str:
    """The converter's last error line (it logs a lot before failing)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[-400:]
    return lines[-1][-400:] if lines else "no output"
