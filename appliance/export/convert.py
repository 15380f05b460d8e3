"""Stage 6, convert: HF checkpoint -> GGUF f16 with llama.cpp's own converter.

The converter runs in a subprocess with its own gguf-py (toolchain.py). Architectures
are checked against an explicit list before it runs: an unsupported one is refused
with a clear message rather than handed to the converter to guess. So is a BPE
tokenizer whose pre-tokenizer the converter does not recognise: a plausible name
would load and tokenize some text differently (gguf-conversion.md, "Pitfalls").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.contract.errors import ExportError
from appliance.contract.events import Emit, StageFinished, StageStarted, ignore
from appliance.runtime.toolchain import converter_env, llama_cpp_dir
from appliance.training.methods import adapter_kind

STAGE = "convert"
# Each is converted, loaded and parity-checked by tests/test_convert_families.py on a
# tiny model with its family's real tokenizer and chat template.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "Llama (Llama-3 BPE or SentencePiece tokenizer)",
    "MistralForCausalLM": "Mistral (SentencePiece)",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "Gemma3ForCausalLM": "Gemma 3 (text)",
    "Phi3ForCausalLM": "Phi-3",
}
# Why an architecture the converter handles is still refused here.
NOT_SUPPORTED_BECAUSE = {
    "Gemma2ForCausalLM": "transformers runs Gemma 2 only with eager attention (logit soft-capping), "
    "and training and the parity check here use SDPA",
}
# The converter's own words for failures a person can act on, and what to tell them.
KNOWN_FAILURES = {
    "BPE pre-tokenizer was not recognized": (
        "the tokenizer's BPE pre-tokenizer is not one llama.cpp's converter recognises; refusing to guess one "
        "(a wrong guess loads and then tokenizes some text differently)"
    ),
    "absmax": "the checkpoint still holds 4-bit bitsandbytes tensors; merge into the dequantized base instead",
    "tokenizer.model": "this architecture needs the SentencePiece tokenizer.model next to the weights",
}


def architecture(model_dir: Path) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{model_dir}/config.json: cannot read it ({exc})") from None
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise ExportError(f"{model_dir}/config.json: expected one architecture, found {archs}")
    return archs[0]


def require_supported(model_dir: Path) -> str:
    arch = architecture(model_dir)
    if arch not in SUPPORTED_ARCHITECTURES:
        why = f": {NOT_SUPPORTED_BECAUSE[arch]}" if arch in NOT_SUPPORTED_BECAUSE else ""
        raise ExportError(
            f"{model_dir}: architecture {arch} is not supported for export{why} "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    return arch


def convert(
    model_dir: Path, out_file: Path, outtype: str = "f16", metadata: dict[str, Any] | None = None, emit: Emit = ignore
) -> Path:
    """Write ``out_file`` (complete or absent). Skips work if it already exists."""
    if out_file.exists():
        return out_file
    arch = require_supported(model_dir)
    started = time.monotonic()
    emit(StageStarted(STAGE, description=f"Converting to GGUF {outtype}"))
    args = [str(model_dir), "--outtype", outtype]
    if metadata:
        meta_file = out_file.with_name(out_file.name + ".metadata.json")
        meta_file.parent.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(_named_for_llama_cpp(metadata, arch)))
        args += ["--metadata", str(meta_file)]
    run_converter("convert_hf_to_gguf.py", args, out_file, model_dir)
    emit(
        StageFinished(
            STAGE,
            summary=f"{out_file.name} ({out_file.stat().st_size / 1e6:.0f} MB)",
            seconds=time.monotonic() - started,
        )
    )
    return out_file


def convert_lora(base_dir: Path, adapter_dir: Path, out_file: Path, outtype: str = "f16", emit: Emit = ignore) -> Path:
    """The PEFT adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py)."""
    if out_file.exists():
        return out_file
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(
            f"{adapter_dir}: no trained adapter here (a fully fine-tuned run has no adapter to "
            "serve separately); export it without --adapter"
        )
    kind = adapter_kind(adapter_dir)
    if kind != "LORA":  # llama.cpp's LoRA format holds plain A/B pairs (no DoRA magnitudes, AdaLoRA's E, IA3)
        raise ExportError(
            f"{adapter_dir}: a {kind} adapter cannot be served as a llama.cpp LoRA; export it merged, without --adapter"
        )
    require_supported(base_dir)
    started = time.monotonic()
    emit(StageStarted(STAGE, description="Converting the adapter to a GGUF LoRA"))
    run_converter(
        "convert_lora_to_gguf.py",
        ["--base", str(base_dir), "--outtype", outtype, str(adapter_dir)],
        out_file,
        adapter_dir,
    )
    emit(
        StageFinished(
            STAGE,
            summary=f"{out_file.name} ({out_file.stat().st_size / 1e6:.1f} MB)",
            seconds=time.monotonic() - started,
        )
    )
    return out_file


def run_converter(script: str, args: list[str], out_file: Path, source: Path) -> None:
    """Run one of llama.cpp's converter scripts; ``out_file`` appears complete or not at all."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    cmd = [sys.executable, str(llama_cpp_dir() / script), *args, "--outfile", str(partial)]
    proc = subprocess.run(cmd, env=converter_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise ExportError(f"{source}: llama.cpp's {script} failed: {reason(proc.stderr)}")
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())  # the rename below must never expose a half-written file after a crash
    partial.replace(out_file)


def _named_for_llama_cpp(metadata: dict[str, Any], arch: str) -> dict[str, Any]:
    """llama.cpp keys some tokenizer rules on general.name (Phi-3's special tokens strip
    the whitespace after them only when the name says phi3), so the name carries the
    architecture; without it a Phi-3 export tokenizes chat prompts differently."""
    name = metadata.get("general.name")
    return {**metadata, "general.name": f"{name} ({arch})"} if name else metadata


def reason(stderr: str) -> str:
    """The converter's last error line, in a person's words where the failure is a known one."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "no output")
    for needle, explanation in KNOWN_FAILURES.items():
        if needle in last:
            return f"{explanation} ({last[-200:]})"
    return last[-400:]
