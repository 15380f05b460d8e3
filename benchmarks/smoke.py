"""What the benchmarks' ``--smoke`` size shares: the tests' tiny random model.

A smoke run takes the same code path as the real benchmark at a size that finishes in
seconds, so a benchmark that no longer runs is caught by the fast test tier
(tests/test_benchmarks.py) instead of on the day someone wants its figures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_BASE_ENV = "BENCH_TINY_BASE"  # a tiny base already built (the tests pass their fixture's)


def smoke_base(work: Path) -> Path:
    """The tiny base named by $BENCH_TINY_BASE, else one built into ``work``/tiny (about 30 s
    on two busy cores, mostly reading the tokenizer out of the GGUF and pretraining)."""
    if given := os.environ.get(TINY_BASE_ENV):
        return Path(given)
    return tiny_base(work / "tiny")


def tiny_base(out: Path) -> Path:
    """tests/conftest.py's ``tiny_base`` outside pytest (a fixture cannot be called): the
    same 2-layer, 64-wide Llama with SmolLM2's real tokenizer, pretrained a few steps on
    the clinic sample by conftest's own helper, saved as an HF checkpoint in ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from appliance.training.basemodel import embedded_gguf

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import _pretrain

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
