"""DDP, mixed precision with a GradScaler, and mid-epoch resume give the single-device fp32 update."""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _models import MultiModalNet, ResumableLoader, make_data, make_loader, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_end_to_end import RecordingNet, _assert_moved_by, _expected_deltas
from torch.utils.data import DataLoader, DistributedSampler

from mmpareto_lightning import MMParetoCallback


class SaveRankState(pl.Callback):
    """Each rank writes its parameters, optimizer state and MMPareto counters to ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, MMParetoCallback))
        state = {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "momentum": [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values()],
            "totals": callback.totals,
            "epoch_conflicts": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("conflicts_epoch")
            },
        }
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


class InterleavedData(pl.LightningDataModule):
    """Rank r of w gets samples r, r + w, ... in order, so w ranks with batch B see, per step, the same 2B
    consecutive samples as one process with batch wB."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = make_data(2, size=96)
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def _ddp_model() -> MultiModalNet:
    # No BatchNorm (per-rank statistics differ from full-batch ones) and no dropout (per-rank masks).
    torch.manual_seed(0)
    return MultiModalNet(n=2, lr=0.2, momentum=0.9, dropout=0.0, batchnorm=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "accumulate"),
    [("ddp_spawn", 1), ("ddp_spawn_find_unused_parameters_true", 1), ("ddp_spawn", 2)],
)
def test_ddp_two_processes_equal_one_process_with_the_global_batch(
    tmp_path, strategy: str, accumulate: int
) -> None:
    steps, per_rank = 6, 8 // accumulate
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    trainer = pl.Trainer(
        max_steps=steps,
        strategy=strategy,
        callbacks=[MMParetoCallback(accumulate_grad_batches=accumulate), SaveRankState(str(ddp_dir))],
        **trainer_kwargs(devices=2, use_distributed_sampler=False),
    )
    trainer.fit(_ddp_model(), datamodule=InterleavedData(per_rank))

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[MMParetoCallback(), SaveRankState(str(single_dir))],
        **trainer_kwargs(use_distributed_sampler=False),
    )
    # With accumulation, each rank's micro-batches of B/2 still cover the same 2B samples per step.
    trainer.fit(_ddp_model(), datamodule=InterleavedData(2 * per_rank * accumulate))

    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    single = torch.load(single_dir / "rank0.pt")
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(value, single["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(rank0["momentum"], rank1["momentum"], strict=True):
        assert torch.equal(a, b)
    # Decisions are taken on globally averaged gradients: every rank counts the global conflicts.
    assert rank0["totals"] == rank1["totals"] == single["totals"]
    assert rank0["epoch_conflicts"] == rank1["epoch_conflicts"]
    assert sum(v["conflicts"] for v in single["totals"].values()) > 0


def test_ddp_static_graph_is_refused() -> None:
    trainer = pl.Trainer(
        max_steps=1,
        strategy=DDPStrategy(static_graph=True, process_group_backend="gloo"),
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(),
    )
    with pytest.raises(MisconfigurationException, match="static_graph=True"):
        trainer.fit(_ddp_model(), make_loader(2))


def _fp16_plugin(init_scale: float = 2.0**8) -> MixedPrecision:
    # CPU autocast in float16 plus a real GradScaler: Lightning's 16-mixed code path without a GPU
    # ("16-mixed" on CPU would silently become bf16 without a scaler).
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


class ScaledRecordingNet(RecordingNet):
    """Records per-loss gradients of the *scaled* losses, unscaled, as the scaler sees them."""

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        scale = self.trainer.precision_plugin.scaler.get_scale()
        params = list(self.parameters())
        self.recorded = {}
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss * scale, params, retain_graph=True, allow_unused=True)
            self.recorded[name] = [
                torch.zeros_like(p) if g is None else g.detach() / scale
                for p, g in zip(params, grads, strict=True)
            ]
        return losses


def test_16_mixed_with_grad_scaler_matches_direct_gradients() -> None:
    torch.manual_seed(3)
    model = ScaledRecordingNet(n=2, lr=1.0)
    before = copy.deepcopy(model)
    plugin = _fp16_plugin()
    trainer = pl.Trainer(max_steps=1, plugins=[plugin], callbacks=[MMParetoCallback()], **trainer_kwargs())
    trainer.fit(model, make_loader(2))
    expected = _expected_deltas(model, "mmpareto", "per_tensor")
    _assert_moved_by(model, before, expected)
    assert plugin.scaler.get_scale() == 2.0**8  # finite step: no back-off


class InfOnce(MultiModalNet):
    """The visual loss is infinite on the second batch."""

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        if batch_idx == 1:
            losses["visual"] = losses["visual"] * float("inf")
        return losses


class ParameterSnapshots(pl.Callback):
    """Keeps a copy of every parameter after each training batch."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def test_16_mixed_skips_the_step_on_an_infinite_loss_like_the_scaler_does(recwarn) -> None:
    torch.manual_seed(0)
    model = InfOnce(n=2)
    record = ParameterSnapshots()
    plugin = _fp16_plugin()
    trainer = pl.Trainer(
        max_steps=3, plugins=[plugin], callbacks=[MMParetoCallback(), record], **trainer_kwargs()
    )
    trainer.fit(model, make_loader(2, size=48))
    snapshots = record.snapshots
    for name, value in snapshots[0].items():
        assert torch.equal(snapshots[1][name], value), f"{name} moved on the skipped step"
        assert not torch.equal(snapshots[2][name], value) or "bias" in name
    assert plugin.scaler.get_scale() == 2.0**7  # the scaler saw the inf once and backed off
    assert not [w for w in recwarn if "MMPareto: non-finite" in str(w.message)]  # the scaler handles it


def test_clipping_under_a_grad_scaler_acts_on_unscaled_gradients() -> None:
    torch.manual_seed(0)
    model = MultiModalNet(n=2, lr=1.0)
    before = copy.deepcopy(model)
    trainer = pl.Trainer(
        max_steps=1,
        plugins=[_fp16_plugin(init_scale=2.0**12)],
        callbacks=[MMParetoCallback(gradient_clip_val=0.01)],
        **trainer_kwargs(),
    )
    trainer.fit(model, make_loader(2))
    delta = torch.cat(
        [(p - q).detach().reshape(-1) for p, q in zip(model.parameters(), before.parameters(), strict=True)]
    )
    assert float(delta.norm()) == pytest.approx(0.01, rel=1e-3)


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path) -> None:
    def run(max_steps: int, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = MultiModalNet(n=2, momentum=0.9, dropout=0.0)
        callback = MMParetoCallback()
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=[callback, *callbacks],
            **trainer_kwargs(enable_checkpointing=bool(callbacks)),
        )
        trainer.fit(model, ResumableLoader(make_data(2, size=96), batch_size=16), ckpt_path=ckpt_path)
        return model, trainer, callback

    # 6 batches per epoch; stop after 3 (mid-epoch), resume to 9 (into the second epoch).
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    run(3, callbacks=[checkpoint])
    (ckpt,) = list(tmp_path.glob("*.ckpt"))
    resumed, resumed_trainer, resumed_cb = run(9, ckpt_path=ckpt)
    straight, straight_trainer, straight_cb = run(9)
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name, a in resumed.state_dict().items():
        assert torch.equal(a, straight.state_dict()[name]), name  # BatchNorm statistics too
    resumed_state = resumed_trainer.optimizers[0].state_dict()["state"]
    straight_state = straight_trainer.optimizers[0].state_dict()["state"]
    for key, value in straight_state.items():
        assert torch.equal(resumed_state[key]["momentum_buffer"], value["momentum_buffer"])
    assert resumed_cb.totals == straight_cb.totals
    assert resumed_cb.optimizer_steps == straight_cb.optimizer_steps == 9
    assert np.sum([v["conflicts"] for v in straight_cb.totals.values()]) > 0
