"""Collectives of the data-parallel path: the ranks' mean of the per-objective gradients, a flag that
holds on every rank, and small exchanges of host values (names, counts) between the ranks.

They are no-ops in a single process (``torch.distributed`` absent or not initialised), so the callers need
no branch of their own.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["HostExchange", "all_ranks", "mean_across_ranks"]


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


class HostExchange:
    """Exchanges of small host-side values (Python objects) between all ranks.

    They run on a CPU (gloo) process group: the default group when its backend is gloo, otherwise a gloo
    group made once here (``new_group`` is itself a collective: build this object on every rank at the
    same point, e.g. when the fit starts). So nothing waits for an accelerator: the values are read from
    the host, and the exchange is as cheap as a message between processes.

    In a single process every method returns at once with the local value.

    Example::

        exchange = HostExchange()
        everyone = exchange.differing(("audio", "visual"))  # None: every rank passed the same value
        exchange.gather({"loss": 1.0})                       # [rank 0's dict, rank 1's dict, ...]
    """

    def __init__(self) -> None:
        self.world_size = torch.distributed.get_world_size() if _initialized() else 1
        self.group: Any = None
        self._own_group = False
        if self.world_size > 1 and torch.distributed.get_backend() != "gloo":
            self.group = torch.distributed.new_group(backend="gloo")
            self._own_group = True

    def differing(self, value: Any) -> list[Any] | None:
        """``None`` when every rank passed an equal ``value``, else every rank's value, in rank order.

        The common case costs one all-reduce of two integers (a 56-bit fingerprint of the pickled value
        and its negation, reduced with MIN: all equal iff ``min == max``); only when the ranks differ are
        the values themselves gathered.
        """
        if self.world_size <= 1:
            return None
        digest = hashlib.blake2b(pickle.dumps(value, protocol=4), digest_size=7).digest()
        fingerprint = int.from_bytes(digest, "little")
        both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN, group=self.group)
        if int(both[0]) == -int(both[1]):
            return None
        return self.gather(value)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
        if self.world_size <= 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value, group=self.group)
        return out

    def close(self) -> None:
        """Release the gloo group this object made (if any)."""
        if self._own_group and _initialized():
            torch.distributed.destroy_process_group(self.group)
        self.group, self._own_group, self.world_size = None, False, 1
