"""The collectives of data-parallel and sharded training, in one place, below the Lightning layer.

Everything here takes plain tensors, host values and ``torch.distributed``; the callback decides when to
call it. :mod:`.collectives`: DDP (the ranks' mean of the extra objectives' gradients, a flag that holds
on every rank, the ranks' agreement on what they integrate). :mod:`.sharded`: FSDP2 (``fully_shard``):
which shards make up each encoder, the sum of the rule's Gram matrices over the shards, and the ranks'
agreement on the backward passes of a step.
"""

from mmpareto_lightning.distributed.collectives import HostExchange, all_ranks, mean_across_ranks
from mmpareto_lightning.distributed.sharded import (
    AgreedStructure,
    ShardedEncoders,
    ShardingError,
    local_tensors,
)

__all__ = [
    "AgreedStructure",
    "HostExchange",
    "ShardedEncoders",
    "ShardingError",
    "all_ranks",
    "local_tensors",
    "mean_across_ranks",
]
