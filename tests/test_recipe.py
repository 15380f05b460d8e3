"""The training recipe adapts to the data and the base by the rules config describes."""

from __future__ import annotations

from appliance.home.config import TrainSection
from appliance.training.recipe import TOKENS_PER_STEP, choose, updates


def test_small_data_gets_enough_updates_at_a_lora_learning_rate():
    # 90 short Q&A conversations (~60 tokens each): the old default made 21 updates at 2e-4
    plan = choose(TrainSection(), n_examples=90, tokens=90 * 60, params=135_000_000)
    assert plan.learning_rate == 1e-3
    assert updates(90 * 60, plan.epochs, plan.tokens_per_step) >= TrainSection().min_steps
    assert plan.tokens_per_step < TOKENS_PER_STEP and plan.reasons


def test_tiny_data_takes_more_passes_but_never_more_than_max_epochs():
    train = TrainSection()
    plan = choose(train, n_examples=3, tokens=150, params=135_000_000)
    assert plan.tokens_per_step == 256 and plan.epochs == train.max_epochs


def test_large_data_keeps_full_steps_and_few_passes():
    plan = choose(TrainSection(), n_examples=20_000, tokens=4_000_000, params=8_000_000_000)
    assert plan.tokens_per_step == TOKENS_PER_STEP and plan.epochs == 2 and plan.learning_rate == 2e-4


def test_settings_people_wrote_are_kept():
    train = TrainSection(learning_rate=5e-5, epochs=1, tokens_per_step=4096)
    plan = choose(train, n_examples=10, tokens=500, params=135_000_000)
    assert (plan.learning_rate, plan.epochs, plan.tokens_per_step) == (5e-5, 1, 4096) and plan.reasons == []
