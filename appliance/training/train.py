"""Stage 4, train: a LoRA adapter on the base, QLoRA (NF4 base) by default.

The loop is written here rather than with ``transformers.Trainer`` because the
appliance needs padding-free packing with exact token-weighted loss across
gradient accumulation, logits only where a token is trained, and full control
over what is written when: checkpoints and the best adapter are only ever
complete (staging folder, then rename), so a ``kill -9`` at any moment loses at
most one checkpoint interval and a half-written checkpoint is never picked.

Packing: several examples share one row; ``position_ids`` restart at 0 for each
and no attention mask is passed, so transformers builds a block-causal mask and no
example attends to another (tests/test_packing.py checks it against unpacked losses).
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from appliance.contract.errors import TrainError
from appliance.contract.events import Emit, Message, Progress, StageFinished, StageStarted, ignore
from appliance.data.decontaminate import decontaminate
from appliance.data.snapshot import Snapshot, records
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, staging_dir, write_json_atomic
from appliance.home.paths import Home, RunDir
from appliance.runtime.device import compute_dtype, set_threads, torch_device
from appliance.runtime.hf import load_causal_lm, load_tokenizer, nf4_config
from appliance.training import incremental, methods, recipe, sharding
from appliance.training.distributed import Group
from appliance.training.examples import collate, general_examples, pack, plan_steps, render_all, study_records
from appliance.training.methods import count_parameters
from appliance.training.render import IGNORE, Example

STAGE = "train"
# Tokens per forward pass when config leaves it open. Measured here (SmolLM2-135M,
# 2 CPU cores): 256-token rows train ~15% faster than 512 and ~35% faster than 1024,
# because attention cost grows with the row; a GPU wants long rows.
MICRO_TOKENS = {"cpu": 256, "cuda": 4096}
# Fault injection for tests (a failpoint): any forward pass over more tokens than
# this raises an out-of-memory error, as a GPU would. Unset in normal use.
FAULT_OOM_ENV = "APPLIANCE_FAULT_OOM_ABOVE_TOKENS"


@dataclass
class TrainResult:
    run_id: str
    snapshot_id: str
    steps: int
    best_val_loss: float | None
    train_tokens: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    run: str
    snapshot: str
    total_steps: int
    step: int = 0
    micro_tokens: int = 256
    trained_tokens: int = 0
    best_score: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    resumed_from: list[int] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)  # per session: a run may resume on another number
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)


# --- model -----------------------------------------------------------------------------


def load_trainable(
    base_dir: Path,
    settings: Settings,
    device: str,
    method: str | None = None,
    total_steps: int = 1,
    sharded: bool = False,
) -> Any:
    """The base with what ``method`` (default: the configured one; auto means qlora here)
    trains: a peft adapter on it, or (full) every weight. ``sharded``: the 4-bit weights are
    stored in bf16, which FSDP can shard (training/sharding.py)."""
    method = method or (settings.train.method if settings.train.method != "auto" else "qlora")
    compute = compute_dtype(device)  # bf16 where native, else float32 (runtime/device.py)
    if method == "full":  # fp32 weights: AdamW updates to bf16 weights would mostly round away
        model = load_causal_lm(base_dir, dtype=torch.float32, device=device)
        model.config.use_cache = False
        return model
    if method == "qlora":
        model = prepare_qlora(
            load_causal_lm(base_dir, dtype=compute, quantization_config=nf4_config(compute, sharded), device=device),
            device,
        )
    else:
        model = load_causal_lm(base_dir, dtype=compute, device=device)
    model = get_peft_model(model, methods.peft_config(method, settings.train, total_steps))
    model.config.use_cache = False  # a cache would disable packed-sequence detection
    return model


def resolve_method(
    run: RunDir,
    base_dir: Path,
    settings: Settings,
    n_examples: int,
    device: str,
    emit: Emit,
    how: incremental.Plan | None = None,
    processes: int = 1,
) -> methods.Choice:
    """The run's method (and, on several processes, ddp or fsdp), decided once and kept in
    ``method.json`` (a resumed run must not switch methods because free memory changed); an
    incremental run keeps its parent's method."""
    saved = run.method_json
    if saved.exists():
        return methods.Choice(**read_json(saved))
    budget = methods.memory_budget(settings.train.memory_budget_gb, device)
    if how is not None and how.incremental and how.method:
        choice = methods.Choice(how.method, f"continues the adapter of {how.parent}")
    else:
        choice = methods.choose(settings.train.method, base_dir, n_examples, budget)
    if processes > 1:
        per_process = budget if device == "cuda" else budget // processes  # CPU ranks share the RAM
        layout, why = methods.choose_distributed(
            settings.train.distributed, choice.method, count_parameters(base_dir), per_process, processes
        )
        choice = replace(choice, distributed=layout, distributed_reason=why)
        if settings.train.distributed == "auto":
            emit(Message(STAGE, f"{processes} processes, {layout}: {why}"))
    write_json_atomic(saved, asdict(choice))
    if settings.train.method == "auto":
        emit(Message(STAGE, f"method {choice.method}: {choice.reason}"))
    return choice


