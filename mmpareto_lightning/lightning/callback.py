"""``MMParetoCallback``: runs the MMPareto update for an :class:`~mmpareto_lightning.MMParetoModule`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchmetrics import Metric

from mmpareto_lightning.distributed import all_ranks, mean_across_ranks
from mmpareto_lightning.engine import GradientSplittingError, MMParetoEngine
from mmpareto_lightning.engine.compiled import has_compiled_modules
from mmpareto_lightning.lightning.agreement import RankAgreement
from mmpareto_lightning.lightning.fit_checks import (
    check_ddp_reducer,
    check_optimizer,
    check_parameters,
    check_trainer,
    validated_encoders,
)
from mmpareto_lightning.lightning.metrics import MMParetoMetrics
from mmpareto_lightning.lightning.module import MMParetoModule, attach_driver, detach_driver, ensure_wrapped
from mmpareto_lightning.lightning.recording import (
    Totals,
    is_logging_step,
    monitored_keys,
    plugin_key,
    skipped_step_message,
)
from mmpareto_lightning.lightning.sharding import check_sharded_module, is_sharded_strategy
from mmpareto_lightning.lightning.stepping import OptimizationBookkeeping
from mmpareto_lightning.rule import RESCALE_MODES, STRATEGIES, RuleConfig, RuleStats

__all__ = ["MMParetoCallback"]


class MMParetoCallback(Callback):
    r"""Integrates the multimodal and unimodal gradients of each encoder with MMPareto.

    The :class:`~mmpareto_lightning.MMParetoModule` hands its named losses to this callback, which, per
    training step: takes each loss's exact gradient on each encoder from one forward pass (one extra
    encoder backward on top of Lightning's own backward of the summed loss), applies the rule per
    encoder, writes the result into ``.grad`` and steps the optimizer through Lightning, so
    ``global_step``, LR schedulers, precision plugins, DDP and optimizer hooks behave as usual. Heads and
    fusion layers get the plain gradient of the summed losses.

    ``Trainer(accumulate_grad_batches=..., gradient_clip_val=..., gradient_clip_algorithm=...)`` work as
    in automatic optimization (the callback takes them over, since Lightning rejects them in manual
    mode); the same settings can be given here instead. Accumulation divides every loss by the number of
    batches (Lightning's convention) and adds up the per-loss gradients of the window, i.e. averages them,
    before the rule; clipping acts on the integrated (and, under 16-bit AMP, unscaled) gradients.

    Args:
        strategy: ``"mmpareto"`` (default), ``"pareto"`` (conventional MGDA), ``"uniform"`` (plain
            sum of the losses) or ``"multimodal_only"`` (one joint loss: encoders get the multimodal
            gradient only; unimodal heads still train, as linear probes). One argument switches methods
            for ablations.
        rescale: ``"per_tensor"`` (the authors' code, never shrinks) or ``"per_encoder"`` (the paper's
            formula).
        gamma: final scale; ``None`` gives 1.5 for ``strategy="mmpareto"`` with ``rescale="per_tensor"``
            (the authors' code) and 1.0 for every other combination (``per_encoder``, ``"pareto"``,
            ``"uniform"``, ``"multimodal_only"``). A number also applies to ``"uniform"`` (e.g.
            ``gamma=1.5``: the step-size control of MMPareto's enlarged steps).
        multimodal_key: name of the multimodal loss in the dict ``training_step`` returns.
        stationarity_tol: relative tolerance of the Pareto-stationarity test.
        accumulate_grad_batches: number of batches per optimizer step; every loss is divided by it
            (Lightning's convention), so the step applies the window's mean gradient (or set it on the
            Trainer).
        gradient_clip_val: clip the integrated gradients to this value (``None``: no clipping; or set it
            on the Trainer).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        skip_non_finite: without a GradScaler, check once per step that all losses and gradients are
            finite and skip the optimizer step otherwise (one host read of a boolean per step, what
            ``GradScaler`` costs; the skipped step counts as a step, as the scaler's does). Under 16-bit
            AMP the scaler makes that check and the callback adds none.
        diagnostics: with ``"uniform"`` or ``"multimodal_only"``, still split the gradients per loss to
            log cos beta and conflicts (default). ``False`` runs those baselines at the cost of a plain
            step and logs no rule metrics (for timing and large ablations); the rule strategies need the
            split and refuse it.
        log_on_step: log the metrics on Lightning's logging steps (``*_step`` keys; ``log_every_n_steps``).
        log_totals_every_step: log the cumulative ``*_total`` counts and ``mmpareto/skipped_steps`` on
            every step (``True``) or on the logging steps only (``False``). ``None`` (default): every step
            when a callback or an LR scheduler monitors one of the plugin's keys (a ``ModelCheckpoint`` or
            ``EarlyStopping`` with ``monitor="mmpareto/..."``), else on the logging steps: each
            ``self.log`` costs Lightning about a tenth of a millisecond.
        log_on_epoch: log epoch aggregates (``*_epoch`` keys).

    Logged keys, all under ``mmpareto/`` so that none can overwrite a key of the user's: per encoder
    ``<e>``, ``mmpareto/<e>/cos_beta``, ``alpha_multimodal``, ``alpha_unimodal`` (and ``alpha_<loss>`` for
    every further objective; the alphas of an encoder sum to 1), ``rescale`` (means, ``_step`` and
    ``_epoch``), ``conflicts`` and ``stationary`` (counts), ``conflict_rate_epoch``, ``conflicts_total``
    and ``stationary_total`` (cumulative, logged every step, kept in checkpoints);
    ``mmpareto/skipped_steps``; and each loss as ``mmpareto/loss_<name>`` plus their sum ``mmpareto/loss``.

    Example::

        trainer = pl.Trainer(callbacks=[MMParetoCallback(strategy="mmpareto")], gradient_clip_val=1.0)
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
        diagnostics: bool = True,
        log_on_step: bool = True,
        log_on_epoch: bool = True,
        log_totals_every_step: bool | None = None,
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
        if not diagnostics and strategy not in ("uniform", "multimodal_only"):
            raise MisconfigurationException(
                f"`diagnostics=False` runs the baselines without the per-loss split, but strategy "
                f"{strategy!r} needs it. Use it with strategy='uniform' or 'multimodal_only'."
            )
        self.rule = RuleConfig(
            strategy=strategy, rescale=rescale, gamma=gamma, stationarity_tol=stationarity_tol
        )
        self.multimodal_key = multimodal_key
        self.bookkeeping = OptimizationBookkeeping(
            accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm
        )
        self.skip_non_finite = skip_non_finite
        self.diagnostics = diagnostics
        self.log_on_step = log_on_step
        self.log_totals_every_step = log_totals_every_step
        self._totals_every_step = bool(log_totals_every_step)
        # Parameters outside the encoders, listed once per fit (a module walk costs milliseconds).
        self._other_params: list[Tensor] = []
        self._encoder_param_list: list[Tensor] = []
        self.log_on_epoch = log_on_epoch

        self.in_step = False
        self._batch_seen = False
        # While the plugin logs its own keys (the user's `self.log` may not use them).
        self._own_logging = False
        # A window of the split-free baselines (diagnostics=False) has gradients waiting in .grad.
        self._cheap_window_open = False
        # The loss of the current window (sum of the named losses, / N under accumulation): what the
        # closure handed to the optimizer returns.
        self._window_loss: Tensor | None = None
        self._engine: MMParetoEngine | None = None
        self._metrics: MMParetoMetrics | None = None
        self._module: MMParetoModule | None = None
        self._totals = Totals()
        # Data parallel: host-side exchanges between the ranks, and whether DDP needs every encoder
        # called on every rank (find_unused_parameters=False).
        self._ranks: RankAgreement | None = None

    # ------------------------------------------------------------------ settings shown to users
    @property
    def accumulate_grad_batches(self) -> int:
        return self.bookkeeping.accumulate_grad_batches

    @property
    def gradient_clip_val(self) -> float | None:
        return self.bookkeeping.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> str:
        return self.bookkeeping.gradient_clip_algorithm

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of this callback's fits (skipped ones included), kept in checkpoints."""
        return self.bookkeeping.optimizer_steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite values, kept in checkpoints."""
        return self.bookkeeping.skipped_steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(strategy=self.rule.strategy, multimodal_key=self.multimodal_key)

    # ------------------------------------------------------------------ set-up
    def adopt_trainer_settings(self, trainer: pl.Trainer) -> None:
        """Take over the Trainer's accumulation and clipping (called when a module is attached)."""
        if self in trainer.callbacks:
            self.bookkeeping.adopt_trainer_settings(trainer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, MMParetoModule):
            raise MisconfigurationException(
                f"MMParetoCallback needs an MMParetoModule, got {type(pl_module).__name__}. Subclass "
                "`mmpareto_lightning.MMParetoModule` instead of `LightningModule`."
            )
        check_trainer(trainer, pl_module, MMParetoCallback)
        ensure_wrapped(type(pl_module))
        if "training_step" in vars(pl_module):
            raise MisconfigurationException(
                f"`training_step` was assigned to this {type(pl_module).__name__} instance; MMPareto wraps "
                "methods of the class. Define `training_step` as a method (or assign it to the class)."
            )
        if is_sharded_strategy(trainer.strategy):
            self._engine = None  # prepared at fit start, once `configure_model` has sharded the modules
        else:
            self._prepare(trainer, pl_module)
        self.bookkeeping.restore_trainer_settings(trainer)
        self._module = pl_module
        attach_driver(pl_module, self)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The encoders, the engine on their parameters, the metrics and the counters of this fit."""
        encoders = validated_encoders(pl_module)
        try:
            self._engine = MMParetoEngine(
                encoders,
                self.rule,
                multimodal_key=self.multimodal_key,
                param_names={id(p): n for n, p in pl_module.named_parameters()},
            )
        except GradientSplittingError as err:
            raise MisconfigurationException(str(err)) from err
        self._engine.splitter.zero_absent = trainer.world_size > 1
        # Compiled heads are differentiated twice too (the head-level cotangents, then the backward).
        self._engine.splitter.compiled |= has_compiled_modules(pl_module)
        self._metrics = MMParetoMetrics(list(encoders)).to(pl_module.device)
        # torchmetrics objects logged with `self.log` must be attributes of the LightningModule.
        pl_module.mmpareto_metrics = self._metrics
        self._totals.start(encoders, self.skipped_steps, pl_module.device)

    def _prepare_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FSDP2: `configure_model`, which runs after `setup`, replaced the parameters by shards (or
        created the modules); the encoders and their shards are read once it has run."""
        if self._engine is None:
            check_sharded_module(pl_module)
            self._prepare(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_sharded_strategy(trainer.strategy):
            self._prepare_sharded(trainer, pl_module)
        if pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} has `automatic_optimization = True`, but MMPareto drives the "
                "optimization itself. Remove the line that re-enables it (MMParetoModule.__init__ turns it "
                "off)."
            )
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"MMPareto steps exactly one optimizer, but `configure_optimizers` returned "
                f"{len(trainer.optimizers)}. Put all parameters in one optimizer (parameter groups can keep "
                "different learning rates)."
            )
        check_optimizer(trainer.optimizers[0])
        check_ddp_reducer(trainer)
        if self._engine is not None:
            clipping = self.gradient_clip_algorithm if self.gradient_clip_val is not None else None
            check_parameters(trainer, pl_module, self._engine.splitter.encoders, clipping)
        if self._metrics is not None:
            self._metrics.to(pl_module.device)
            self._totals.to(pl_module.device)
        if self._engine is not None:
            # After configure_model and the strategy's setup: the parameters the optimizer steps.
            encoder_params = self._engine.splitter.encoder_of
            params = list(pl_module.parameters())
            self._other_params = [p for p in params if id(p) not in encoder_params]
            self._encoder_param_list = [p for p in params if id(p) in encoder_params]
        self._totals_every_step = (
            self.log_totals_every_step
            if self.log_totals_every_step is not None
            else any(key.startswith("mmpareto/") for key in monitored_keys(trainer, pl_module))
        )
        if trainer.world_size > 1:
            # After the strategy's setup: the process group exists and the model is wrapped. Under FSDP
            # the ranks agree on each step's backward passes in the engine instead (the splitter ignores
            # this agreement there); the epoch's loss means are exchanged through it in both cases.
            strategy = trainer.strategy
            self._ranks = RankAgreement(
                every_encoder_needed=isinstance(strategy, DDPStrategy)
                and not getattr(
                    strategy.model,
                    "find_unused_parameters",
                    strategy._ddp_kwargs.get("find_unused_parameters"),
                )
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release(trainer)

    def _release(self, trainer: pl.Trainer) -> None:
        """End of a fit, normal or not: nothing of this fit stays on the module or the Trainer."""
        if self._engine is not None:
            self._engine.splitter.close_window()
            self._engine.splitter.release_outputs()
            self._engine = None
        self._cheap_window_open = False
        self._window_loss = None
        if self._module is not None:
            detach_driver(self._module, self)
            self._module = None
        self.in_step = False
        if self._ranks is not None:
            self._ranks.close()
            self._ranks = None
        self.bookkeeping.release_trainer_settings(trainer)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        others = [
            key
            for key in checkpoint.get("callbacks", {})
            if key.startswith(type(self).__qualname__) and key != self.state_key
        ]
        if others and self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn(
                f"The checkpoint holds the state of {others[0]}, not of this {self.state_key}: the strategy "
                "or the multimodal key differs, so the cumulative conflict / stationarity counts and the "
                "step counters restart from zero.",
                category=RuntimeWarning,
            )

    # ------------------------------------------------------------------ the training step
    def run_training_step(
        self, module: MMParetoModule, step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``module``'s ``training_step`` under the split and do the update (the mixin calls this)."""
        if self._engine is None:  # a step before this callback's on_fit_start (the Tuner's) under FSDP2
            self._prepare_sharded(module.trainer, module)
        assert self._engine is not None
        self.in_step = True
        self._batch_seen = True
        steps_before = module.trainer.global_step
        try:
            with self._engine.capture():
                losses = step(module, *args, **kwargs)
            if module.trainer.global_step != steps_before:
                raise MisconfigurationException(
                    f"{type(module).__name__}.training_step stepped the optimizer itself. With MMPareto, "
                    "return the named losses and leave backward, zero_grad and the optimizer step to "
                    "MMParetoCallback."
                )
            self.in_step = False
            return self._optimize(module, losses)
        finally:
            self.in_step = False
            self._engine.splitter.release_outputs()

    def _optimize(self, pl_module: MMParetoModule, losses: Any) -> dict[str, Tensor] | None:
        """Backward, rule and optimizer step for the losses of one training step."""
        if losses is not None and not isinstance(losses, Mapping):
            raise MisconfigurationException(
                f"{type(pl_module).__name__}.training_step must return a dict of named scalar losses, e.g. "
                f"{{'{self.multimodal_key}': loss_mm, '<encoder>': loss_unimodal, ...}} (or None to skip "
                f"the batch), got {type(losses).__name__}. Do not call backward yourself."
            )
        assert self._engine is not None and self._metrics is not None
        trainer = pl_module.trainer
        optimizer = pl_module.optimizers()
        assert not isinstance(optimizer, list)
        splitter = self._engine.splitter
        last = self.bookkeeping.closes_window(trainer)
        result: dict[str, Tensor] | None = None
        if losses is not None:
            if not (splitter.window_open or self._cheap_window_open):
                optimizer.zero_grad(set_to_none=True)
            result = self._backward(trainer, pl_module, dict(losses), last)
        if last and (splitter.window_open or self._cheap_window_open):
            self._finish_window(trainer, pl_module, optimizer)
        return result

    def _backward(
        self, trainer: pl.Trainer, pl_module: MMParetoModule, losses: dict[str, Tensor], last: bool
    ) -> dict[str, Tensor]:
        assert self._engine is not None and self._metrics is not None
        n = self.bookkeeping.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        window = {k: v / n for k, v in losses.items()} if n > 1 else losses
        sync: AbstractContextManager[Any] = nullcontext()
        if not last and isinstance(trainer.strategy, ParallelStrategy):
            sync = trainer.strategy.block_backward_sync()
        splitter = self._engine.splitter
        new_window = not (splitter.window_open or self._cheap_window_open)
        # The ranks agree once per optimizer step, before the backward that communicates: on the
        # objectives whose gradients are averaged (the split) and, for DDP without
        # find_unused_parameters, on every encoder having been called.
        agree = None
        if last and self._ranks is not None and (self.diagnostics or self._ranks.every_encoder_needed):
            agree = self._ranks
        with sync:
            try:
                if not self.diagnostics and self.rule.strategy == "uniform":
                    splitter.validate_losses(window)
                    if agree is not None:
                        agree({}, splitter.absent_encoders())
                    with splitter.holding_post_accumulate_grad_hooks():
                        pl_module.manual_backward(sum(window.values()))
                else:
                    self._engine.backward(
                        window,
                        backward_fn=pl_module.manual_backward,
                        scale_fn=scaler.scale if scaler is not None else None,
                        accumulate=splitter.window_open,
                        encoder_loss=None if self.diagnostics else self.multimodal_key,
                        agree=agree,
                    )
            except GradientSplittingError as err:
                raise MisconfigurationException(str(err)) from err
        if not self.diagnostics:
            self._cheap_window_open = True

        detached = {k: v.detach() for k, v in losses.items()}
        loss_values = self._metrics.loss_values(detached)
        # The objective of the window's gradients, which the optimizer's closure returns.
        batch_loss = loss_values["loss"] / n if n > 1 else loss_values["loss"]
        self._window_loss = (
            batch_loss if new_window or self._window_loss is None else self._window_loss + batch_loss
        )
        self._metrics.update_losses(loss_values)
        if self.log_on_step and is_logging_step(trainer):
            step_values = self._metrics.loss_step_values(loss_values)
            self._log(pl_module.log_dict, step_values, on_step=True, on_epoch=False)
        return {"loss": loss_values["loss"], **detached}

    def _finish_window(self, trainer: pl.Trainer, pl_module: MMParetoModule, optimizer: Any) -> None:
        assert self._engine is not None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.diagnostics:
            assert self._metrics is not None
            for name, layout in self._engine.splitter.layouts.items():
                self._metrics.set_objectives(name, layout.objectives)
            # FSDP averages the extra objectives' gradients itself (reduce-scatter).
            sharded = self._engine.sharded is not None
            stats = self._engine.integrate(
                reduce_fn=None if sharded else mean_across_ranks(trainer.world_size), run_hooks=False
            )
            others = [p for p in self._other_params if p.requires_grad]
        else:
            self._cheap_window_open = False
            stats = {}
            gamma = self.rule.effective_gamma
            grads = [p.grad for p in self._encoder_param_list if p.grad is not None]
            if gamma != 1.0 and grads:
                torch._foreach_mul_(grads, gamma)
            others = [p for p in (*self._other_params, *self._encoder_param_list) if p.requires_grad]
        finite: Tensor | None = None
        if scaler is None and self.skip_non_finite:
            finite = self._engine.all_finite(stats, others)
            if trainer.world_size > 1:
                finite = all_ranks(finite)
        # Metrics are updated before the finite check reads the device, so their kernels are queued
        # while the GPU still works on the backward.
        self._record(pl_module, stats, finite, is_logging_step(trainer))
        skip = finite is not None and not bool(finite)  # the step's single host synchronisation
        if skip:
            self._engine.splitter.discard_post_accumulate_grad_hooks()
            self._warn_skipped(pl_module, stats)
        else:
            # Held during the backward: the encoder parameters' hooks see the gradient that is applied.
            self._engine.splitter.run_post_accumulate_grad_hooks()
        self.bookkeeping.step(trainer, pl_module, optimizer, skip=skip, loss=self._window_loss)

    def _warn_skipped(self, pl_module: MMParetoModule, stats: Mapping[str, RuleStats]) -> None:
        assert self._engine is not None
        self._totals.skipped.add_(1)
        message = skipped_step_message(pl_module.trainer.global_step, self._engine.non_finite_losses(), stats)
        rank_zero_warn(message, category=RuntimeWarning)

    def _record(
        self,
        pl_module: MMParetoModule,
        stats: Mapping[str, RuleStats],
        valid: Tensor | None,
        logging_step: bool,
    ) -> None:
        assert self._metrics is not None
        self._metrics.update(stats, valid)
        self._metrics.close_loss_window(valid)
        self._totals.add(stats, valid)
        values: dict[str, Tensor] = {}
        # The cumulative counts: on every step when something monitors the plugin's keys (so a
        # ModelCheckpoint or EarlyStopping sees them whenever it looks), else on the logging steps. The
        # counter of skipped steps only changes after this point: it is logged as it was before.
        if self._totals_every_step or logging_step:
            values.update(self._totals.values())
        if self.log_on_step and logging_step:
            values.update(self._metrics.step_values(stats))
        if values:
            self._log(pl_module.log_dict, values, on_step=True, on_epoch=False)

    def _log(self, log: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self._own_logging = True
        try:
            log(*args, **kwargs)
        finally:
            self._own_logging = False

    def check_log_key(self, name: str) -> None:
        """Refuse a key of the plugin's own logged by the user's code (called by ``MMParetoModule.log``)."""
        if self._own_logging or self._metrics is None:
            return
        if plugin_key(name, self._metrics.encoder_names):
            raise MisconfigurationException(
                f"`self.log({name!r}, ...)`: keys under 'mmpareto/loss', 'mmpareto/skipped_steps' and "
                "'mmpareto/<encoder>/' are MMParetoCallback's own (it logs every loss, their sum, the "
                "skipped steps and each encoder's diagnostics there), so your value and the plugin's would "
                "overwrite each other in the logger and in `trainer.callback_metrics`. Log it under another "
                "name (any other key, 'mmpareto/<something else>' included)."
            )

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._batch_seen:
            raise MisconfigurationException(
                f"A training batch ran without MMPareto: {type(pl_module).__name__}.training_step was not "
                "routed through MMParetoModule (nothing was optimized). Make sure the class subclasses "
                "MMParetoModule and defines or inherits `training_step` as a method."
            )
        self._batch_seen = False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.bookkeeping.clip(pl_module, optimizer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged: dict[str, Metric] = {}
        if self.log_on_epoch and self._metrics is not None:
            gather = self._ranks.gather if self._ranks is not None else None
            metrics = self._metrics.epoch_metrics(gather)
            # Metric objects may have been created since Lightning cached where the module's metrics
            # live (on the first `self.log(<Metric>)`, e.g. in validation): the cache is dropped.
            pl_module._metric_attributes = None
            for key, metric in metrics.items():
                if metric.update_called:
                    bar = key == "mmpareto/loss_epoch"
                    self._log(pl_module.log, key, metric, on_step=False, on_epoch=True, prog_bar=bar)
                    logged[key] = metric
        elif self._metrics is not None:
            self._metrics.reset()
        self.bookkeeping.step_schedulers(
            trainer, pl_module, "epoch", plateau=None, index=trainer.current_epoch + 1, extra=logged
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training or (trainer.state.fn == "fit" and not trainer.sanity_checking):
            self.bookkeeping.step_schedulers(
                trainer, pl_module, "step", plateau=True, index=trainer.fit_loop.epoch_loop.batch_idx + 1
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": self._totals.state(),
            "optimizer_steps": self.bookkeeping.optimizer_steps,
            "skipped_steps": self.bookkeeping.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bookkeeping.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.bookkeeping.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._totals.load(state_dict.get("totals", {}), self.bookkeeping.skipped_steps)

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        """Cumulative ``conflicts`` and ``stationary`` counts per encoder (reads the device)."""
        return self.state_dict()["totals"]
