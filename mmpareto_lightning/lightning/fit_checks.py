"""What a fit must satisfy before MMPareto can run it: the Trainer's set-up and the named encoders.

Checked once, when the fit starts; what can change from step to step is checked in
:mod:`mmpareto_lightning.engine.safeguards`.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from mmpareto_lightning.lightning.sharding import (
    SHARDED_HINT,
    check_model_parallel_strategy,
    is_sharded_strategy,
)

__all__ = ["check_trainer", "validated_encoders"]

_SUPPORTED_STRATEGIES = (
    "single-device (CPU, one GPU), DDP (`ddp`, `ddp_spawn`, `ddp_find_unused_parameters_true`) and FSDP2 "
    "(`ModelParallelStrategy` with `tensor_parallel_size=1`)"
)


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, callback_type: type) -> None:
    """Refuse, at the start of a fit, what the split cannot serve."""
    mine = [c for c in trainer.callbacks if isinstance(c, callback_type)]
    if len(mine) > 1:
        raise MisconfigurationException(
            f"The Trainer has {len(mine)} MMParetoCallbacks; MMPareto needs exactly one (each would run "
            "the update and step the schedulers). Keep one."
        )
    strategy = trainer.strategy
    if is_sharded_strategy(strategy):
        check_model_parallel_strategy(strategy)  # type: ignore[arg-type]
    elif not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or type(strategy).__name__ in (
        "DeepSpeedStrategy",
    ):
        raise MisconfigurationException(
            f"MMPareto does not support the {type(strategy).__name__} strategy: FSDP1 (`FSDPStrategy`) "
            "and DeepSpeed reduce gradients in flat buffers they own, behind backward hooks and engines "
            "that allow no second, per-objective backward. Supported: "
            f"{_SUPPORTED_STRATEGIES}. {SHARDED_HINT}"
        )
    if isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs.get("static_graph"):
        raise MisconfigurationException(
            "DDP with `static_graph=True` is not supported by MMPareto; use "
            "`DDPStrategy(static_graph=False)` (the default)."
        )
    if getattr(pl_module, "_compiler_ctx", None):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} was compiled as a whole with `torch.compile`, which hides the "
            "encoders' outputs from MMPareto's capture. Compile the encoders and heads instead "
            "(e.g. `self.audio_net = torch.compile(self.audio_net)`), not the LightningModule."
        )


def validated_encoders(pl_module: pl.LightningModule) -> dict[str, nn.Module]:
    encoders = pl_module.mmpareto_encoders()
    if isinstance(encoders, nn.ModuleDict):
        encoders = dict(encoders.items())
    if not isinstance(encoders, Mapping) or not encoders:
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.mmpareto_encoders() must return a non-empty dict (or nn.ModuleDict) "
            f"of name -> encoder submodule, got {encoders!r}."
        )
    module_names: dict[int, list[str]] = {}
    for mod_name, mod in pl_module.named_modules(remove_duplicate=False):
        module_names.setdefault(id(mod), []).append(mod_name)
    prefixes: dict[str, list[str]] = {}
    for name, encoder in encoders.items():
        if not isinstance(name, str) or not name:
            raise MisconfigurationException(f"Encoder names must be non-empty strings, got {name!r}.")
        if not isinstance(encoder, nn.Module):
            raise MisconfigurationException(
                f"Encoder {name!r} must be an nn.Module, got {type(encoder).__name__}."
            )
        if id(encoder) not in module_names or encoder is pl_module:
            raise MisconfigurationException(
                f"Encoder {name!r} ({type(encoder).__name__}) is not a submodule of "
                f"{type(pl_module).__name__}: assign it as an attribute in `__init__`."
            )
        prefixes[name] = [p + "." for p in module_names[id(encoder)]]

    owners: dict[int, set[str | None]] = {}
    where: dict[int, list[str]] = {}
    for param_name, param in pl_module.named_parameters(remove_duplicate=False):
        owner = next((n for n, pre in prefixes.items() if any(param_name.startswith(p) for p in pre)), None)
        owners.setdefault(id(param), set()).add(owner)
        where.setdefault(id(param), []).append(param_name)
    for pid, names in owners.items():
        if len(names) > 1:
            encoders_in = sorted(n for n in names if n is not None)
            raise MisconfigurationException(
                f"Parameter {where[pid]} is shared by encoder(s) {encoders_in}"
                + (" and a non-encoder module (head or fusion)" if None in names else "")
                + ". Encoders must own their parameters: untie the weights or make the shared module part "
                "of one encoder only."
            )
    return dict(encoders)
