"""What automatic optimization does around an optimizer step, re-created for MMPareto's manual mode.

MMPareto needs manual optimization (the per-loss gradients are taken inside ``training_step``), and
there Lightning leaves gradient accumulation, gradient clipping, LR scheduler stepping and its
ReduceLROnPlateau monitors to the user. :class:`OptimizationBookkeeping` is the one place that does
them, with one notion of "an optimizer step happened": a step that is skipped for non-finite values
counts like one that ran, as Lightning's own AMP skip does, so ``global_step``, the schedulers and
``trainer.estimated_stepping_batches`` always agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import Metric

from mmpareto_lightning.lightning.closure import StepClosure

__all__ = ["OptimizationBookkeeping", "take_plateau_keys"]

_PLATEAU_KEYS = ("monitor", "strict", "reduce_on_plateau")


def take_plateau_keys(conf: Any, found: dict[int, dict[str, Any]]) -> Any:
    """Strip the ReduceLROnPlateau keys from an optimizer configuration, recording them per scheduler.

    Lightning drops (with a warning) ``monitor``, ``strict`` and ``reduce_on_plateau`` in manual
    optimization; MMPareto steps the schedulers itself and needs them.
    """
    if isinstance(conf, (list, tuple)):
        return type(conf)(take_plateau_keys(c, found) for c in conf)
    if not isinstance(conf, dict):
        return conf
    conf = dict(conf)
    if "scheduler" in conf:  # an lr_scheduler dict
        keys = {k: conf.pop(k) for k in _PLATEAU_KEYS if k in conf}
        found.setdefault(id(conf["scheduler"]), {}).update(keys)
        return conf
    if "lr_scheduler" in conf:  # an optimizer dict; its top-level "monitor" belongs to its scheduler
        monitor = conf.pop("monitor", None)
        scheduler = conf["lr_scheduler"]
        if not isinstance(scheduler, dict):
            scheduler = {"scheduler": scheduler}
        if monitor is not None:
            scheduler = {"monitor": monitor, **scheduler}
        conf["lr_scheduler"] = take_plateau_keys(scheduler, found)
    return conf


class OptimizationBookkeeping:
    """Accumulation, clipping, skipped steps and LR schedulers of one manually optimized fit.

    Args:
        accumulate_grad_batches: batches whose gradients are summed before each step.
        gradient_clip_val: clip the final gradients to this value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
    """

    def __init__(
        self,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self._configured = (accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm)
        self.optimizer_steps = 0
        self.skipped_steps = 0
        # What was taken over from the Trainer, to give back after Lightning's own checks.
        self._from_trainer: dict[str, Any] = {}
        self._fitting = False
        # ids of the optimizers whose first step of this fit was checked against a copy of the
        # parameters (ids, not references: the callback is pickled by ddp_spawn).
        self._compared: set[int] = set()

    # ------------------------------------------------------------------ Trainer settings
    def adopt_trainer_settings(self, trainer: pl.Trainer) -> None:
        """Take over ``Trainer(accumulate_grad_batches=..., gradient_clip_val=...)``.

        Lightning rejects both in manual optimization before any callback hook runs, so this is called
        when the module is attached to the Trainer: the Trainer's values move here and the Trainer
        holds neutral ones until :meth:`restore_trainer_settings`.
        """
        if self._fitting:  # attached again during the fit: the Trainer already holds our values
            return
        accumulate = trainer.accumulate_grad_batches
        clip_val = trainer.gradient_clip_val
        if accumulate != 1:
            if self.accumulate_grad_batches not in (1, accumulate):
                raise MisconfigurationException(
                    f"`accumulate_grad_batches` is set on both the Trainer ({accumulate}) and the "
                    f"MMParetoCallback ({self.accumulate_grad_batches}); set it in one place (the Trainer)."
                )
            self.accumulate_grad_batches = accumulate
            self._from_trainer["accumulate_grad_batches"] = accumulate
            trainer.accumulate_grad_batches = 1
        if clip_val is not None and clip_val > 0:
            if self.gradient_clip_val not in (None, clip_val):
                raise MisconfigurationException(
                    f"`gradient_clip_val` is set on both the Trainer ({clip_val}) and the MMParetoCallback "
                    f"({self.gradient_clip_val}); set it in one place (the Trainer)."
                )
            self.gradient_clip_val = clip_val
            self.gradient_clip_algorithm = trainer.gradient_clip_algorithm or "norm"
            self._from_trainer["gradient_clip_val"] = clip_val
            trainer.gradient_clip_val = None

    def restore_trainer_settings(self, trainer: pl.Trainer) -> None:
        """After Lightning's checks: the Trainer counts accumulation as MMPareto does.

        With ``trainer.accumulate_grad_batches`` equal to the real accumulation, Lightning's
        ``estimated_stepping_batches`` (what OneCycleLR is usually built from) and its logging steps
        count optimizer steps; manual optimization uses it for nothing else.
        """
        self._fitting = True
        self._compared = set()
        trainer.accumulate_grad_batches = self.accumulate_grad_batches
        if "gradient_clip_val" in self._from_trainer:
            # Manual optimization never clips by itself: the value is only shown back to the user.
            trainer.gradient_clip_val = self._from_trainer["gradient_clip_val"]

    def release_trainer_settings(self, trainer: pl.Trainer) -> None:
        """End of fit: what came from the Trainer is the Trainer's again, for the next fit to adopt."""
        self._fitting = False
        trainer.accumulate_grad_batches = self._from_trainer.get("accumulate_grad_batches", 1)
        self.accumulate_grad_batches, self.gradient_clip_val, self.gradient_clip_algorithm = self._configured
        self._from_trainer = {}

    # ------------------------------------------------------------------ the step
    @staticmethod
    def closes_window(trainer: pl.Trainer) -> bool:
        """Whether this batch ends an accumulation window (as automatic optimization decides it)."""
        return not trainer.fit_loop.epoch_loop._should_accumulate()

    def clip(self, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Clip the gradients about to be applied (Lightning unscales AMP gradients before this)."""
        if self.gradient_clip_val is not None:
            pl_module.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        skip: bool,
        loss: Tensor | None = None,
    ) -> None:
        """Run (or skip) the optimizer step, count it, and step the step-interval schedulers.

        Args:
            loss: the window's loss, which the closure handed to the optimizer returns.
        """
        if skip:
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            # Counted without touching the parameters, as a GradScaler's skipped step is counted.
            optimizer._on_before_step()
            optimizer._on_after_step()
        else:
            inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            # Under a GradScaler, Lightning calls the closure itself before the optimizer runs.
            first = (
                id(inner) not in self._compared and getattr(trainer.precision_plugin, "scaler", None) is None
            )
            closure = StepClosure(optimizer, loss, compare_values=first, describe=_describer(pl_module))
            with closure.watching():
                optimizer.step(closure=closure)
            closure.check_called()
            self._compared.add(id(inner))
        self.optimizer_steps += 1
        self.step_schedulers(
            trainer, pl_module, "step", plateau=False, index=trainer.fit_loop.epoch_loop.batch_idx + 1
        )

    def step_schedulers(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        interval: str,
        plateau: bool | None,
        index: int,
        extra: Mapping[str, Metric] | None = None,
    ) -> None:
        """Step LR schedulers as automatic optimization would (manual optimization does not).

        Args:
            interval: ``"step"`` or ``"epoch"``.
            plateau: only ReduceLROnPlateau schedulers (``True``), only the others (``False``), or both.
            index: the step or epoch number the scheduler's ``frequency`` is checked against.
            extra: metrics logged a moment ago that are not in ``trainer.callback_metrics`` yet.
        """
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
                        "`configure_optimizers` must include a monitor when a `ReduceLROnPlateau` scheduler "
                        'is used, e.g. {"optimizer": opt, "lr_scheduler": {"scheduler": sched, '
                        '"monitor": "val/loss"}}.'
                    )
                monitor_val = trainer.callback_metrics.get(monitor)
                if monitor_val is None and extra and monitor in extra:
                    monitor_val = extra[monitor].compute()
                if monitor_val is None:
                    message = (
                        f"ReduceLROnPlateau conditioned on metric {monitor!r}, which is not available. "
                        f"Available metrics are: {sorted({*trainer.callback_metrics, *(extra or {})})}."
                    )
                    if keys.get("strict", True):
                        raise MisconfigurationException(message)
                    warnings.warn(
                        message + " Skipping the learning-rate update.", RuntimeWarning, stacklevel=2
                    )
                    continue
            pl_module.lr_scheduler_step(config.scheduler, monitor_val)


def _describer(pl_module: pl.LightningModule) -> Any:
    def describe(parameter: Tensor) -> str:  # called only to word an error
        name = next((n for n, p in pl_module.named_parameters() if p is parameter), None)
        return repr(name) if name else f"of shape {tuple(parameter.shape)}"

    return describe