def prepare_qlora(model: Any, device: str) -> Any:
    """Freeze the 4-bit base for LoRA training.

    peft's ``prepare_model_for_kbit_training`` would also upcast every non-quantized
    weight to fp32; the frozen embedding and output layer are the largest of those
    (over 4 GiB together for a 128k vocabulary at 8B), and the NF4 layers compute in
    the compute dtype anyway, so the base stays in it here (bf16 where native).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if device == "cuda":
        # Checkpointing trades ~20% speed for a large cut in activation memory: worth it
        # on a GPU, not for the CPU-sized models this runs on without one.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    _keep_4bit_weights_trainable(model)
    return model


def _keep_4bit_weights_trainable(model: Any) -> None:
    """bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks a 4-bit weight for a faster
    kernel the first time the layer runs in eval mode without gradients (our validation
    pass) and keeps it packed. That kernel has no backward, so every later training step
    silently loses the gradient through the base weights (torch warns "an autograd kernel
    was not registered"). Validation runs mid-training here, so the repacking is switched
    off; tests/test_train.py checks gradients before and after a validation pass."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class TrainInterrupted(Exception):
    """Asked to stop (the daemon got SIGTERM): the run resumes from its last checkpoint."""


def step_loss(
    model: Any,
    rows: list[list[Example]],
    device: str,
    backward: bool,
    stop: Callable[[], bool] | None = None,
    tokens: int | None = None,
    group: Group | None = None,
) -> tuple[float, int]:
    """Token-weighted loss over the rows of one step: sum of token losses / trained tokens
    (``tokens``: the whole step's, when these rows are one process's share of it). Sharded
    (FSDP), every rank runs as many passes as the busiest one and gradients are reduced
    after the last.

    Logits are computed only where a trained token is predicted (``logits_to_keep``):
    with a 49k vocabulary the output layer is a large share of the work, and on chat
    data most positions are prompt tokens whose logits would be thrown away.
    """
    total_tokens = tokens or sum(ex.trained_tokens for row in rows for ex in row)
    oom_above = int(os.environ.get(FAULT_OOM_ENV) or 0)
    loss_sum = 0.0
    real = len(rows)
    if group is not None and group.sharded:
        rows, real = sharding.even_rows(rows)
    for index, row in enumerate(rows):
        if stop is not None and stop():  # between passes: a step can take minutes on a CPU
            raise TrainInterrupted()
        batch = collate(row, device)
        if oom_above and batch["input_ids"].shape[1] > oom_above:
            raise torch.OutOfMemoryError(f"injected: {batch['input_ids'].shape[1]} tokens > {oom_above}")
        labels = batch.pop("labels")[0]
        keep = (labels[1:] != IGNORE).nonzero().squeeze(-1)  # position i predicts token i + 1
        out = model(**batch, use_cache=False, logits_to_keep=keep)
        loss = F.cross_entropy(out.logits[0].float(), labels[keep + 1], reduction="sum") / max(total_tokens, 1)
        if index >= real:
            loss = loss * 0.0  # a filler pass (sharding.even_rows): in the collectives, not in the loss
        if backward:
            if group is not None and group.sharded:
                sharding.set_sync(model, index == len(rows) - 1)
            loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, total_tokens


def evaluate(
    model: Any, examples: list[Example], device: str, micro_tokens: int, group: Group | None = None
) -> float | None:
    """Token-weighted loss over ``examples`` (each process scores its share; the sum is the same)."""
    if not examples:
        return None
    group = group or Group()
    tokens = sum(ex.trained_tokens for ex in examples)
    model.eval()
    with torch.no_grad():
        rows = pack(group.shard(examples), micro_tokens)
        loss, _ = step_loss(model, rows, device, backward=False, tokens=tokens, group=group)
    model.train()
    return group.total(loss)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def train_step(
    model: Any,
    examples: list[Example],
    state: TrainState,
    device: str,
    emit: Emit,
    stop: Callable[[], bool] | None = None,
    tokens: int | None = None,
    group: Group | None = None,
) -> float:
    """Forward/backward over one step's examples (``tokens``: the whole step's trained tokens,
    when ``examples`` are this process's share). Out of memory halves the tokens per forward
    pass (more accumulation, same effective batch) and retries the step; the smaller setting
    is kept for the rest of the run, resumes included. Sharded, a rank cannot retry alone
    (the others wait in a collective): the out-of-memory error ends the attempt."""
    while True:
        rows = pack(examples, state.micro_tokens)
        try:
            loss, _ = step_loss(model, rows, device, backward=True, stop=stop, tokens=tokens, group=group)
            return loss
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or (group is not None and group.sharded):
                raise
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            if all(len(row) == 1 for row in rows):
                longest = max(len(e.input_ids) for e in examples)
                raise TrainError(
                    f"out of memory even with one {longest}-token example per pass; "
                    "lower data.max_tokens or use a smaller base"
                ) from None
            state.micro_tokens = max(1, state.micro_tokens // 2)
            emit(
                Message(
                    STAGE,
                    f"out of memory: now {state.micro_tokens} tokens per pass, accumulating more passes per step",
                    level="warning",
                )
            )


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- checkpoints -------------------------------------------------------------------------


def save_checkpoint(
    run: RunDir, model: Any, optimizer: Any, scheduler: Any, state: TrainState, keep: int, group: Group | None = None
) -> None:
    """Write a checkpoint of the last complete step (rank 0 writes; sharded, every rank must call
    it, as each holds a shard of what is saved). Weights and optimizer state are full tensors
    keyed by parameter name, so any number of processes can resume from them."""
    group = group or Group()
    if not (group.is_main or group.sharded):
        return
    weights = {k: v.detach().cpu().contiguous() for k, v in _trained_state(model, group).items()}
    optimizer_state = sharding.optimizer_state(model, optimizer)
    if not group.is_main:
        return
    target = run.checkpoint(state.step)
    with staging_dir(target) as tmp:
        save_file(weights, run.checkpoint_weights(tmp))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            run.checkpoint_trainer(tmp),
        )
        write_json_atomic(run.checkpoint_state(tmp), asdict(state))
    for old in run.checkpoint_dirs()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run: RunDir) -> Path | None:
    found = run.checkpoint_dirs()
    return found[-1] if found else None


