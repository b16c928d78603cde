"""``MMParetoCallback``: runs the MMPareto update for an :class:`~mmpareto_lightning.MMParetoModule`."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import Metric

from mmpareto_lightning.engine import MMParetoEngine
from mmpareto_lightning.metrics import MMParetoMetrics
from mmpareto_lightning.module import MMParetoModule
from mmpareto_lightning.rule import RESCALE_MODES, STRATEGIES, RuleConfig, RuleStats
from mmpareto_lightning.splitting import GradientSplittingError

__all__ = ["MMParetoCallback"]


class MMParetoCallback(Callback):
    r"""Integrates the multimodal and unimodal gradients of each encoder with MMPareto.

    The :class:`~mmpareto_lightning.MMParetoModule` hands its named losses to this callback, which, per
    training step: takes each loss's exact gradient on each encoder from one forward pass (one extra
    encoder backward on top of Lightning's own backward of the summed loss), applies the rule per
    encoder, writes the result into ``.grad`` and steps the optimizer through Lightning, so
    ``global_step``, LR schedulers, precision plugins, DDP and optimizer hooks behave as usual. Heads and
    fusion layers get the plain gradient of the summed losses.

    Because the Trainer rejects ``gradient_clip_val`` and ``accumulate_grad_batches`` in manual
    optimization, the callback offers both: clipping acts on the integrated (and, under 16-bit AMP,
    unscaled) gradients; accumulation sums the per-loss gradients over ``accumulate_grad_batches``
    batches before the rule.

    Args:
        strategy: ``"mmpareto"`` (default), ``"pareto"`` (conventional MGDA), ``"uniform"`` (plain
            sum of the losses) or ``"multimodal_only"`` (one joint loss: encoders get the multimodal
            gradient only; unimodal heads still train, as linear probes). One argument switches methods
            for ablations.
        rescale: ``"per_tensor"`` (the authors' code, never shrinks) or ``"per_encoder"`` (the paper's
            formula).
        gamma: final scale; ``None`` gives 1.5 with ``per_tensor`` rescale (authors' code) and 1.0
            otherwise.
        multimodal_key: name of the multimodal loss in the dict ``training_step`` returns.
        stationarity_tol: relative tolerance of the Pareto-stationarity test.
        accumulate_grad_batches: number of batches whose gradients are summed before each step.
        gradient_clip_val: clip the integrated gradients to this value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        skip_non_finite: without a GradScaler, check once per step that all losses and gradients are
            finite and skip the optimizer step otherwise (one host read of a boolean per step, what
            ``GradScaler`` costs). Under 16-bit AMP the scaler makes that check and the callback adds none.
        log_on_step: log the metrics every step (``*_step`` keys).
        log_on_epoch: log epoch aggregates (``*_epoch`` keys).

    Logged keys, all under ``mmpareto/`` so that none can overwrite a key of the user's: per encoder
    ``<e>``, ``mmpareto/<e>/cos_beta``, ``alpha_multimodal``, ``alpha_unimodal`` (and ``alpha_<loss>`` for
    every further objective; the alphas of an encoder sum to 1), ``rescale`` (means, ``_step`` and
    ``_epoch``), ``conflicts`` and ``stationary`` (counts), ``conflict_rate_epoch``, ``conflicts_total``
    and ``stationary_total`` (cumulative, logged every step, kept in checkpoints);
    ``mmpareto/skipped_steps``; and each loss as ``mmpareto/loss_<name>`` plus their sum ``mmpareto/loss``.

    Example::

        trainer = pl.Trainer(callbacks=[MMParetoCallback(strategy="mmpareto", gradient_clip_val=1.0)])
        trainer.fit(AVClassifier(), datamodule)
    """

    def __init__(
        self,
        strategy: Literal["mmpareto", "pareto", "uniform", "multimodal_only"] = "mmpareto",
        rescale: Literal["per_tensor", "per_encoder"] = "per_tensor",
        gamma: float | None = None,
        multimodal_key: str = "multimodal",
        stationarity_tol: float = 1e-3,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        skip_non_finite: bool = True,
        log_on_step: bool = True,
        log_on_epoch: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise MisconfigurationException(f"`strategy={strategy!r}` is not one of {STRATEGIES}.")
        if rescale not in RESCALE_MODES:
            raise MisconfigurationException(f"`rescale={rescale!r}` is not one of {RESCALE_MODES}.")
        if gamma is not None and not (isinstance(gamma, (int, float)) and 0 < gamma < float("inf")):
            raise MisconfigurationException(f"`gamma` must be a positive number or None, got {gamma!r}.")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise MisconfigurationException(
                f"`accumulate_grad_batches` must be a positive integer, got {accumulate_grad_batches!r}."
            )
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise MisconfigurationException(
                f"`gradient_clip_val` must be > 0 or None, got {gradient_clip_val!r}."
            )
        if gradient_clip_algorithm not in ("norm", "value"):
            raise MisconfigurationException(
                f"`gradient_clip_algorithm` must be 'norm' or 'value', got {gradient_clip_algorithm!r}."
            )
        if not isinstance(multimodal_key, str) or not multimodal_key:
            raise MisconfigurationException(
                f"`multimodal_key` must be a non-empty string, got {multimodal_key!r}."
            )
        if not stationarity_tol >= 0:
            raise MisconfigurationException(f"`stationarity_tol` must be >= 0, got {stationarity_tol!r}.")
        self.rule = RuleConfig(
            strategy=strategy, rescale=rescale, gamma=gamma, stationarity_tol=stationarity_tol
        )
        self.multimodal_key = multimodal_key
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.skip_non_finite = skip_non_finite
        self.log_on_step = log_on_step
        self.log_on_epoch = log_on_epoch

        self._engine: MMParetoEngine | None = None
        self._metrics: MMParetoMetrics | None = None
        self._totals: dict[str, Tensor] = {}
        self._micro_batches = 0
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._loaded_totals: dict[str, dict[str, int]] = {}
        self._skipped_tensor = torch.zeros(())
        self._parameters: list[nn.Parameter] = []

    # ------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return self._generate_state_key(strategy=self.rule.strategy, multimodal_key=self.multimodal_key)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MMParetoModule):
            raise MisconfigurationException(
                f"MMParetoCallback needs an MMParetoModule, got {type(pl_module).__name__}. Subclass "
                "`mmpareto_lightning.MMParetoModule` instead of `LightningModule`."
            )
        if pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} has `automatic_optimization = True`, but MMPareto drives the "
                "optimization itself. Remove the line that re-enables it (MMParetoModule.__init__ turns it "
                "off)."
            )
        pl_module._mmpareto_callback = self

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, MMParetoModule)
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"MMPareto steps exactly one optimizer, but `configure_optimizers` returned "
                f"{len(trainer.optimizers)}. Put all parameters in one optimizer (parameter groups can keep "
                "different learning rates)."
            )
        if isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._ddp_kwargs.get("static_graph"):
            raise MisconfigurationException(
                "DDP with `static_graph=True` is not supported by MMPareto; use "
                "`DDPStrategy(static_graph=False)` (the default)."
            )
        encoders = _validated_encoders(pl_module)
        try:
            self._engine = MMParetoEngine(encoders, self.rule, multimodal_key=self.multimodal_key)
        except GradientSplittingError as err:
            raise MisconfigurationException(str(err)) from err
        self._parameters = [p for p in pl_module.parameters() if p.requires_grad]
        self._metrics = MMParetoMetrics(list(encoders)).to(pl_module.device)
        # torchmetrics objects logged with `self.log` must be attributes of the LightningModule.
        pl_module.mmpareto_metrics = self._metrics
        self._totals = {}
        for name in encoders:
            loaded = self._loaded_totals.get(name, {})
            counts = [loaded.get("conflicts", 0), loaded.get("stationary", 0)]
            self._totals[name] = torch.tensor(counts, dtype=torch.float32, device=pl_module.device)
        # Logged every step: a device tensor, since logging a Python number copies it to the device.
        self._skipped_tensor = torch.tensor(float(self.skipped_steps), device=pl_module.device)
        self._micro_batches = 0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._engine is not None:
            self._engine.remove_hooks()
            self._engine = None
        if isinstance(pl_module, MMParetoModule) and pl_module._mmpareto_callback is self:
            pl_module._mmpareto_callback = None

    # ------------------------------------------------------------------ the training step
    def capture(self) -> AbstractContextManager[None]:
        """Context for the forward pass of a training step (used by :class:`MMParetoModule`)."""
        if self._engine is None:
            raise MisconfigurationException(
                "MMPareto's training step runs only inside `Trainer.fit` (the callback sets up there)."
            )
        return self._engine.capture()

    def optimize(self, pl_module: MMParetoModule, losses: Any) -> dict[str, Tensor]:
        """Backward, rule and optimizer step for the losses of one training step."""
        if not isinstance(losses, Mapping):
            raise MisconfigurationException(
                f"{type(pl_module).__name__}.training_step must return a dict of named scalar losses, e.g. "
                f"{{'{self.multimodal_key}': loss_mm, '<encoder>': loss_unimodal, ...}}, got "
                f"{type(losses).__name__}. Do not call backward yourself."
            )
        assert self._engine is not None
        trainer = pl_module.trainer
        optimizer = pl_module.optimizers()
        assert not isinstance(optimizer, list)
        n = self.accumulate_grad_batches
        self._micro_batches += 1
        first = self._micro_batches == 1
        last = self._micro_batches >= n or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

        if first:
            optimizer.zero_grad(set_to_none=True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        window = {k: v / n for k, v in losses.items()} if n > 1 else dict(losses)
        sync: AbstractContextManager[Any] = nullcontext()
        if not last and isinstance(trainer.strategy, ParallelStrategy):
            sync = trainer.strategy.block_backward_sync()
        with sync:
            try:
                self._engine.backward(
                    window,
                    backward_fn=pl_module.manual_backward,
                    scale_fn=scaler.scale if scaler is not None else None,
                    accumulate=not first,
                )
            except GradientSplittingError as err:
                raise MisconfigurationException(str(err)) from err

        detached = {k: v.detach() for k, v in losses.items()}
        assert self._metrics is not None
        loss_values = self._metrics.loss_values(detached)
        created = self._metrics.update_losses(loss_values)
        for name, layout in self._engine.splitter.layouts.items():
            created |= self._metrics.set_objectives(name, layout.objectives)
        if created and hasattr(pl_module, "_metric_attributes"):
            # New metric objects: Lightning caches where the module's metrics live on the first
            # `self.log(<Metric>)` (e.g. in validation), so the cache is dropped to find them too.
            pl_module._metric_attributes = None
        log_step = self.log_on_step and _is_logging_step(trainer)
        if log_step:
            pl_module.log_dict(self._metrics.loss_step_values(loss_values), on_step=True, on_epoch=False)
        total = loss_values["loss"]
        if not last:
            return {"loss": total, **detached}

        self._micro_batches = 0
        stats = self._engine.integrate(reduce_fn=_mean_across_ranks(trainer))
        finite: Tensor | None = None
        if scaler is None and self.skip_non_finite:
            finite = self._engine.all_finite(self._parameters)
            if trainer.world_size > 1:
                finite = _all_ranks(finite)
        # Metrics are updated before the finite check reads the device, so their kernels are queued
        # while the GPU still works on the backward.
        self._record(pl_module, stats, finite, log_step)
        if finite is not None and not bool(finite):  # the step's single host synchronisation
            self._skip_step(pl_module, optimizer, stats)
        else:
            optimizer.step()
        self.optimizer_steps += 1
        _step_schedulers(
            trainer, pl_module, "step", plateau=False, index=trainer.fit_loop.epoch_loop.batch_idx + 1
        )
        return {"loss": total, **detached}

    def _skip_step(self, pl_module: MMParetoModule, optimizer: Any, stats: Mapping[str, RuleStats]) -> None:
        assert self._engine is not None
        self.skipped_steps += 1
        self._skipped_tensor.add_(1)
        bad_losses = self._engine.non_finite_losses()
        bad_encoders = [name for name, s in stats.items() if not bool(s.finite)]
        rank_zero_warn(
            f"MMPareto: non-finite values at global step {pl_module.trainer.global_step}: "
            f"loss(es) {bad_losses or 'none (all losses finite)'}; encoder gradients of "
            f"{bad_encoders or 'no encoder'} (or a head's gradient) not finite. The optimizer step was "
            "skipped and the parameters are untouched.",
            category=RuntimeWarning,
        )
        optimizer.zero_grad(set_to_none=True)

    def _record(
        self, pl_module: MMParetoModule, stats: Mapping[str, RuleStats], valid: Tensor | None, log_step: bool
    ) -> None:
        assert self._metrics is not None
        self._metrics.update(stats, valid)
        for name, s in stats.items():
            ok = s.finite if valid is None else s.finite & valid
            self._totals[name] += torch.stack([s.conflict & ok, s.stationary & ok]).to(torch.float32)
        # The cumulative counts are logged on every step, so ModelCheckpoint and EarlyStopping can
        # monitor them whenever they look.
        values: dict[str, Tensor] = {}
        for name, totals in self._totals.items():
            values[f"mmpareto/{name}/conflicts_total"] = totals[0]
            values[f"mmpareto/{name}/stationary_total"] = totals[1]
        # The counter of skipped steps only changes after this point: it is logged as it was before.
        values["mmpareto/skipped_steps"] = self._skipped_tensor
        if log_step:
            values.update(self._metrics.step_values(stats))
        pl_module.log_dict(values, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ hooks
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning unscales AMP gradients before this hook, so clipping sees true magnitudes.
        if self.gradient_clip_val is not None:
            pl_module.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged: dict[str, Metric] = {}
        if self.log_on_epoch and self._metrics is not None:
            for key, metric in self._metrics.epoch_metrics().items():
                if metric.update_called:
                    pl_module.log(
                        key, metric, on_step=False, on_epoch=True, prog_bar=key == "mmpareto/loss_epoch"
                    )
                    logged[key] = metric
        _step_schedulers(
            trainer, pl_module, "epoch", plateau=None, index=trainer.current_epoch + 1, extra=logged
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training or (trainer.state.fn == "fit" and not trainer.sanity_checking):
            _step_schedulers(
                trainer, pl_module, "step", plateau=True, index=trainer.fit_loop.epoch_loop.batch_idx + 1
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        totals = {
            name: {"conflicts": int(t[0].item()), "stationary": int(t[1].item())}
            for name, t in self._totals.items()
        }
        return {
            "totals": totals or self._loaded_totals,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_totals = {k: dict(v) for k, v in state_dict.get("totals", {}).items()}
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        for name, t in self._totals.items():
            loaded = self._loaded_totals.get(name, {})
            t.copy_(torch.tensor([loaded.get("conflicts", 0), loaded.get("stationary", 0)], dtype=t.dtype))

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        """Cumulative ``conflicts`` and ``stationary`` counts per encoder (reads the device)."""
        return self.state_dict()["totals"]


def _validated_encoders(pl_module: MMParetoModule) -> dict[str, nn.Module]:
    encoders = pl_module.mmpareto_encoders()
    if not isinstance(encoders, Mapping) or not encoders:
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.mmpareto_encoders() must return a non-empty dict of name -> "
            f"encoder submodule, got {encoders!r}."
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


def _mean_across_ranks(trainer: pl.Trainer) -> Any:
    if trainer.world_size <= 1 or not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return None
    world = trainer.world_size

    def reduce(tensor: Tensor) -> Tensor:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.div_(world)

    return reduce


def _all_ranks(flag: Tensor) -> Tensor:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = flag.to(torch.float32).reshape(1)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value[0] > 0.5


def _is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes logs this step (``log_every_n_steps``): step values are logged only then."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True) or trainer.fast_dev_run)


def _step_schedulers(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    interval: str,
    plateau: bool | None,
    index: int,
    extra: Mapping[str, Metric] | None = None,
) -> None:
    """Step LR schedulers as automatic optimization would (manual optimization does not)."""
    recorded = getattr(pl_module, "_mmpareto_scheduler_keys", {})
    for config in trainer.lr_scheduler_configs:
        keys = recorded.get(id(config.scheduler), {})
        is_plateau = keys.get("reduce_on_plateau", isinstance(config.scheduler, ReduceLROnPlateau))
        if config.interval != interval or (plateau is not None and is_plateau != plateau):
            continue
        if index % config.frequency:
            continue
        monitor_val = None
        if is_plateau:
            monitor = keys.get("monitor")
            if monitor is None:
                raise MisconfigurationException(
                    "`configure_optimizers` must include a monitor when a `ReduceLROnPlateau` scheduler is "
                    'used, e.g. {"optimizer": opt, "lr_scheduler": {"scheduler": sched, '
                    '"monitor": "val/loss"}}.'
                )
            monitor_val = trainer.callback_metrics.get(monitor)
            if monitor_val is None and extra and monitor in extra:
                # An epoch value logged a moment ago reaches callback_metrics only after this hook.
                monitor_val = extra[monitor].compute()
            if monitor_val is None:
                message = (
                    f"ReduceLROnPlateau conditioned on metric {monitor!r}, which is not available. "
                    f"Available metrics are: {sorted({*trainer.callback_metrics, *(extra or {})})}."
                )
                if keys.get("strict", True):
                    raise MisconfigurationException(message)
                warnings.warn(message + " Skipping the learning-rate update.", RuntimeWarning, stacklevel=2)
                continue
        pl_module.lr_scheduler_step(config.scheduler, monitor_val)
