"""Loading models and tokenizers with transformers, offline, from folders in the home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from appliance.contract.errors import BaseModelError


def load_tokenizer(model_dir: Path) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{model_dir}: cannot load the tokenizer ({_first_line(exc)})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise BaseModelError(f"{model_dir}: the tokenizer has no fast (Rust) version; the loss mask needs offsets")
    if not tokenizer.chat_template:
        raise BaseModelError(f"{model_dir}: the tokenizer has no chat template; use an instruction-tuned base")
    return tokenizer


def load_causal_lm(model_dir: Path, dtype: Any = None, quantization_config: Any = None, device: str = "cpu") -> Any:
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            local_files_only=True,
            dtype=dtype or torch.float32,
            quantization_config=quantization_config,
            device_map={"": device},
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{model_dir}: cannot load the model ({_first_line(exc)})") from None


def nf4_config(compute_dtype: Any, shardable: bool = False) -> Any:
    """QLoRA's quantization: NF4 with double quantization (Dettmers et al. 2023).
    ``shardable``: the packed 4-bit weights are stored as bf16 elements, a dtype FSDP can
    flatten and shard with the rest of the model (the FSDP-QLoRA recipe)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.bfloat16 if shardable else torch.uint8,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
