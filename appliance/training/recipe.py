"""The training recipe: learning rate, passes and step size, chosen from the data and the base.

One recipe for every home (the demo included): what is not set in ``[train]`` is decided
here by rules written in config's field descriptions, and the choice with its reasons goes
into ``train.json``. The rules come from what was measured on small data (training.md):
facts are learned from many updates at a LoRA-sized learning rate, so a small data set gets
smaller optimizer steps and more passes rather than a handful of updates that leave the
loss where it started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from appliance.home.config import TrainSection

# (fewer parameters than, learning rate): LoRA wants about ten times a full fine-tune's rate,
# and larger bases want less (training.md, "Teaching facts").
LEARNING_RATES = ((1_000_000_000, 1e-3), (4_000_000_000, 4e-4), (math.inf, 2e-4))
TOKENS_PER_STEP = 1024  # packed tokens per update when the data is large enough
MIN_TOKENS_PER_STEP = 256  # below this an update is too noisy to help


@dataclass(frozen=True)
class Recipe:
    learning_rate: float
    epochs: float
    tokens_per_step: int
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "tokens_per_step": self.tokens_per_step,
            "reasons": self.reasons,
        }


def default_epochs(n_examples: int) -> float:
    """Small data needs more passes (training.md); large data needs few."""
    return float(min(8, max(2, math.ceil(1200 / max(n_examples, 1)))))


def learning_rate_for(params: int) -> float:
    return next(rate for limit, rate in LEARNING_RATES if params < limit)


def updates(tokens: int, epochs: float, tokens_per_step: int) -> int:
    """About how many optimizer steps ``epochs`` passes over ``tokens`` make."""
    return math.ceil(tokens * epochs / max(tokens_per_step, 1))


def choose(train: TrainSection, n_examples: int, tokens: int, params: int) -> Recipe:
    """What ``train`` leaves unset, chosen for ``n_examples`` examples of ``tokens`` tokens
    in total on a base of ``params`` parameters; each choice says why."""
    reasons: list[str] = []
    lr = train.learning_rate
    if lr is None:
        lr = learning_rate_for(params)
        reasons.append(f"learning rate {lr:g} for a {params / 1e6:.0f}M-parameter base")
    epochs = train.epochs
    if epochs is None:
        epochs = default_epochs(n_examples)
        reasons.append(f"{epochs:g} passes for {n_examples} examples")
    step = train.tokens_per_step
    if step is None:
        step = TOKENS_PER_STEP
        if updates(tokens, epochs, step) < train.min_steps:
            step = max(MIN_TOKENS_PER_STEP, int(tokens * epochs // train.min_steps))
            reasons.append(f"{step} tokens a step, so {tokens} tokens make at least {train.min_steps} updates")
    if train.epochs is None and updates(tokens, epochs, step) < train.min_steps:
        needed = math.ceil(train.min_steps * step / max(tokens, 1))
        epochs = float(min(train.max_epochs, max(epochs, needed)))
        reasons.append(
            f"{epochs:g} passes, so the data makes at least {train.min_steps} updates (at most {train.max_epochs:g})"
        )
    return Recipe(lr, epochs, step, reasons)
