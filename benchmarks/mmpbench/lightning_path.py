"""The training step through a real ``Trainer``: Lightning uniform vs our callback path, and its parts.

A step is the interval between consecutive ``on_train_batch_start`` calls of one Trainer: everything
its loop does per batch (the training step, backward, optimizer step, logging, progress tracking,
fetching the next batch). Two schedules put the variants side by side:

* ``steps``: every variant runs its own ``Trainer.fit`` in its own thread, and a baton lets exactly one
  of them run at a time: each thread stops at every ``on_train_batch_start`` and waits for its turn, so
  the variants are interleaved step by step like the plain steps, and a step of every variant is timed
  within milliseconds of the others (per-round ratios). Right for CUDA and for one CPU thread.
* ``rounds``: everything runs in the calling thread; each round runs one ``Trainer.fit`` per variant
  (a fresh copy of the network, warm-up steps, then the timed steps), the order rotating round by
  round, and the ratios compare the rounds' medians. With several CPU threads this is the fair one: each
  Python thread that calls into ATen has its own OpenMP team, and in the ``steps`` schedule the teams
  of the waiting Trainers still spin on the cores the running one needs.

Variants (rows of the "Through Lightning" table):

* ``uniform``: a plain ``LightningModule``, automatic optimization, one summed loss logged with
  ``self.log``: what a user's baseline costs.
* ``mmpareto``: ``MMParetoModule`` + ``MMParetoCallback()`` with default settings: what users get.
* ``no-finite-check``, ``no-logging``, ``bare-callback``: the same with ``skip_non_finite=False``, with
  ``log_on_step=False, log_on_epoch=False``, and with both: the cost of each part of the callback path.
* ``manual-engine``: no callback; a manual-optimization ``LightningModule`` whose ``training_step`` runs
  the engine's loop (``capture``, ``engine.backward(backward_fn=self.manual_backward)``, ``integrate``,
  ``opt.step()``) and logs the summed loss like ``uniform``: the floor of an MMPareto step through
  Lightning, so ``mmpareto`` minus ``manual-engine`` is what the callback adds.
* ``authors``: the re-created official step (:func:`~mmpbench.methods.authors_update`) in a
  manual-optimization module, every backward through ``manual_backward``, the summed loss logged.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .methods import authors_update
from .models import LABEL, MultiEncoderNet, make_optimizer
from .timing import Timing, now, sync


@dataclass(frozen=True)
class LightningVariant:
    """One row of the through-Lightning table.

    Attributes:
        label: the row's name in the report.
        module: ``"uniform"`` (automatic optimization), ``"callback"`` (``MMParetoModule`` +
            ``MMParetoCallback(**callback_kwargs)``), ``"manual-engine"`` (engine, no callback) or
            ``"authors"`` (the official step in manual optimization).
        plain: the plain-PyTorch method whose step time the "overhead" column subtracts.
        callback_kwargs: arguments of ``MMParetoCallback``.
    """

    label: str
    module: str
    plain: str
    callback_kwargs: Mapping[str, Any] = field(default_factory=dict)


_NO_LOGGING = {"log_on_step": False, "log_on_epoch": False}
LIGHTNING_VARIANTS: dict[str, LightningVariant] = {
    "uniform": LightningVariant("lightning uniform", "uniform", "uniform"),
    "mmpareto": LightningVariant("lightning mmpareto", "callback", "mmpareto"),
    "no-finite-check": LightningVariant(
        "lightning mmpareto, skip_non_finite=False", "callback", "mmpareto", {"skip_non_finite": False}
    ),
    "no-logging": LightningVariant(
        "lightning mmpareto, log_on_step/epoch=False", "callback", "mmpareto", _NO_LOGGING
    ),
    "bare-callback": LightningVariant(
        "lightning mmpareto, both off", "callback", "mmpareto", {"skip_non_finite": False, **_NO_LOGGING}
    ),
    "manual-engine": LightningVariant("lightning manual engine, no callback", "manual-engine", "mmpareto"),
    "authors": LightningVariant("lightning authors", "authors", "authors"),
    # The cheap baseline through the callback: the one-argument ablation switch with diagnostics off
    # runs one ordinary backward, timed side by side with "lightning uniform".
    "callback-uniform": LightningVariant(
        "lightning callback, strategy=uniform, diagnostics=False",
        "callback",
        "uniform",
        {"strategy": "uniform", "diagnostics": False},
    ),
}
DEFAULT_LIGHTNING_VARIANTS = (
    "uniform",
    "mmpareto",
    "no-finite-check",
    "no-logging",
    "bare-callback",
    "manual-engine",
    "authors",
    "callback-uniform",
)


def _lightning_modules(net: MultiEncoderNet, variant: LightningVariant) -> tuple[Any, list[Any]]:
    """The LightningModule and the extra callbacks of one variant, around its own copy of ``net``."""
    import lightning.pytorch as pl

    from mmpareto_lightning import MMParetoCallback, MMParetoEngine, MMParetoModule

    class LitUniform(pl.LightningModule):
        def __init__(self, net: MultiEncoderNet) -> None:
            super().__init__()
            self.net = net

        def training_step(self, b: Mapping[str, Tensor], batch_idx: int) -> Tensor:
            losses = self.net.losses(b)
            total = sum(losses.values())
            self.log("train/loss", total.detach(), batch_size=b[LABEL].shape[0])  # type: ignore[union-attr]
            return total  # type: ignore[return-value]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self)

    class LitMMPareto(MMParetoModule):
        def __init__(self, net: MultiEncoderNet) -> None:
            super().__init__()
            self.net = net

        def mmpareto_encoders(self) -> dict[str, nn.Module]:
            return dict(self.net.encoders.items())

        def training_step(self, b: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
            return self.net.losses(b)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self)

    class LitManualEngine(pl.LightningModule):
        def __init__(self, net: MultiEncoderNet) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = net
            self.engine = MMParetoEngine(dict(net.encoders.items()))

        def training_step(self, b: Mapping[str, Tensor], batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            with self.engine.capture():
                losses = self.net.losses(b)
            self.engine.backward(losses, backward_fn=self.manual_backward)
            self.engine.integrate()
            opt.step()  # type: ignore[union-attr]
            total = torch.stack([v.detach() for v in losses.values()]).sum()
            self.log("train/loss", total, batch_size=b[LABEL].shape[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self)

    class LitAuthors(pl.LightningModule):
        def __init__(self, net: MultiEncoderNet) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = net
            self.encoder_params = net.encoder_params()

        def training_step(self, b: Mapping[str, Tensor], batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()  # type: ignore[union-attr]
            losses = self.net.losses(b)
            authors_update(self.encoder_params, losses, opt, backward=self.manual_backward)
            total = torch.stack([v.detach() for v in losses.values()]).sum()
            self.log("train/loss", total, batch_size=b[LABEL].shape[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self)

    if variant.module == "uniform":
        return LitUniform(net), []
    if variant.module == "authors":
        return LitAuthors(net), []
    if variant.module == "manual-engine":
        return LitManualEngine(net), []
    if variant.module == "callback":
        return LitMMPareto(net), [MMParetoCallback(**variant.callback_kwargs)]
    raise ValueError(f"Unknown Lightning module kind {variant.module!r}.")


class _StepClock:
    """A Lightning callback that stamps every ``on_train_batch_start`` (the device synchronised first)."""

    def __init__(self, device: torch.device) -> None:
        import lightning.pytorch as pl

        self.device = device
        self.stamps: list[float] = []
        clock = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                sync(clock.device)
                clock.stamps.append(now())

        self.callback = Callback()

    def steps_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


class _Aborted(RuntimeError):
    """Raised inside a Trainer to end its fit when another variant failed."""


class _Baton:
    """Lets one Trainer thread run one step at a time, and times the step (a Lightning callback)."""

    def __init__(self, device: torch.device) -> None:
        import lightning.pytorch as pl

        self.device = device
        self.go = threading.Event()
        self.done = threading.Event()
        self.abort = False
        self.finished = False
        self.error: BaseException | None = None
        self.times_ms: list[float] = []
        self._start: float | None = None
        baton = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                baton.reached_batch_start()

        self.callback = Callback()

    def reached_batch_start(self) -> None:
        sync(self.device)
        end = now()
        if self._start is not None:
            self.times_ms.append((end - self._start) * 1e3)
        self.done.set()  # hands the baton back (the first time: "set up, ready")
        self.go.wait()
        self.go.clear()
        if self.abort:
            raise _Aborted("another variant failed")
        sync(self.device)
        self._start = now()

    def run(self, trainer: Any, module: Any, loader: Any) -> None:
        try:
            trainer.fit(module, train_dataloaders=loader)
        except BaseException as err:  # handed to the coordinating thread, which re-raises it
            self.error = err
        finally:
            self.finished = True
            self.done.set()

    def turn(self, last: bool = False) -> None:
        """Let the thread run up to its next ``on_train_batch_start`` (``last``: to the end of its fit)."""
        if self.finished:
            raise RuntimeError("A Trainer of the through-Lightning benchmark stopped before its last step.")
        self.go.set()
        self.done.wait()
        self.done.clear()
        if self.error is not None:
            raise RuntimeError("A Trainer of the through-Lightning benchmark failed") from self.error
        if self.finished != last:
            raise RuntimeError("A Trainer of the through-Lightning benchmark ran another number of steps.")


def make_trainer(
    device: torch.device, batch: Mapping[str, Tensor], steps: int, callbacks: Sequence[Any]
) -> tuple[Any, Any]:
    """A quiet ``Trainer`` that runs ``steps`` training steps, and a loader repeating ``batch``."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    class Repeat(Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, index: int) -> Mapping[str, Tensor]:
            return batch

    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    return trainer, DataLoader(Repeat(), batch_size=None, shuffle=False, num_workers=0)


