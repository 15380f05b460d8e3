"""Which weights a run trains: the method, chosen by config or by ``auto``, and its memory.

Every method must end in plain weights llama.cpp can serve, so only methods whose
changes fold into the base's own matrices are offered: LoRA on a 4-bit base (QLoRA),
LoRA, DoRA, AdaLoRA and IA3 through peft (merged before conversion), and full
fine-tuning of a small base. Methods that add new computation at run time (prefix or
prompt tuning, bottleneck adapters) cannot be merged and are refused in config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig
from safetensors import SafetensorError, safe_open

from appliance.contract.errors import BaseModelError, TrainError
from appliance.home.config import METHODS, UNMERGEABLE  # noqa: F401  (the methods config accepts and refuses)

# Bytes per parameter for full fine-tuning with AdamW in fp32: weights, gradients and two
# moment estimates (4 + 4 + 8), plus a quarter again for activations and allocator slack.
FULL_BYTES_PER_PARAM = 16 * 1.25
# auto: full fine-tuning needs enough data to move every weight usefully.
FULL_MIN_EXAMPLES = 5000
# Bytes per parameter of a 4-bit NF4 base with double quantization (4.5 bits), plus a half
# again for the adapters, their optimizer and activations.
QLORA_BYTES_PER_PARAM = 0.5625 * 1.5
# Methods FSDP trains here (training/sharding.py): LoRA on a plain or 4-bit base.
FSDP_METHODS = ("lora", "qlora")
# Under FSDP a rank holds its shard plus one gathered layer and communication buffers.
FSDP_OVERHEAD = 1.25


@dataclass(frozen=True)
class Choice:
    method: str
    reason: str
    distributed: str = "ddp"  # how several processes share the run (unused by one process)
    distributed_reason: str = ""


def count_parameters(base_dir: Path) -> int:
    """Parameters of a saved checkpoint, from its safetensors headers (no weights read)."""
    total = 0
    for path in sorted(base_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    n = 1
                    for dim in shape:
                        n *= dim
                    total += n
        except (SafetensorError, OSError) as exc:
            raise BaseModelError(f"{path}: cannot load the model ({exc})") from None
    if not total:
        raise TrainError(f"{base_dir}: no safetensors weights to size the model by")
    return total


def memory_budget(configured_gb: float | None, device: str) -> int:
    """Bytes a run may use: the configured budget, else 90% of the GPU, else the RAM available now."""
    if configured_gb:
        return int(configured_gb * 2**30)
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def full_estimate(params: int) -> int:
    return int(params * FULL_BYTES_PER_PARAM)


def lora_estimate(params: int) -> int:
    """bf16 frozen weights plus a small share for adapters, their optimizer and activations."""
    return int(params * 2 * 1.5)


def estimate(method: str, params: int) -> int:
    """Bytes one whole copy of a run of ``method`` needs."""
    if method == "full":
        return full_estimate(params)
    if method == "qlora":
        return int(params * QLORA_BYTES_PER_PARAM)
    return lora_estimate(params)


def choose_distributed(setting: str, method: str, params: int, budget: int, processes: int) -> tuple[str, str]:
    """ddp or fsdp for a run of ``method`` on ``processes`` processes (``budget``: one
    process's memory), and why in words."""
    if setting != "auto":
        return setting, "set in config"
    need = estimate(method, params)
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    if need <= budget or method not in FSDP_METHODS:
        return "ddp", f"a whole copy ({gib(need)}) fits in each process's {gib(budget)}"
    return "fsdp", (
        f"a whole copy needs about {gib(need)}, more than each process's {gib(budget)}: "
        f"sharded over {processes} processes, about {gib(need * FSDP_OVERHEAD / processes)} each"
    )


def choose(method: str, base_dir: Path, n_examples: int, budget: int) -> Choice:
    """Resolve ``auto`` (and check ``full`` fits); say why in words."""
    params = count_parameters(base_dir)
    need_full = full_estimate(params)
    if method == "full" and need_full > budget:
        raise TrainError(
            f"full fine-tuning of this {params / 1e6:.0f}M-parameter base needs about "
            f"{need_full / 2**30:.1f} GiB and the budget is {budget / 2**30:.1f} GiB; use "
            "method 'qlora' or 'lora', or raise [train] memory_budget_gb"
        )
    if method != "auto":
        return Choice(method, "set in config")
    gib = f"{budget / 2**30:.1f} GiB"
    if n_examples >= FULL_MIN_EXAMPLES and need_full <= budget:
        return Choice(
            "full",
            f"{n_examples} examples are enough to update every weight, and full fine-tuning "
            f"({need_full / 2**30:.1f} GiB) fits in {gib}",
        )
    if lora_estimate(params) <= budget / 2:
        return Choice(
            "lora",
            f"the {params / 1e6:.0f}M-parameter base fits comfortably in {gib} unquantized, "
            f"and {n_examples} examples are too few for full fine-tuning",
        )
    return Choice(
        "qlora",
        f"the {params / 1e6:.0f}M-parameter base is large for {gib}: training LoRA on a 4-bit copy keeps memory low",
    )


def peft_config(method: str, train: Any, total_steps: int) -> Any:
    """The peft configuration of an adapter method."""
    targets = "all-linear" if train.target_modules == "all-linear" else ["q_proj", "v_proj"]
    if method == "ia3":
        # IA3 rescales keys, values and the MLP's input to its down projection.
        return IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        )
    if method == "adalora":
        # Ranks start at lora_r and are pruned to half of it over the middle of the run.
        return AdaLoraConfig(
            init_r=train.lora_r,
            target_r=max(1, train.lora_r // 2),
            lora_alpha=train.lora_alpha,
            lora_dropout=train.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
            total_step=max(total_steps, 3),
            tinit=total_steps // 10,
            tfinal=total_steps // 5,
            deltaT=1,
        )
    return LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        use_dora=method == "dora" or train.dora,
    )


def is_full_checkpoint(folder: Path) -> bool:
    """A fully fine-tuned run saves a whole model where adapter runs save an adapter."""
    return (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()


def adapter_kind(folder: Path) -> str:
    """'full', or the kind of a saved adapter: LORA, DORA, ADALORA or IA3."""
    if is_full_checkpoint(folder):
        return "full"
    config = json.loads((folder / "adapter_config.json").read_text())
    return "DORA" if config.get("use_dora") else config.get("peft_type", "LORA")
