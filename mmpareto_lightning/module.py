"""``MMParetoModule``: the LightningModule mixin whose ``training_step`` returns named losses.

Subclasses name their encoders in :meth:`MMParetoModule.mmpareto_encoders` and return
``{"multimodal": ..., "<encoder>": ..., ...}`` from ``training_step`` without calling backward. The mixin
switches manual optimization on and hands the losses to :class:`~mmpareto_lightning.MMParetoCallback`,
which computes the per-objective gradients, applies the rule and steps the optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

if TYPE_CHECKING:
    from mmpareto_lightning.callback import MMParetoCallback

__all__ = ["MMParetoModule"]


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: MMParetoModule, *args: Any, **kwargs: Any) -> Any:
        # A subclass calling super().training_step() must not run the update twice.
        if self._mmpareto_in_step:
            return step(self, *args, **kwargs)
        callback = self._mmpareto_callback
        if callback is None:
            raise MisconfigurationException(
                f"{type(self).__name__} is an MMParetoModule, but no MMParetoCallback is attached: add it "
                "with `Trainer(callbacks=[MMParetoCallback()])`."
            )
        self._mmpareto_in_step = True
        try:
            with callback.capture():
                losses = step(self, *args, **kwargs)
            return callback.optimize(self, losses)
        finally:
            self._mmpareto_in_step = False
        # scheduler id -> its monitor / strict / reduce_on_plateau, which manual optimization drops.
        self._mmpareto_scheduler_keys: dict[int, dict[str, Any]] = {}

    training_step._mmpareto_wrapped = True  # type: ignore[attr-defined]
    return training_step


_PLATEAU_KEYS = ("monitor", "strict", "reduce_on_plateau")


def _take_plateau_keys(conf: Any, found: dict[int, dict[str, Any]]) -> Any:
    """Strip the ReduceLROnPlateau keys from an optimizer configuration, recording them per scheduler.

    Lightning drops (with a warning) ``monitor``, ``strict`` and ``reduce_on_plateau`` in manual
    optimization; MMPareto steps the schedulers itself and needs them.
    """
    if isinstance(conf, (list, tuple)):
        return type(conf)(_take_plateau_keys(c, found) for c in conf)
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
        conf["lr_scheduler"] = _take_plateau_keys(scheduler, found)
    return conf


def _wrap_configure_optimizers(configure: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(configure)
    def configure_optimizers(self: MMParetoModule, *args: Any, **kwargs: Any) -> Any:
        self._mmpareto_scheduler_keys = {}
        return _take_plateau_keys(configure(self, *args, **kwargs), self._mmpareto_scheduler_keys)

    configure_optimizers._mmpareto_wrapped = True  # type: ignore[attr-defined]
    return configure_optimizers


class MMParetoModule(pl.LightningModule):
    """A LightningModule trained with MMPareto.

    Implement :meth:`mmpareto_encoders` and a ``training_step`` that returns a dict of scalar losses: the
    multimodal loss under ``"multimodal"`` and each encoder's unimodal loss under the encoder's name
    (extra named losses are allowed). Do not call backward or step the optimizer: the
    :class:`~mmpareto_lightning.MMParetoCallback` does it, and must be in the Trainer's callbacks.

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
        self._mmpareto_callback: MMParetoCallback | None = None
        self._mmpareto_in_step = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_mmpareto_wrapped", False):
            cls.training_step = _wrap_training_step(step)  # type: ignore[method-assign]
        configure = cls.__dict__.get("configure_optimizers")
        if configure is not None and not getattr(configure, "_mmpareto_wrapped", False):
            cls.configure_optimizers = _wrap_configure_optimizers(configure)  # type: ignore[method-assign]

    def mmpareto_encoders(self) -> Mapping[str, nn.Module]:
        """Name -> encoder submodule that receives the MMPareto update.

        The unimodal loss of an encoder is the ``training_step`` loss with the same name. Parameters
        outside these modules (fusion and unimodal heads) get the plain gradient of the summed losses.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `mmpareto_encoders()` returning a dict of encoder name "
            "-> encoder submodule, e.g. {'audio': self.audio_net, 'visual': self.visual_net}."
        )