SCHEDULES = ("steps", "rounds")


def default_schedule(device: torch.device) -> str:
    """``rounds`` on a CPU with several threads (the Trainers' OpenMP teams would compete), else ``steps``."""
    return "rounds" if device.type == "cpu" and torch.get_num_threads() > 1 else "steps"


def time_lightning(
    base: MultiEncoderNet,
    batch: Mapping[str, Tensor],
    device: torch.device,
    iters: int,
    warmup: int = 2,
    variants: Sequence[str] = DEFAULT_LIGHTNING_VARIANTS,
    schedule: str = "steps",
    rounds: int = 3,
) -> dict[str, Timing]:
    """Per-step time of each variant through a real ``Trainer``, side by side (see the module docstring).

    Args:
        base: the initial network; every Trainer trains its own copy.
        batch: the fixed batch every step sees.
        device: where the Trainers run.
        iters: timed steps per variant (``rounds``: split evenly over the rounds, rounded up).
        warmup: untimed steps first (``rounds``: at the start of every round's fit); they also cover
            the first step's one-time graph checks and allocations.
        variants: keys of :data:`LIGHTNING_VARIANTS`.
        schedule: ``"steps"`` or ``"rounds"``.
        rounds: rounds of the ``rounds`` schedule.

    Returns:
        row label -> its timed steps.
    """
    if schedule == "rounds":
        return _time_in_rounds(base, batch, device, iters, warmup, variants, rounds)
    if schedule != "steps":
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {SCHEDULES}.")
    # One more step than is timed: the last on_train_batch_start closes the last timed step.
    steps = warmup + iters + 1
    batons: dict[str, _Baton] = {}
    threads: list[threading.Thread] = []
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for key in variants:
                variant = LIGHTNING_VARIANTS[key]
                module, callbacks = _lightning_modules(copy.deepcopy(base), variant)
                baton = _Baton(device)
                trainer, loader = make_trainer(device, batch, steps, [*callbacks, baton.callback])
                thread = threading.Thread(target=baton.run, args=(trainer, module, loader), daemon=True)
                batons[variant.label] = baton
                threads.append(thread)
                # Set-ups run one at a time: a thread starts and runs to its first batch, then waits.
                thread.start()
                baton.done.wait()
                baton.done.clear()
                if baton.error is not None:
                    raise RuntimeError(f"Trainer of {variant.label!r} failed") from baton.error
            labels = list(batons)
            for r in range(warmup + iters):
                shift = r % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    batons[label].turn()
            for baton in batons.values():  # the last, untimed step and the end of each fit
                baton.turn(last=True)
        finally:
            for baton in batons.values():
                baton.abort = True
                baton.go.set()
            for thread in threads:
                thread.join()
    return {label: Timing(label, b.times_ms[warmup : warmup + iters]) for label, b in batons.items()}


