"""FSDP: each rank holds a shard of the model instead of a whole copy (``[train] distributed = "fsdp"``).

For a base too large for one device, PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``)
splits every decoder layer's weights across the ranks and gathers a layer's full weights only
while it runs. QLoRA works under it as in the FSDP-QLoRA recipe of bitsandbytes, peft and
accelerate: the 4-bit weights are stored in bf16 (``bnb_4bit_quant_storage``), a dtype FSDP
can flatten and shard, and only the LoRA weights are trained.

What changes against DDP (training/distributed.py), and why:

* gradients are summed by FSDP's own reduce-scatter after the last forward/backward pass of
  a step (``set_requires_gradient_sync``), not by ``Group.sum_gradients``; the divide factor
  is 1 because each rank's loss is already divided by the whole step's trained tokens;
* every forward pass gathers weights from every rank, so every rank must run the same number
  of passes: a rank with fewer rows in a step runs zero-weighted filler passes
  (:func:`even_rows`);
* the trained weights and optimizer state are gathered into full, unsharded tensors for
  checkpoints and the best adapter (every rank takes part, rank 0 writes), so checkpoints
  are the same as one process's and a run resumes on any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from appliance.contract.errors import TrainError
from appliance.training.methods import FSDP_METHODS
from appliance.training.render import IGNORE, Example

# A filler pass: two tokens, the second "trained" so the pass reaches every weight; its loss
# is multiplied by zero, so it changes nothing but takes part in every collective.
FILLER = Example([0, 0], [IGNORE, 0])

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_method(method: str) -> None:
    """FSDP_METHODS only: DoRA's magnitude vectors, AdaLoRA's rank masks and IA3 were not
    checked under sharding, and full fine-tuning keeps fp32 copies of every weight."""
    if method not in FSDP_METHODS:
        raise TrainError(
            f"[train] distributed = 'fsdp' trains {' and '.join(FSDP_METHODS)}; this run's method is "
            f"{method}: set [train] method to one of them, or distributed to 'ddp'"
        )


def shard(model: Any, device: str, size: int) -> Any:
    """Shard ``model`` across the ``size`` ranks: each decoder layer its own unit (gathered
    only while it runs), then the rest (embeddings, norm, output layer) as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (size,))
    layer_classes = set(getattr(_transformer(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise TrainError(f"cannot shard {type(_transformer(model)).__name__}: its decoder layers are not named")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for unit in [*layers, model]:
        # Losses are already divided by the whole step's tokens: sum the ranks' gradients, do
        # not average them. Plain SUM (gloo has no pre-multiplied sum; a factor of 1 needs none).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def _transformer(model: Any) -> Any:
    """The transformers model under peft's wrappers (it names its decoder layer class)."""
    inner = model
    while hasattr(inner, "base_model") and inner.base_model is not inner:
        inner = inner.base_model
    return getattr(inner, "model", inner)


def even_rows(rows: list[list[Example]]) -> tuple[list[list[Example]], int]:
    """``rows`` padded with filler passes to the most any rank has; and how many are real."""
    count = torch.tensor([len(rows)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return rows + [[FILLER]] * (int(count.item()) - len(rows)), len(rows)


def set_sync(model: Any, sync: bool) -> None:
    """Reduce-scatter gradients after this backward pass (the step's last) or keep accumulating."""
    model.set_requires_gradient_sync(sync)


def trained_weights(model: Any) -> dict[str, torch.Tensor]:
    """The trained parameters as full tensors on the CPU, keyed like ``model.state_dict()``.
    Every rank must call it (each contributes its shards)."""
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            full[name] = tensor.detach().cpu()
    return full


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state, full and keyed by parameter name (every rank calls it)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any], sharded: bool) -> None:
    """Name-keyed full optimizer state into ``optimizer`` (sharded: each rank keeps its shard)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=sharded))
