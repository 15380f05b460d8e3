"""Padding-free packing: examples share a row without seeing each other."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE

from appliance.data.ingest.chat_jsonl import parse
from appliance.runtime.hf import load_causal_lm, load_tokenizer
from appliance.training.examples import collate, pack, plan_steps
from appliance.training.render import render
from appliance.training.train import step_loss


@pytest.fixture(scope="module")
def examples(tiny_base: Path):
    tokenizer = load_tokenizer(tiny_base)
    records = parse(SAMPLE / "policies.jsonl").records[:6]
    return [render(tokenizer, r, 512) for r in records]


@pytest.fixture(scope="module")
def model(tiny_base: Path):
    import torch

    m = load_causal_lm(tiny_base, dtype=torch.float32)
    m.eval()
    return m


def test_packed_loss_equals_unpacked(model, examples):
    import torch

    with torch.no_grad():
        packed, n_packed = step_loss(model, [examples], "cpu", backward=False)
        separate, n_separate = step_loss(model, [[e] for e in examples], "cpu", backward=False)
    assert n_packed == n_separate == sum(e.trained_tokens for e in examples)
    assert packed == pytest.approx(separate, abs=1e-5)


def test_without_restarting_positions_examples_would_leak(model, examples):
    """Negative control: the same row with running positions lets examples attend to each other."""
    import torch
    import torch.nn.functional as F

    batch = collate(examples, "cpu")
    labels = batch.pop("labels")[0]
    with torch.no_grad():
        keep = (labels[1:] != -100).nonzero().squeeze(-1)
        leaky = model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=keep).logits[0]
        leaky_loss = F.cross_entropy(leaky, labels[keep + 1]).item()
        separate, _ = step_loss(model, [[e] for e in examples], "cpu", backward=False)
    assert abs(leaky_loss - separate) > 1e-3


def test_pack_respects_the_row_budget(examples):
    rows = pack(examples, 128)
    assert [e for row in rows for e in row] == examples
    assert all(sum(len(e.input_ids) for e in row) <= 128 or len(row) == 1 for row in rows)


def test_plan_is_deterministic_and_covers_every_epoch(examples):
    a = plan_steps(examples, 2, 256, seed=7)
    b = plan_steps(examples, 2, 256, seed=7)
    assert [[e.input_ids for e in step] for step in a] == [[e.input_ids for e in step] for step in b]
    assert sum(len(step) for step in a) == 2 * len(examples)
    assert all(sum(len(e.input_ids) for e in step) <= 256 or len(step) == 1 for step in a)
    half = plan_steps(examples, 1.5, 256, seed=7)
    assert sum(len(step) for step in half) == len(examples) + len(examples) // 2
