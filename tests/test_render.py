"""The loss mask covers exactly the assistant answers and their end-of-turn token."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.data.ingest.records import Record
from appliance.runtime.hf import load_tokenizer
from appliance.training.render import IGNORE, RenderError, render

CONVERSATION = [
    {"role": "system", "content": "You are the clinic's assistant."},
    {"role": "user", "content": "Where is the infusion suite?"},
    {"role": "assistant", "content": "Room C318, second floor."},
    {"role": "user", "content": "And who leads infection control?"},
    {"role": "assistant", "content": "Dr. Oswin Halvorsen."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm_tokenizer_dir: Path):
    return load_tokenizer(smollm_tokenizer_dir)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_mask_is_exactly_the_assistant_turns(tokenizer):
    example = render(tokenizer, Record("chat", {"messages": CONVERSATION}), 1024)
    eot = tokenizer.eos_token  # <|im_end|> for SmolLM2's ChatML template
    assert trained_text(tokenizer, example) == f"Room C318, second floor.{eot}Dr. Oswin Halvorsen.{eot}"
    assert len(example.input_ids) == len(example.labels)
    # labels equal the input ids wherever they are trained
    assert all(label in (IGNORE, tok) for tok, label in zip(example.input_ids, example.labels))


def test_too_long_is_rejected_or_truncated(tokenizer):
    record = Record("chat", {"messages": CONVERSATION})
    with pytest.raises(RenderError, match="longer than"):
        render(tokenizer, record, 40, "reject")
    truncated = render(tokenizer, record, 60, "truncate")
    assert len(truncated.input_ids) == 60


def test_documents_train_every_token(tokenizer):
    example = render(tokenizer, Record("text", {"text": "Sharps bins close after 57 hours."}), 1024)
    assert example.labels[0] == IGNORE
    assert all(label != IGNORE for label in example.labels[1:])


@pytest.mark.parametrize(
    "vocab, template, eot",
    [
        ("ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.2-3B-Instruct.jinja", "<|eot_id|>"),
        ("ggml-vocab-phi-3.gguf", "microsoft-Phi-3.5-mini-instruct.jinja", "<|end|>"),
    ],
)
def test_mask_with_other_families_templates(vocab: str, template: str, eot: str):
    """Real tokenizers and chat templates of other families, from llama.cpp's test vectors.

    Llama 3.2 inserts a dated system prompt; Phi-3.5 closes a finished conversation with
    <|endoftext|> after the last <|end|>: neither extra may be trained on."""
    from transformers import AutoTokenizer

    from appliance.runtime.toolchain import llama_cpp_dir

    models = llama_cpp_dir() / "models"
    tokenizer = AutoTokenizer.from_pretrained(models, gguf_file=vocab, local_files_only=True)
    tokenizer.chat_template = (models / "templates" / template).read_text()
    conversation = [m for m in CONVERSATION if m["role"] != "system"]
    example = render(tokenizer, Record("chat", {"messages": conversation}), 2048)
    assert trained_text(tokenizer, example) == f"Room C318, second floor.{eot}Dr. Oswin Halvorsen.{eot}"
