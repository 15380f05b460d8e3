"""Stage 4, train: a LoRA adapter on the base, QLoRA (NF4 base) by default.

The loop is written here rather than with ``transformers.Trainer`` because the
appliance needs padding-free packing with exact token-weighted loss across
gradient accumulation, and full control over what is saved when (the adapter is
written only complete, through a staging folder).

Packing: several examples share one row; ``position_ids`` restart at 0 for each
and no attention mask is passed, so transformers builds a block-causal mask and no
example attends to another (checked in tests against unpacked losses).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import TrainError
from .events import Emit, Message, Progress, StageFinished, StageStarted, ignore
from .fsutil import staging_dir, write_json_atomic
from .paths import Home, RunDir
from .render import IGNORE, Example, RenderError, render
from .snapshot import Snapshot, records

STAGE = "train"
# Tokens per forward pass when config leaves it open. Measured here (SmolLM2-135M,
# 2 CPU cores): 256-token rows train ~15% faster than 512 and ~35% faster than 1024,
# because attention cost grows with the row; a GPU wants long rows.
MICRO_TOKENS = {"cpu": 256, "cuda": 4096}


@dataclass
class TrainResult:
    run_id: str
    snapshot_id: str
    steps: int
    best_val_loss: float | None
    train_tokens: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)


def default_epochs(n_examples: int) -> float:
    """Small data needs more passes (training.md); large data needs few."""
    return float(min(8, max(2, math.ceil(1200 / max(n_examples, 1)))))


def render_all(tokenizer: Any, recs: list, settings: Settings, emit: Emit) -> list[Example]:
    out = []
    for rec in recs:
        try:
            out.append(render(tokenizer, rec, settings.data.max_tokens, settings.data.too_long))
        except RenderError as exc:
            emit(Message(STAGE, f"record {rec.hash[:12]} skipped: {exc}", level="warning"))
    return out


def pack(examples: list[Example], micro_tokens: int) -> list[list[Example]]:
    """Greedy first-fit in the given order: rows of at most ``micro_tokens`` tokens."""
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for ex in examples:
        n = len(ex.input_ids)
        if current and used + n > micro_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        rows.append(current)
    return rows


def collate(row: list[Example], device: str) -> dict[str, Any]:
    import torch

    ids, pos, labels = [], [], []
    for ex in row:
        ids.extend(ex.input_ids)
        pos.extend(range(len(ex.input_ids)))
        labels.extend(ex.labels)
    as_tensor = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "position_ids": as_tensor(pos), "labels": as_tensor(labels)}


def plan_steps(examples: list[Example], epochs: float, tokens_per_step: int, seed: int,
               micro_tokens: int) -> list[list[list[Example]]]:
    """The whole schedule up front: a list of steps, each a list of packed rows."""
    rng = random.Random(seed)
    full_epochs, fraction = int(epochs), epochs - int(epochs)
    rows: list[list[Example]] = []
    for epoch in range(math.ceil(epochs)):
        order = examples[:]
        rng.shuffle(order)
        if epoch == full_epochs and fraction:
            order = order[: max(1, int(len(order) * fraction))]
        rows.extend(pack(order, micro_tokens))
    per_step = max(1, tokens_per_step // micro_tokens)
    return [rows[i: i + per_step] for i in range(0, len(rows), per_step)]


def load_trainable(base_dir: Path, settings: Settings, device: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from .hf import load_causal_lm, nf4_config

    compute = torch.bfloat16
    if settings.train.method == "qlora":
        model = load_causal_lm(base_dir, dtype=compute, quantization_config=nf4_config(compute), device=device)
        # Checkpointing trades ~20% speed for memory: worth it on a GPU, not for CPU-sized models.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=device == "cuda")
    else:
        model = load_causal_lm(base_dir, dtype=compute, device=device)
    targets = "all-linear" if settings.train.target_modules == "all-linear" else ["q_proj", "v_proj"]
    lora = LoraConfig(r=settings.train.lora_r, lora_alpha=settings.train.lora_alpha,
                      lora_dropout=settings.train.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False  # a cache would disable packed-sequence detection
    return model


def step_loss(model: Any, rows: list[list[Example]], device: str, backward: bool) -> tuple[float, int]:
    """Token-weighted loss over the rows of one step: sum of token losses / trained tokens.

    Logits are computed only where a trained token is predicted (``logits_to_keep``):
    with a 49k vocabulary the output layer is a large share of the work, and on chat
    data most positions are prompt tokens whose logits would be thrown away.
    """
    import torch
    import torch.nn.functional as F

    total_tokens = sum(ex.trained_tokens for row in rows for ex in row)
    loss_sum = 0.0
    for row in rows:
        batch = collate(row, device)
        labels = batch.pop("labels")[0]
        keep = (labels[1:] != IGNORE).nonzero().squeeze(-1)  # position i predicts token i + 1
        out = model(**batch, use_cache=False, logits_to_keep=keep)
        loss = F.cross_entropy(out.logits[0].float(), labels[keep + 1], reduction="sum") / max(total_tokens, 1)
        if backward:
            loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, total_tokens


def evaluate(model: Any, examples: list[Example], device: str, micro_tokens: int) -> float | None:
    import torch

    if not examples:
        return None
    model.eval()
    with torch.no_grad():
        loss, _ = step_loss(model, pack(examples, micro_tokens), device, backward=False)
    model.train()
    return loss


def train(home: Home, snapshot: Snapshot, settings: Settings, run_id: str | None = None,
          max_steps: int | None = None, emit: Emit = ignore) -> TrainResult:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from .device import set_threads, torch_device
    from .hf import load_tokenizer

    started = time.monotonic()
    base_dir = home.base(settings.base.name)
    if not base_dir.is_dir():
        raise TrainError(f"{base_dir}: base model missing; run 'appliance init'")
    run = home.run(run_id or time.strftime("run-%Y%m%d-%H%M%S"))
    run.root.mkdir(parents=True, exist_ok=True)
    device = torch_device()
    threads = set_threads(settings.train.threads)
    torch.manual_seed(settings.train.seed)

    emit(StageStarted(STAGE, description="Preparing data"))
    tokenizer = load_tokenizer(base_dir)
    train_ex = render_all(tokenizer, records(home, snapshot.train), settings, emit)
    val_ex = render_all(tokenizer, records(home, snapshot.val), settings, emit)
    if not train_ex:
        raise TrainError(f"snapshot {snapshot.id}: no training example survived rendering")
    epochs = settings.train.epochs or default_epochs(len(train_ex))
    micro = settings.train.micro_tokens or MICRO_TOKENS[device]
    steps = plan_steps(train_ex, epochs, settings.train.tokens_per_step, settings.train.seed, micro)
    limit = max_steps or settings.train.max_steps
    if limit:
        steps = steps[:limit]

    model = load_trainable(base_dir, settings, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.train.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(settings.train.warmup_ratio * len(steps)),
                                                len(steps))
    emit(StageStarted(STAGE, total=len(steps),
                      description=f"Learning from {len(train_ex)} examples, {epochs:g} epochs, {len(steps)} steps"))
    curve: list[dict[str, float]] = []
    best: tuple[float, int] | None = None
    trained_tokens = 0
    eval_every = max(1, len(steps) // max(1, math.ceil(epochs)))  # about once an epoch
    model.train()
    for step, rows in enumerate(steps, start=1):
        t0 = time.monotonic()
        loss, _ = step_loss(model, rows, device, backward=True)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(ex.input_ids) for row in rows for ex in row)
        trained_tokens += tokens
        if not math.isfinite(loss):
            raise TrainError(f"run {run.id}: the loss became {loss} at step {step}; lower train.learning_rate")
        point = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                 "tokens_per_s": tokens / max(time.monotonic() - t0, 1e-9)}
        if step % eval_every == 0 or step == len(steps):
            val = evaluate(model, val_ex, device, micro)
            if val is not None:
                point["val_loss"] = val
            score = val if val is not None else loss
            if best is None or score < best[0]:
                best = (score, step)
                _save_adapter(model, tokenizer, run)
        curve.append(point)
        emit(Progress(STAGE, completed=step, total=len(steps), metrics=point))

    result = TrainResult(run.id, snapshot.id, len(steps), best[0] if best and val_ex else None,
                         trained_tokens, time.monotonic() - started, curve)
    write_json_atomic(run.root / "train.json", {
        "run": run.id, "snapshot": snapshot.id, "base": settings.base.name, "device": device, "threads": threads,
        "method": settings.train.method, "epochs": epochs, "steps": len(steps), "best_step": best[1] if best else None,
        "best_val_loss": result.best_val_loss, "train_examples": len(train_ex), "val_examples": len(val_ex),
        "train_tokens": trained_tokens, "seconds": result.seconds, "settings": settings.train.model_dump(),
        "curve": curve,
    })
    emit(StageFinished(STAGE, seconds=result.seconds,
                       summary=f"{len(steps)} steps, best validation loss "
                               f"{result.best_val_loss:.3f}" if result.best_val_loss is not None
                               else f"{len(steps)} steps"))
    return result


def _save_adapter(model: Any, tokenizer: Any, run: RunDir) -> None:
    with staging_dir(run.adapter) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


__all__ = ["train", "TrainResult", "pack", "collate", "plan_steps", "IGNORE"]
