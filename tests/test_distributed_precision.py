"""DDP, mixed precision with a GradScaler, and mid-epoch resume give the single-device fp32 update."""

from __future__ import annotations

import copy
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _data_parallel import StepRecorder, check_recorded_fit
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
    # Rank r holds samples r, r + 2, ...: per step the ranks' micro-batches are the two interleaved halves
    # of the 2B consecutive samples one process would take, and every loss is a mean, so the mean of the
    # ranks' gradients is the gradient of the global batch. Every step is checked against the rule on
    # that mean, replayed from the recorded state with the bounds of _data_parallel (a whole fit against
    # a one-process fit has no round-off bound: a step's float32 difference changes the next gradients).
    steps, per_rank = 6, 8 // accumulate
    trainer = pl.Trainer(
        max_steps=steps,
        strategy=strategy,
        callbacks=[
            MMParetoCallback(accumulate_grad_batches=accumulate),
            SaveRankState(str(tmp_path)),
            StepRecorder(str(tmp_path)),
        ],
        **trainer_kwargs(devices=2, use_distributed_sampler=False),
    )
    trainer.fit(_ddp_model(), datamodule=InterleavedData(per_rank))

    data = make_data(2, size=96).tensors
    recorded = [torch.load(tmp_path / f"steps{r}.pt", weights_only=False) for r in range(2)]
    assert len(recorded[0]) == steps
    for s in range(steps):
        for r in range(2):
            window = recorded[r][s]["window"]
            assert len(window) == accumulate
            for b, entry in enumerate(window):
                first = (s * accumulate + b) * per_rank
                rows = r + 2 * torch.arange(first, first + per_rank)  # rows 16 s .. 16 s + 15 in all
                for got, want in zip(entry["batch"], data, strict=True):
                    assert torch.equal(got, want[rows])
    replayed = check_recorded_fit(
        str(tmp_path),
        _ddp_model,
        lambda rank, entry: lambda model: model.losses(entry["batch"]),
        momentum=0.9,
        lr=0.2,
        accumulate=accumulate,
    )
    decisions = [d for step in replayed for d in step.conflict.values()]
    assert all(robust for _, robust in decisions)  # so every step's conflict count was compared
    assert sum(conflict for conflict, _ in decisions) > 0  # the rule did more than sum
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["epoch_conflicts"] == rank1["epoch_conflicts"]


@pytest.fixture
def restored_environ():
    """os.environ as it was before the test: a one-device DDP fit leaves MASTER_ADDR, MASTER_PORT,
    NODE_RANK and LOCAL_RANK behind, and a later test that launches DDP as a script (its children inherit
    them) would take itself for a child and hang."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_ddp_static_graph_is_refused(restored_environ) -> None:
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
    model = ScaledRecordingNet(n=2, lr=1.0)
    before = copy.deepcopy(model)
    trainer = pl.Trainer(
        max_steps=1,
        plugins=[_fp16_plugin(init_scale=2.0**12)],
        callbacks=[MMParetoCallback(gradient_clip_val=0.01)],
        **trainer_kwargs(),
    )
    trainer.fit(model, make_loader(2))
    # The rule on the per-loss gradients as the scaler sees them (recorded on the step's graph, unscaled),
    # clipped as torch clips (ExpectedUpdate.clipped states its float32 norm's bound): clipping the scaled
    # gradients instead would leave an update 2**12 times too small.
    expected, coef = _expected_deltas(model, "mmpareto", "per_tensor").clipped(0.01)
    assert coef < 0.5  # clipping acts
    _assert_moved_by(model, before, expected)


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
