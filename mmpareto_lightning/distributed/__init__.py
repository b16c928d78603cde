"""The collectives of data-parallel training, in one place, below the Lightning layer.

Everything here takes plain tensors, host values and ``torch.distributed``; the callback decides when to
call it.
"""

from mmpareto_lightning.distributed.collectives import HostExchange, all_ranks, mean_across_ranks

__all__ = ["HostExchange", "all_ranks", "mean_across_ranks"]