def load_checkpoint_weights(model: Any, checkpoint: Path, run: RunDir) -> None:
    """A checkpoint's trained weights into the model (before it is sharded, if it will be)."""
    _load_trained_state(model, load_file(run.checkpoint_weights(checkpoint)))


def load_checkpoint_trainer(
    run: RunDir, checkpoint: Path, model: Any, optimizer: Any, scheduler: Any, group: Group
) -> TrainState:
    """The optimizer, scheduler and random state of a checkpoint; the run's state at that step."""
    # Written by this appliance, in its own home: its pickled scheduler state may be loaded.
    saved = torch.load(run.checkpoint_trainer(checkpoint), weights_only=False)
    if all(isinstance(key, int) for key in saved["optimizer"]["state"]):
        optimizer.load_state_dict(saved["optimizer"])  # a checkpoint from before name-keyed state
    else:
        sharding.load_optimizer_state(model, optimizer, saved["optimizer"], group.sharded)
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return TrainState(**read_json(run.checkpoint_state(checkpoint)))


def _trained_state(model: Any, group: Group | None = None) -> dict[str, Any]:
    """What a checkpoint must hold: the adapter's tensors, or every weight (full). Sharded,
    the full tensors are gathered from every rank (each must call it)."""
    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model, state_dict=_gathered(model, group))
    return dict(model.state_dict())


def _gathered(model: Any, group: Group | None) -> dict[str, Any] | None:
    """Sharded: the trained weights gathered in full from every rank (each must call it);
    otherwise None, and peft reads the model's own tensors."""
    return sharding.trained_weights(model) if group is not None and group.sharded else None


def _load_trained_state(model: Any, weights: dict[str, Any]) -> None:
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, weights)
    else:
        model.load_state_dict(weights, strict=False)  # tied weights are saved once


