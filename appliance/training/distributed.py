"""Training on several processes: data parallel through PyTorch distributed, started by torchrun.

With ``[train] processes`` above one (or "auto" on a machine with several GPUs) the train
stage does not train in the worker's own process: ``training/launch.py`` starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m appliance.training.rank``
(torchrun, PyTorch's elastic launcher) and relays rank 0's progress events. Every rank runs
the same ``train()`` (training/train.py) with a :class:`Group`:

* every rank plans the same optimizer steps (the plan does not depend on the number of
  processes) and trains on its share of each step's examples (:meth:`Group.shard`);
* each rank's loss is divided by the trained tokens of the **whole** step and the step's
  gradients are summed across ranks before the optimizer steps, so the update, the
  effective batch and the learning-rate schedule are exactly those of one process;
* rank 0 alone writes checkpoints, the best adapter, ``train.json`` and events; checkpoints
  hold no per-rank state, so a run resumes on any number of processes;
* a rank that dies makes torchrun stop the others; the launcher starts them all again from
  the last checkpoint (``[train] max_restarts`` times), then the job fails with the reason.

The process group comes from accelerate's ``PartialState`` (gloo on CPUs, nccl on GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from appliance.home.config import Settings
from appliance.training.render import Example


def processes(settings: Settings) -> int:
    """How many training processes the configuration asks for on this machine."""
    wanted = settings.train.processes
    if wanted == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return int(wanted)


@dataclass(frozen=True)
class Group:
    """This process's place among the run's processes; the single-process default does nothing."""

    rank: int = 0
    size: int = 1
    sharded: bool = False  # FSDP (training/sharding.py) rather than a whole model per process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, examples: list[Example]) -> list[Example]:
        """This rank's share of one step's examples: longest first, each to the rank holding the
        fewest tokens so far, so ranks finish a step at about the same time. Every rank
        computes the same assignment from the same list, so no example is trained twice."""
        if self.size == 1:
            return examples
        loads = [0] * self.size
        mine = []
        for index in sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i)):
            rank = min(range(self.size), key=lambda r: (loads[r], r))
            loads[rank] += len(examples[index].input_ids)
            if rank == self.rank:
                mine.append(examples[index])
        return mine

    def sum_gradients(self, params: list[Any]) -> None:
        """Sum the step's gradients across ranks, one all-reduce per dtype.

        DistributedDataParallel's own reducer syncs inside backward hooks and expects the
        same number of forward passes on every rank; packing gives ranks different numbers
        of passes per step (and sometimes none), so the gradients accumulated over the
        whole step are summed once here, as DDP's ``no_sync`` plus a final synced pass would.
        """
        if self.size == 1:
            return
        by_dtype: dict[Any, list[Any]] = {}
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def total(self, value: float) -> float:
        """``value`` summed over the ranks (a step's loss, each rank's share of it)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop request: all ranks stop at the same step)."""
        return self.total(1.0 if flag else 0.0) > 0

    def broadcast(self, params: list[Any]) -> None:
        """Rank 0's values of ``params`` on every rank (the trained weights at step 0)."""
        if self.size == 1:
            return
        for param in params:
            dist.broadcast(param.data, src=0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it writes the run's plan and caches), then the others
        (which read what rank 0 wrote instead of deciding again)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def threads(self, configured: int | None) -> int | None:
        """CPU threads for this process: the configured number, else the cores shared out."""
        if configured or self.size == 1:
            return configured
        return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", self.size)))


def join() -> Group:
    """This process's group: the torchrun-started ranks join one process group (accelerate's
    ``PartialState`` picks gloo or nccl and reads torchrun's environment); alone, a no-op."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group()
    from accelerate import PartialState  # only a torchrun-started rank needs it

    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    if cuda:
        torch.cuda.set_device(state.local_process_index)
    return Group(state.process_index, state.num_processes)


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