def _time_in_rounds(
    base: MultiEncoderNet,
    batch: Mapping[str, Tensor],
    device: torch.device,
    iters: int,
    warmup: int,
    variants: Sequence[str],
    rounds: int,
) -> dict[str, Timing]:
    """The ``rounds`` schedule: one fit per variant and round, all in the calling thread."""
    rounds = max(1, min(rounds, iters))
    per_round = -(-iters // rounds)
    labels = [LIGHTNING_VARIANTS[key].label for key in variants]
    times: dict[str, list[float]] = {label: [] for label in labels}
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            shift = r % len(variants)
            for key in [*variants[shift:], *variants[:shift]]:
                variant = LIGHTNING_VARIANTS[key]
                module, callbacks = _lightning_modules(copy.deepcopy(base), variant)
                clock = _StepClock(device)
                # One more step than is timed: the last on_train_batch_start closes the last timed step.
                trainer, loader = make_trainer(
                    device, batch, warmup + per_round + 1, [*callbacks, clock.callback]
                )
                try:
                    trainer.fit(module, train_dataloaders=loader)
                except Exception as err:
                    raise RuntimeError(f"Trainer of {variant.label!r} failed") from err
                steps = clock.steps_ms()[warmup:]
                if len(steps) != per_round:
                    raise RuntimeError(
                        f"The Trainer of {variant.label!r} ran {len(steps)} timed steps, not {per_round}."
                    )
                times[variant.label].extend(steps)
                del trainer, module, callbacks
                gc.collect()
    return {label: Timing(label, t, round_size=per_round) for label, t in times.items()}


def plain_method_of(label: str) -> str | None:
    """The plain method a through-Lightning row is compared with (``None`` for unknown labels)."""
    return next((v.plain for v in LIGHTNING_VARIANTS.values() if v.label == label), None)
