"""CUDA-only checks (16-bit AMP with a real GradScaler). Skipped where no GPU is present (CI)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from _models import MultiModalNet, make_loader, trainer_kwargs
from test_distributed_precision import ScaledRecordingNet
from test_end_to_end import _assert_moved_by, _expected_deltas

from mmpareto_lightning import MMParetoCallback

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_16_mixed_on_cuda_matches_direct_gradients() -> None:
    torch.manual_seed(3)
    model = ScaledRecordingNet(n=2, lr=1.0)
    trainer = pl.Trainer(
        max_steps=1,
        precision="16-mixed",
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(accelerator="cuda"),
    )
    before = copy.deepcopy(model).cuda()
    trainer.fit(model, make_loader(2))
    model.cpu(), before.cpu()
    model.recorded = {k: [g.cpu() for g in v] for k, v in model.recorded.items()}
    _assert_moved_by(
        model, before, _expected_deltas(model, "mmpareto", "per_tensor"), rtol=1e-3, atol_rel=1e-4
    )


def test_16_mixed_on_cuda_skips_an_infinite_step() -> None:
    class InfAtSecond(MultiModalNet):
        def training_step(self, batch, batch_idx):
            losses = self.losses(batch)
            if batch_idx == 1:
                losses["audio"] = losses["audio"] * float("inf")
            return losses

    snapshots = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    trainer = pl.Trainer(
        max_steps=3,
        precision="16-mixed",
        callbacks=[MMParetoCallback(), Snapshot()],
        **trainer_kwargs(accelerator="cuda"),
    )
    trainer.fit(InfAtSecond(n=2), make_loader(2, size=48))
    for name, value in snapshots[0].items():
        assert torch.equal(snapshots[1][name], value), name
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16
