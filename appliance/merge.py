"""Stage 5, merge: fold the LoRA adapter into the full-precision base.

The base is loaded dequantized (never the 4-bit NF4 weights used in training:
merging into those degrades the model, and bitsandbytes tensors cannot be
converted to GGUF at all).
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import ExportError
from .events import Emit, StageFinished, StageStarted, ignore
from .fsutil import staging_dir

STAGE = "merge"


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, emit: Emit = ignore) -> Path:
    if (out_dir / "config.json").exists():
        return out_dir  # complete: staging_dir only ever renames a finished folder into place
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir}: no trained adapter here; run 'appliance train' first")
    import torch
    from peft import PeftModel

    from .hf import load_causal_lm, load_tokenizer

    started = time.monotonic()
    emit(StageStarted(STAGE, description="Merging the adapter into the base"))
    base = load_causal_lm(base_dir, dtype=torch.float32)
    save_dtype = base.config.dtype if isinstance(getattr(base.config, "dtype", None), torch.dtype) else torch.bfloat16
    model = PeftModel.from_pretrained(base, adapter_dir)
    try:
        merged = model.merge_and_unload(safe_merge=True)  # raises on NaN in the merged weights
    except ValueError as exc:
        raise ExportError(f"{adapter_dir}: merging produced invalid weights ({exc})") from None
    bad = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"{adapter_dir}: merged weights hold NaN/Inf in {bad[0]} (and {len(bad) - 1} more)")
    with staging_dir(out_dir) as tmp:
        merged.to(save_dtype).save_pretrained(tmp)
        load_tokenizer(base_dir).save_pretrained(tmp)
    emit(StageFinished(STAGE, summary=f"merged model in {out_dir}", seconds=time.monotonic() - started))
    return out_dir
