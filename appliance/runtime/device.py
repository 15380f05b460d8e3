"""Where tensors live: CUDA when present, else the CPU. The one place that decides."""

from __future__ import annotations

import os

import torch


def torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(threads: int | None) -> int:
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n