def _adapter_weights(adapter: Path) -> dict[str, Any]:
    """A saved adapter's tensors, keyed as ``_trained_state`` keys them."""
    if (adapter / "adapter_model.safetensors").is_file():
        return load_file(str(adapter / "adapter_model.safetensors"))
    return torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)


def _plan(home: Home, run: RunDir, snapshot: Snapshot, settings: Settings, kind: str, emit: Emit) -> incremental.Plan:
    """The run's plan, decided once and kept in ``plan.json``: a resumed run replays the same sample."""
    saved = run.plan_json
    if saved.exists():
        return incremental.Plan(**read_json(saved))
    how = incremental.plan(home, snapshot, settings, kind)
    write_json_atomic(saved, asdict(how))
    emit(Message(STAGE, f"{how.mode} run: {how.reason}"))
    return how


def _save_adapter(model: Any, tokenizer: Any, run: RunDir, group: Group) -> None:
    """The best adapter so far (rank 0 writes; sharded, every rank calls it to gather the weights)."""
    gathered = _gathered(model, group)
    if not group.is_main:
        return
    with staging_dir(run.adapter) as tmp:
        model.save_pretrained(tmp, **({"state_dict": gathered} if gathered is not None else {}))
        tokenizer.save_pretrained(tmp)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What a run trains on, decided once (rank 0 first in a multi-process run)."""

    how: incremental.Plan
    tokenizer: Any
    train_ex: list[Example]
    val_ex: list[Example]
    general: list[Example]
    leaks: list[Any]
    study_counts: dict[str, int]
    plan: recipe.Recipe
    steps: list[list[Example]]
    choice: methods.Choice


def _prepare(
    home: Home,
    run: RunDir,
    snapshot: Snapshot,
    settings: Settings,
    kind: str,
    device: str,
    max_steps: int | None,
    emit: Emit,
    processes: int = 1,
) -> Prepared:
    """The run's examples, recipe, optimizer steps and method."""
    base_dir = home.base(settings.base.name)
    emit(StageStarted(STAGE, description="Preparing data"))
    tokenizer = load_tokenizer(base_dir)
    how = _plan(home, run, snapshot, settings, kind, emit)
    all_train = records(home, how.new + how.replay if how.incremental else snapshot.train)
    keep = incremental.study_keeper(home, how, settings) if how.incremental else None
    studied, study_counts = study_records(home, snapshot, all_train, settings, run, emit, keep)
    all_train += studied
    train_records, leaks = decontaminate(home, all_train)
    if leaks:
        emit(
            Message(
                STAGE,
                f"removed {len(all_train) - len(train_records)} training example(s) holding "
                f"{len({leak.probe for leak in leaks})} probe question(s) (decontamination)",
            )
        )
    train_ex = render_all(tokenizer, train_records, settings, emit)
    val_ex = render_all(tokenizer, records(home, snapshot.val), settings, emit)
    if not train_ex:
        raise TrainError(f"snapshot {snapshot.id}: no training example survived rendering")
    general = general_examples(tokenizer, settings, len(train_ex), emit)
    mix = train_ex + general
    plan = recipe.choose(settings.train, len(mix), sum(len(ex.input_ids) for ex in mix), count_parameters(base_dir))
    steps = plan_steps(mix, plan.epochs, plan.tokens_per_step, settings.train.seed)
    limit = max_steps or settings.train.max_steps
    steps = steps[:limit] if limit else steps
    choice = resolve_method(run, base_dir, settings, len(train_ex), device, emit, how, processes)
    return Prepared(how, tokenizer, train_ex, val_ex, general, leaks, study_counts, plan, steps, choice)


