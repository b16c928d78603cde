"""The collectives of data-parallel training, in one place, below the Lightning layer.

Everything here takes plain tensors and ``torch.distributed``; the callback decides when to call it.
"""

from mmpareto_lightning.distributed.collectives import all_ranks, mean_across_ranks

__all__ = ["all_ranks", "mean_across_ranks"]
