"""Lightning glue for sharded training: which strategies MMPareto serves, and the checks of a sharded model.

``ModelParallelStrategy`` with ``tensor_parallel_size=1`` (FSDP2: ``fully_shard`` in ``configure_model``)
is exact: FSDP averages every gradient, the extra objectives' included (:mod:`mmpareto_lightning.engine.
sharded_split`), and the rule sums its Gram matrices over the shards (:mod:`mmpareto_lightning.distributed.
sharded`). The module's parameters only become shards in ``configure_model``, after the callback's
``setup``, so the sharded layout is checked (and the engine built on it) at ``on_fit_start``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mmpareto_lightning.distributed.sharded import FSDPModule, is_dtensor, unsharded_names

__all__ = ["SHARDED_HINT", "check_model_parallel_strategy", "check_sharded_module", "is_sharded_strategy"]

#: Where the refusal of another sharded strategy points.
SHARDED_HINT = (
    "For encoders too large for one device, use `ModelParallelStrategy(data_parallel_size=N, "
    "tensor_parallel_size=1)` and shard each encoder and each head with `fully_shard` in "
    "`configure_model` (FSDP2; see the README's 'Sharded encoders')."
)


def is_sharded_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` is the FSDP2 strategy MMPareto serves (``ModelParallelStrategy``)."""
    return isinstance(strategy, ModelParallelStrategy)


def check_model_parallel_strategy(strategy: ModelParallelStrategy) -> None:
    """Refuse tensor parallelism (at fit start, once the device mesh exists)."""
    mesh = strategy.device_mesh
    tensor_parallel = (
        mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    )
    if tensor_parallel > 1:
        raise MisconfigurationException(
            f"MMPareto does not support tensor parallelism (`tensor_parallel_size={tensor_parallel}`): the "
            "split captures each encoder's output and differentiates the heads per loss, which needs the "
            "outputs whole on every rank. Use `ModelParallelStrategy(data_parallel_size="
            f"{mesh.size()}, tensor_parallel_size=1)` (its defaults put every device of a node in the "
            "tensor-parallel group) and shard with `fully_shard` only."
        )


def check_sharded_module(pl_module: pl.LightningModule) -> None:
    """After ``configure_model``: every trainable parameter is a shard, and the LightningModule itself is
    not sharded."""
    if FSDPModule is not None and isinstance(pl_module, FSDPModule):
        raise MisconfigurationException(
            "`fully_shard` was applied to the LightningModule itself. Lightning calls "
            "`training_step`, not `forward`, so FSDP never gathers the LightningModule's own parameters; "
            "MMPareto also needs the encoders and heads as separate sharded modules. In `configure_model`, "
            "apply `fully_shard` to each encoder (after its blocks) and to each head, not to `self`."
        )
    plain = [n for n, p in pl_module.named_parameters() if p.requires_grad and not is_dtensor(p)]
    if plain:
        raise MisconfigurationException(
            f"Under ModelParallelStrategy these trainable parameters are not sharded: "
            f"{unsharded_names(plain)}. Nothing averages their gradients across ranks (the ranks would "
            "drift apart). In `configure_model`, apply `fully_shard` to every module that owns parameters: "
            "each encoder (after its blocks) and each head, fusion layers included."
        )