def train(
    home: Home,
    snapshot: Snapshot,
    settings: Settings,
    run_id: str | None = None,
    max_steps: int | None = None,
    emit: Emit = ignore,
    stop: Callable[[], bool] | None = None,
    kind: str = "train",
    group: Group | None = None,
) -> TrainResult:
    """Train (or resume, or report an already finished) run on ``snapshot``: continuing the
    current version's adapter on what is new plus a replay sample, or from the base on all of
    it (training/incremental.py decides, once per run; ``kind`` is the job's).

    ``stop`` is polled between forward passes; when it turns true the partial step is
    dropped, a checkpoint of the last complete step is written, and TrainInterrupted
    is raised, so a stopped daemon loses no finished step.

    ``group``: this process's place in a multi-process run (training/distributed.py): each
    process trains its share of every step and rank 0 alone writes. Default: one process.
    """
    group = group or Group()
    emit = emit if group.is_main else ignore
    started = time.monotonic()
    base_dir = home.base(settings.base.name)
    if not base_dir.is_dir():
        raise TrainError(f"{base_dir}: base model missing; run 'appliance init'")
    run = home.run(run_id or time.strftime("run-%Y%m%d-%H%M%S"))
    if run.train_json.exists():
        return _finished(run)
    run.root.mkdir(parents=True, exist_ok=True)
    device = torch_device()
    threads = set_threads(group.threads(settings.train.threads))
    torch.manual_seed(settings.train.seed)
    with group.main_first():  # rank 0 writes the plan, the method and the caches; the others read them
        data = _prepare(home, run, snapshot, settings, kind, device, max_steps, emit, group.size)
    steps, epochs = data.steps, data.plan.epochs

    group = replace(group, sharded=group.size > 1 and data.choice.distributed == "fsdp")
    if group.sharded:
        sharding.check_method(data.choice.method)
    model = load_trainable(base_dir, settings, device, data.choice.method, len(steps), group.sharded)
    if data.how.incremental:  # step 0 is the parent's adapter (a checkpoint, if any, replaces it below)
        _load_trained_state(model, _adapter_weights(home.run(data.how.parent_run or "").adapter))
    checkpoint = latest_checkpoint(run)
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint, run)
    group.broadcast([p for p in model.parameters() if p.requires_grad])  # every process starts from rank 0's weights
    if group.sharded:
        model = sharding.shard(model, device, group.size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=data.plan.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(settings.train.warmup_ratio * len(steps)), len(steps)
    )
    if checkpoint is None:
        state = TrainState(
            run.id, snapshot.id, len(steps), micro_tokens=settings.train.micro_tokens or MICRO_TOKENS[device]
        )
    else:
        state = load_checkpoint_trainer(run, checkpoint, model, optimizer, scheduler, group)
        if state.snapshot != snapshot.id or state.total_steps != len(steps):
            raise TrainError(
                f"run {run.id}: its checkpoints belong to snapshot {state.snapshot} with "
                f"{state.total_steps} steps; start a new run instead of resuming this one"
            )
        state.resumed_from.append(state.step)
        emit(Message(STAGE, f"resuming run {run.id} from step {state.step} of {len(steps)}"))
    state.processes.append(group.size)

    eval_every = settings.train.eval_every or max(1, round(len(steps) / max(1, math.ceil(epochs))))
    emit(
        StageStarted(
            STAGE,
            total=len(steps),
            description=f"Learning from {len(data.train_ex)} examples"
            f"{f' (+{len(data.general)} general)' if data.general else ''}, {epochs:g} epochs"
            f"{f', {group.size} processes' if group.size > 1 else ''}",
        )
    )
    # One process polls ``stop`` between passes; several agree on it once a step (all stop together).
    pass_stop = stop if group.size == 1 else None
    model.train()
    session_start, session_first = time.monotonic(), state.step
    for index in range(state.step, len(steps)):
        t0 = time.monotonic()
        step_tokens = sum(ex.trained_tokens for ex in steps[index])
        try:
            if group.any(stop is not None and stop()):
                raise TrainInterrupted()
            loss = train_step(model, group.shard(steps[index]), state, device, emit, pass_stop, step_tokens, group)
        except TrainInterrupted:
            optimizer.zero_grad(set_to_none=True)
            saved = run.checkpoint_dirs()
            fresh = state.step and (not saved or int(saved[-1].name.split("-")[1]) != state.step)
            if fresh:
                save_checkpoint(run, model, optimizer, scheduler, state, settings.train.keep_checkpoints, group)
            emit(Message(STAGE, f"stopped at step {state.step} of {len(steps)}; checkpoint saved"))
            raise
        if not group.sharded:  # FSDP reduced them after the step's last pass
            group.sum_gradients(params)
        loss = group.total(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if data.choice.method == "adalora":  # prunes ranks by importance, which needs this step's gradients
            model.base_model.update_and_allocate(index + 1)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss):
            raise TrainError(f"run {run.id}: the loss became {loss} at step {index + 1}; lower train.learning_rate")
        state.step = index + 1
        tokens = sum(len(ex.input_ids) for ex in steps[index])
        state.trained_tokens += tokens
        point = {
            "step": state.step,
            "epoch": round(epochs * state.step / len(steps), 3),
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "tokens": tokens,
            "tokens_per_s": tokens / max(time.monotonic() - t0, 1e-9),
            "peak_memory_mb": peak_memory_bytes(device) / 2**20,
        }
        if state.step % eval_every == 0 or state.step == len(steps):
            _evaluate_and_select(model, data.tokenizer, data.val_ex, loss, device, run, state, point, settings, group)
        per_step = (time.monotonic() - session_start) / max(1, state.step - session_first)
        point["eta_s"] = per_step * (len(steps) - state.step)
        state.curve.append(point)
        done = state.step == len(steps) or state.stopped_early
        if state.step % settings.train.checkpoint_every == 0 and not done:
            save_checkpoint(run, model, optimizer, scheduler, state, settings.train.keep_checkpoints, group)
        emit(Progress(STAGE, completed=state.step, total=len(steps), metrics=point))
        if state.stopped_early:
            emit(
                Message(
                    STAGE,
                    f"stopped early at step {state.step}: validation loss has not improved "
                    f"for {state.bad_evals} checks",
                )
            )
            break

    state.seconds += time.monotonic() - started
    if group.is_main:
        _write_train_json(run, snapshot, settings, data, state, device, threads)
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # the best adapter is kept; resuming is no longer needed
    group.barrier()  # the others read train.json below
    best_val = state.best_score if data.val_ex else None
    summary = f"{state.step} steps" + (f", best validation loss {best_val:.3f}" if best_val is not None else "")
    emit(StageFinished(STAGE, seconds=state.seconds, summary=summary))
    return _finished(run)


