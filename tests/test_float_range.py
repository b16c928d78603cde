"""Through the Trainer, over the float32 range: large finite gradients train (no false "non-finite"
skip), tiny ones give true cosines, and an update beyond float32's range is skipped with a message that
says so."""

from __future__ import annotations

import copy
import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from _exact import assert_moved_by, expected_deltas
from _models import MultiModalNet, make_loader, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger

from mmpareto_lightning import MMParetoCallback


class ScaledLosses(MultiModalNet):
    """Every loss multiplied by ``scale`` (and the unimodal ones by ``unimodal_scale`` on top)."""

    def __init__(self, scale: float, unimodal_scale: float = 1.0, **kwargs) -> None:
        super().__init__(n=2, dropout=0.0, batchnorm=False, lr=1.0, **kwargs)
        self.scale, self.unimodal_scale = scale, unimodal_scale

    def losses(self, batch):
        losses = super().losses(batch)
        return {
            k: v * self.scale * (1.0 if k == "multimodal" else self.unimodal_scale) for k, v in losses.items()
        }

    def configure_optimizers(self):
        # lr scaled down with the loss: the step stays representable, the gradients do not.
        return torch.optim.SGD(self.parameters(), lr=1.0 / self.scale)


def _fit(model, steps=1, tmp_path=None, **callback_kwargs):
    logger = CSVLogger(tmp_path) if tmp_path is not None else False
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[MMParetoCallback(**callback_kwargs)], **trainer_kwargs(logger=logger)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader(2))
    return trainer, [str(w.message) for w in caught if "MMPareto" in str(w.message)]


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_large_finite_gradients_train(scale: float) -> None:
    # Losses scaled by 1e20 (largest gradient entry ~1e19-1e20, finite): every step used to be skipped as
    # "not finite", because float32 dot products overflowed. Now: no skip, and the update is exact.
    torch.manual_seed(0)
    model = ScaledLosses(scale)
    before = copy.deepcopy(model)
    batch = next(iter(make_loader(2)))
    expected = expected_deltas(
        model, lambda m: m.mmpareto_encoders(), lambda m: m.losses(batch), lr=1.0 / scale
    )
    trainer, messages = _fit(model)
    callback = next(c for c in trainer.callbacks if isinstance(c, MMParetoCallback))
    assert callback.skipped_steps == 0 and not messages
    assert_moved_by(model, before, expected)


def test_tiny_unimodal_gradients_log_true_cosines(tmp_path) -> None:
    # A unimodal loss 1e-30 the size of the multimodal one (a collapsed head): cos beta stays in [-1, 1]
    # (it logged -1.28, then +-inf) and the step is exact.
    torch.manual_seed(1)
    model = ScaledLosses(1.0, unimodal_scale=1e-30)
    _fit(model, steps=3, tmp_path=tmp_path)
    with open(next(tmp_path.rglob("metrics.csv")), newline="") as handle:
        rows = list(csv.DictReader(handle))
    values = [float(r[k]) for r in rows for k in r if k.endswith("cos_beta_step") and r[k]]
    assert values and all(-1.0 <= v <= 1.0 for v in values)


def test_an_update_beyond_float32_is_skipped_and_said_so() -> None:
    # Gradients of ~1e35 and gamma = 1e4: finite, but gamma * (g_m + g_u) does not fit in float32. The
    # step is skipped (parameters untouched) and the warning says why, instead of calling the gradients
    # non-finite.
    torch.manual_seed(2)
    model = ScaledLosses(1e36)
    before = copy.deepcopy(model)
    trainer, messages = _fit(model, gamma=1e4)
    callback = next(c for c in trainer.callbacks if isinstance(c, MMParetoCallback))
    assert callback.skipped_steps == 1
    assert messages and "does not fit" in messages[0] and "loss(es) none" in messages[0]
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q)
