"""What a fit must satisfy before MMPareto can run it: the Trainer's set-up and the named encoders.

Checked once, when the fit starts; what can change from step to step is checked in
:mod:`mmpareto_lightning.engine.safeguards`.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim import LBFGS

from mmpareto_lightning.lightning.sharding import (
    SHARDED_HINT,
    check_model_parallel_strategy,
    is_sharded_strategy,
)

__all__ = ["check_ddp_reducer", "check_optimizer", "check_parameters", "check_trainer", "validated_encoders"]

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


def check_parameters(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    encoders: Mapping[str, nn.Module],
    clip_algorithm: str | None,
) -> None:
    """Refuse parameters whose gradients the split, the rule or the step cannot serve exactly.

    Args:
        clip_algorithm: the gradient clipping algorithm in use (``None``: no clipping).
    """
    param_names = {id(p): n for n, p in pl_module.named_parameters()}
    module_names = {id(m): n for n, m in pl_module.named_modules()}
    for enc, encoder in encoders.items():
        for sub in encoder.modules():
            if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse:
                raise MisconfigurationException(
                    f"Module {module_names.get(id(sub), type(sub).__name__)!r} "
                    f"({type(sub).__name__}(sparse=True)) of encoder {enc!r} produces sparse gradients, "
                    "but MMPareto combines the per-loss gradients of an encoder as dense tensors. Use "
                    "`sparse=False` in the encoders (sparse embeddings in heads are fine)."
                )
        # The rule decides on one real dtype per encoder (a complex parameter counts as its real view).
        first: dict[object, str] = {}
        for p in encoder.parameters():
            if p.requires_grad:
                first.setdefault(p.dtype.to_real(), param_names.get(id(p), "?"))
        if len(first) > 1:
            found = ", ".join(f"{name!r} ({dtype})" for dtype, name in first.items())
            raise MisconfigurationException(
                f"The trainable parameters of encoder {enc!r} mix real dtypes ({found}; a complex "
                "parameter counts as its real part's dtype). MMPareto integrates an encoder's gradients in "
                "one dtype: cast the encoder to one dtype (e.g. `.float()`)."
            )
    complex_params = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.is_complex()]
    if not complex_params:
        return
    listed = ", ".join(map(repr, complex_params[:3])) + (", ..." if len(complex_params) > 3 else "")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise MisconfigurationException(
            f"Complex parameter(s) {listed}: torch's GradScaler (precision "
            f"{trainer.precision!r}) cannot unscale complex gradients. Train complex parameters without a "
            "GradScaler (`precision='32-true'` or `'bf16-mixed'`)."
        )
    if clip_algorithm == "value":
        raise MisconfigurationException(
            f"Complex parameter(s) {listed}: clipping by value has no meaning for complex "
            "gradients (torch cannot clamp them). Use `gradient_clip_algorithm='norm'`, which clips complex "
            "gradients by their modulus."
        )


def check_optimizer(optimizer: object) -> None:
    """Refuse, at fit start, an optimizer whose step re-evaluates the loss through its closure."""
    inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    if isinstance(inner, LBFGS):
        raise MisconfigurationException(
            f"{type(inner).__name__} re-evaluates the loss and the gradients several times per step through "
            "its closure, but MMPareto's gradients come from the training step's forward, split and rule, "
            "which a closure cannot re-run. Use a first-order optimizer (SGD, Adam, AdamW, ...)."
        )


def check_ddp_reducer(trainer: pl.Trainer) -> None:
    """Refuse DDP's Python reducer (compiled autograd), which averages gradients in post-accumulate-grad
    hooks: MMPareto holds those hooks on encoder parameters until the rule has run."""
    if getattr(trainer.strategy.model, "_use_python_reducer", False):
        raise MisconfigurationException(
            "DDP runs its Python reducer (compiled autograd, `torch._dynamo.config.optimize_ddp = "
            "'python_reducer'`), which averages the gradients in post-accumulate-grad hooks; MMPareto runs "
            "the encoder parameters' hooks after the rule, so the unimodal gradients would not be averaged "
            "before it. Use DDP's default reducer."
        )
