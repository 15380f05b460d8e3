"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, and homes built on it.

The tokenizer is the embedded default's own (llama.cpp's converter recognises its
pre-tokenizer); the weights are random and tiny so every stage runs in seconds.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

import appliance  # noqa: F401  (sets the offline environment first)
from appliance.cli.init import create_home
from appliance.home.config import Settings
from appliance.home.paths import Home

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "clinic"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_settings() -> Settings:
    s = Settings()
    s.base.name = "tiny"
    s.train.max_steps = 3
    s.train.tokens_per_step = 512
    s.train.learning_rate = 1e-3
    s.train.lora_r = 4
    s.train.lora_alpha = 8
    # BM25 alone, so tests can check exact rankings; the shipped word vectors have their own
    # tests (test_grounding.py) and are on in a fresh home.
    s.grounding.word_vectors = False
    return s


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from appliance.training.basemodel import embedded_gguf

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    out = tmp_path_factory.mktemp("smollm-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    """A 2-layer, 64-wide Llama (about 3M parameters, mostly the embedding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(tokenizer, out)
    return out


def save_tiny_llama(tokenizer, out: Path) -> None:
    """The tiny Llama with ``tokenizer``'s vocabulary, pretrained a few steps, saved in bf16 with the
    tokenizer (benchmarks/smoke.py builds the same model for the benchmarks' smoke sizes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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


def _pretrain(model, tokenizer, steps: int = 40) -> None:
    """A few full-model steps on the sample data, so the tiny model has peaked, not flat,
    next-token distributions: quantization checks (top-1 agreement) mean little on
    random logits whose top candidates are nearly tied."""
    import torch

    from appliance.data.ingest.chat_jsonl import parse
    from appliance.training.examples import pack
    from appliance.training.render import render
    from appliance.training.train import step_loss

    examples = [render(tokenizer, r, 512) for r in parse(SAMPLE / "policies.jsonl").records]
    rows = pack(examples, 512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        step_loss(model, [rows[step % len(rows)]], "cpu", backward=True)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture()
def tiny_home(tmp_path: Path, tiny_base: Path) -> Home:
    """An initialised home on the tiny base, with the clinic conversations in the inbox (not yet ingested)."""
    home = create_home(tmp_path / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text('{"source": "tiny test model"}')
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    return home
