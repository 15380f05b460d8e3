"""Stage 5, merge: fold the LoRA adapter into the full-precision base.

The base is loaded dequantized, in float32 (never the 4-bit NF4 weights used in
training: merging into those degrades the model, and bitsandbytes tensors cannot be
converted to GGUF at all). The merged weights are saved as float16, the type of the
GGUF that is made from them: the f16 file then holds exactly the checked weights, and
a small LoRA update keeps 11 significant bits instead of bfloat16's 8.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from appliance.contract.errors import ExportError
from appliance.contract.events import Emit, StageFinished, StageStarted, ignore
from appliance.home.fsutil import staging_dir
from appliance.runtime.hf import load_causal_lm, load_tokenizer
from appliance.training.methods import is_full_checkpoint

STAGE = "merge"


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, emit: Emit = ignore) -> Path:
    if (out_dir / "config.json").exists():
        return out_dir  # complete: staging_dir only ever renames a finished folder into place
    if not (adapter_dir / "adapter_config.json").exists() and not is_full_checkpoint(adapter_dir):
        raise ExportError(f"{adapter_dir}: no trained adapter here; run 'appliance train' first")
    started = time.monotonic()
    emit(StageStarted(STAGE, description="Merging the adapter into the base"))
    merged = merged_model(base_dir, adapter_dir)
    with staging_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(base_dir).save_pretrained(tmp)
    emit(StageFinished(STAGE, summary=f"merged model in {out_dir}", seconds=time.monotonic() - started))
    return out_dir


def merged_model(base_dir: Path, adapter_dir: Path) -> Any:
    """Base (float32) + adapter (LoRA, DoRA, AdaLoRA or IA3), merged and cast to float16,
    or a fully fine-tuned model cast to float16; refuses NaN/Inf anywhere."""
    if is_full_checkpoint(adapter_dir):  # full fine-tuning: the run saved the whole model
        merged = load_causal_lm(adapter_dir, dtype=torch.float32).to(torch.float16)
    else:
        base = load_causal_lm(base_dir, dtype=torch.float32)
        # peft's safe_merge would copy every weight to look for NaN; the check below covers
        # NaN and Inf, after the cast, once.
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(torch.float16)
    bad = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(
            f"{adapter_dir}: merged weights hold NaN/Inf (or overflow float16) in {bad[0]}"
            f" and {len(bad) - 1} more tensor(s)"
        )
    merged.config.dtype = torch.float16
    return merged