def _write_train_json(
    run: RunDir, snapshot: Snapshot, settings: Settings, data: Prepared, state: TrainState, device: str, threads: int
) -> None:
    """What the run did and why, for the gate, lineage, the TUI and people (``train.json``)."""
    write_json_atomic(
        run.train_json,
        {
            "run": run.id,
            "snapshot": snapshot.id,
            "base": settings.base.name,
            "device": device,
            "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
            "threads": threads,
            "processes": state.processes[-1],
            "distributed": data.choice.distributed if state.processes[-1] > 1 else None,
            "method": data.choice.method,
            "method_reason": data.choice.reason,
            "distributed_reason": data.choice.distributed_reason if state.processes[-1] > 1 else None,
            "dora": settings.train.dora,
            "epochs": data.plan.epochs,
            "recipe": data.plan.to_dict(),
            "steps": state.step,
            "planned_steps": len(data.steps),
            "best_step": state.best_step,
            "best_val_loss": state.best_score if data.val_ex else None,
            "stopped_early": state.stopped_early,
            "resumed_from": state.resumed_from,
            "processes_per_session": state.processes,
            "micro_tokens": state.micro_tokens,
            "train_examples": len(data.train_ex),
            "general_examples": len(data.general),
            "val_examples": len(data.val_ex),
            "study": data.study_counts,
            "decontaminated": [asdict(leak) for leak in data.leaks],
            "train_tokens": state.trained_tokens,
            "seconds": state.seconds,
            "settings": settings.train.model_dump(),
            "incremental": {**data.how.to_dict(), "last_full_at": data.how.last_full_at or time.time()},
            "finished_at": time.time(),
            "curve": state.curve,
        },
    )


def _evaluate_and_select(
    model: Any,
    tokenizer: Any,
    val_ex: list[Example],
    loss: float,
    device: str,
    run: RunDir,
    state: TrainState,
    point: dict[str, float],
    settings: Settings,
    group: Group,
) -> None:
    """Validation loss; keep the best adapter (not the last); count checks without improvement."""
    val = evaluate(model, val_ex, device, state.micro_tokens, group)
    if val is not None:
        point["val_loss"] = val
    score = val if val is not None else loss
    if state.best_score is None or score < state.best_score:
        state.best_score, state.best_step, state.bad_evals = score, state.step, 0
        _save_adapter(model, tokenizer, run, group)
    else:
        state.bad_evals += 1
        patience = settings.train.patience
        state.stopped_early = val is not None and patience is not None and state.bad_evals >= patience


def _finished(run: RunDir) -> TrainResult:
    info = read_json(run.train_json)
    return TrainResult(
        run.id,
        info["snapshot"],
        info["steps"],
        info["best_val_loss"],
        info["train_tokens"],
        info["seconds"],
        info["curve"],
    )


__all__ = [
    "train",
    "TrainInterrupted",
    "TrainResult",
    "TrainState",
    "pack",
    "collate",
    "plan_steps",
    "step_loss",
    "IGNORE",
]
