"""``MMParetoModule``: the LightningModule mixin whose ``training_step`` returns named losses.

Subclasses name their encoders in :meth:`MMParetoModule.mmpareto_encoders` and return
``{"multimodal": ..., "<encoder>": ..., ...}`` from ``training_step`` without calling backward. The mixin
switches manual optimization on and hands the losses to the driver that the
:class:`~mmpareto_lightning.MMParetoCallback` attaches for the fit, which computes the per-objective
gradients, applies the rule and steps the optimizer.

The module holds no reference to the callback: drivers live in a weak registry, so a module can be
deep-copied (EMA, weight averaging) or pickled at any point of a fit, and a fit without the callback is
refused even after a fit with it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from mmpareto_lightning.lightning.stepping import take_plateau_keys

__all__ = ["MMParetoModule", "TrainingStepDriver", "attach_driver", "detach_driver", "wrap_training_step"]


class TrainingStepDriver(Protocol):
    """What runs the MMPareto update around a module's ``training_step`` (the callback)."""

    in_step: bool

    def run_training_step(
        self, module: MMParetoModule, step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...

    def check_log_key(self, name: str) -> None: ...


_DRIVERS: weakref.WeakKeyDictionary[MMParetoModule, TrainingStepDriver] = weakref.WeakKeyDictionary()


def attach_driver(module: MMParetoModule, driver: TrainingStepDriver) -> None:
    """Route ``module``'s training steps through ``driver`` (for the duration of a fit)."""
    _DRIVERS[module] = driver


def detach_driver(module: MMParetoModule, driver: TrainingStepDriver) -> None:
    """Undo :func:`attach_driver` (if ``driver`` is still the attached one)."""
    if _DRIVERS.get(module) is driver:
        del _DRIVERS[module]


def _in_training_loop(module: pl.LightningModule) -> bool:
    trainer = module._trainer
    return trainer is not None and trainer.state.stage == RunningStage.TRAINING


def wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """The mixin's wrapper around a user's ``training_step`` (idempotent)."""
    if getattr(step, "_mmpareto_wrapped", False):
        return step

    @functools.wraps(step)
    def training_step(self: MMParetoModule, *args: Any, **kwargs: Any) -> Any:
        driver = _DRIVERS.get(self)
        # Outside the training loop (validation_step or test_step reusing the loss code, a plain call)
        # the losses are returned as they are; so is a subclass calling super().training_step().
        if not _in_training_loop(self) or (driver is not None and driver.in_step):
            return step(self, *args, **kwargs)
        if driver is None:
            raise MisconfigurationException(
                f"{type(self).__name__} is an MMParetoModule, but no MMParetoCallback is attached: add it "
                "with `Trainer(callbacks=[MMParetoCallback()])`."
            )
        return driver.run_training_step(self, step, args, kwargs)

    training_step._mmpareto_wrapped = True  # type: ignore[attr-defined]
    return training_step


def _wrap_configure_optimizers(configure: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(configure, "_mmpareto_wrapped", False):
        return configure

    @functools.wraps(configure)
    def configure_optimizers(self: MMParetoModule, *args: Any, **kwargs: Any) -> Any:
        # scheduler id -> its monitor / strict / reduce_on_plateau, which manual optimization drops.
        self._mmpareto_scheduler_keys = {}
        return take_plateau_keys(configure(self, *args, **kwargs), self._mmpareto_scheduler_keys)

    configure_optimizers._mmpareto_wrapped = True  # type: ignore[attr-defined]
    return configure_optimizers


def ensure_wrapped(cls: type) -> None:
    """Wrap the ``training_step`` and ``configure_optimizers`` that ``cls`` resolves to, wherever they live.

    Called when a subclass is created (the method may come from the class itself, from a base class
    that is not an MMParetoModule, or from a mixin) and again when a fit starts (the method may have
    been assigned to the class after its creation).
    """
    step = getattr(cls, "training_step", None)
    if step is not None and step is not pl.LightningModule.training_step:
        cls.training_step = wrap_training_step(step)  # type: ignore[attr-defined]
    configure = getattr(cls, "configure_optimizers", None)
    if configure is not None and configure is not pl.LightningModule.configure_optimizers:
        cls.configure_optimizers = _wrap_configure_optimizers(configure)  # type: ignore[attr-defined]


class MMParetoModule(pl.LightningModule):
    """A LightningModule trained with MMPareto.

    Implement :meth:`mmpareto_encoders` and a ``training_step`` that returns a dict of scalar losses: the
    multimodal loss under ``"multimodal"`` and each encoder's unimodal loss under the encoder's name
    (extra named losses are allowed; ``"loss"`` is reserved). Do not call backward or step the
    optimizer: the :class:`~mmpareto_lightning.MMParetoCallback` does it, and must be in the Trainer's
    callbacks. ``training_step`` may also return ``None`` to skip a batch, and ``validation_step`` /
    ``test_step`` may call it to reuse the loss code (it then returns the plain losses).

    Example::

        class AVClassifier(MMParetoModule):
            def __init__(self):
                super().__init__()                      # switches manual optimization on
                self.audio_net, self.visual_net = AudioNet(), VisualNet()
                self.head = nn.Linear(1024, 6)
                self.head_audio, self.head_visual = nn.Linear(512, 6), nn.Linear(512, 6)

            def mmpareto_encoders(self):
                return {"audio": self.audio_net, "visual": self.visual_net}

            def training_step(self, batch, batch_idx):
                audio, visual, y = batch
                za, zv = self.audio_net(audio), self.visual_net(visual)
                return {
                    "multimodal": F.cross_entropy(self.head(torch.cat([za, zv], 1)), y),
                    "audio": F.cross_entropy(self.head_audio(za), y),
                    "visual": F.cross_entropy(self.head_visual(zv), y),
                }

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)

        pl.Trainer(callbacks=[MMParetoCallback()]).fit(AVClassifier(), datamodule)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning validates the optimization mode before any callback runs, so it is set here.
        self.automatic_optimization = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ensure_wrapped(cls)

    @property  # type: ignore[override]
    def trainer(self) -> pl.Trainer:
        return pl.LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        pl.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        if trainer is None:
            return
        # Lightning rejects Trainer-level accumulation and clipping in manual optimization before any
        # callback hook runs; the module is attached to the Trainer just before that check, so this is
        # where the callback takes them over.
        for callback in getattr(trainer, "callbacks", []):
            adopt = getattr(callback, "adopt_trainer_settings", None)
            if adopt is not None:
                adopt(trainer)

    def manual_backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        driver = _DRIVERS.get(self)
        if driver is not None and driver.in_step:
            raise MisconfigurationException(
                f"{type(self).__name__}.training_step called `manual_backward`. With MMPareto, return the "
                "named losses instead: MMParetoCallback runs the backward (a backward of your own would "
                "add a gradient the rule never sees)."
            )
        super().manual_backward(loss, *args, **kwargs)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        driver = _DRIVERS.get(self)
        if driver is not None:
            driver.check_log_key(name)  # the plugin's own keys are refused to the user's code
        super().log(name, value, *args, **kwargs)

    def mmpareto_encoders(self) -> Mapping[str, nn.Module]:
        """Name -> encoder submodule that receives the MMPareto update (a dict or an ``nn.ModuleDict``).

        The unimodal loss of an encoder is the ``training_step`` loss with the same name. Parameters
        outside these modules (fusion and unimodal heads) get the plain gradient of the summed losses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `mmpareto_encoders()` returning a dict of encoder name "
            "-> encoder submodule, e.g. {'audio': self.audio_net, 'visual': self.visual_net}."
        )
