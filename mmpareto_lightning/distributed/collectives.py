"""Collectives of the data-parallel path: the ranks' mean of the per-objective gradients, and a flag that
holds on every rank.

They are no-ops in a single process (``torch.distributed`` absent or not initialised), so the callers need
no branch of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["all_ranks", "mean_across_ranks"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def mean_across_ranks(world_size: int) -> Callable[[Tensor], Tensor] | None:
    """A function that replaces a tensor by its mean over the ``world_size`` ranks, in place (one
    all-reduce), or ``None`` in a single process."""
    if world_size <= 1 or not _initialized():
        return None

    def reduce(tensor: Tensor) -> Tensor:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.div_(world_size)

    return reduce


def all_ranks(flag: Tensor) -> Tensor:
    """0-d bool tensor: ``flag`` holds on every rank (one all-reduce of one number; ``flag`` itself in a
    single process)."""
    if not _initialized():
        return flag
    value = flag.to(torch.float32).reshape(1)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value[0] > 0.5
