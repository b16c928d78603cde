"""What the callback adds around the rule: accumulation, clipping, schedulers, metrics, checkpoints."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _models import MultiModalNet, make_loader, trainer_kwargs
from _reference import reference_rule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_end_to_end import RecordingNet

from mmpareto_lightning import MMParetoCallback


class AccumulatingRecorder(RecordingNet):
    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        self.history = [*getattr(self, "history", []), self.recorded]
        return losses


def test_accumulation_sums_per_loss_gradients_before_the_rule() -> None:
    torch.manual_seed(4)
    model = AccumulatingRecorder(n=2, lr=1.0)
    before = copy.deepcopy(model)
    callback = MMParetoCallback(accumulate_grad_batches=2)
    trainer = pl.Trainer(max_steps=1, callbacks=[callback], **trainer_kwargs())
    trainer.fit(model, make_loader(2, size=64, batch_size=16))
    assert len(model.history) == 2 and trainer.global_step == 1
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    mean = {
        n: [sum(h[n][i] for h in model.history) / 2 for i in range(len(params))] for n in model.history[0]
    }
    for name, encoder in model.mmpareto_encoders().items():
        enc = list(encoder.parameters())
        per_objective = [[mean[o][index[id(p)]] for p in enc] for o in ("multimodal", name)]
        expected, _ = reference_rule(per_objective)
        old = dict(before.named_parameters())
        for (pname, p), h in zip(encoder.named_parameters(), expected, strict=True):
            delta = (p.detach() - old[f"encoders.{name}.{pname}"].detach()).double().numpy().reshape(-1)
            floor = 4 * np.finfo(np.float32).eps * float(p.detach().abs().max())
            np.testing.assert_allclose(delta, -h, rtol=1e-5, atol=2e-6 * np.abs(h).max() + floor)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_acts_on_the_integrated_gradient(algorithm: str) -> None:
    torch.manual_seed(0)
    model = MultiModalNet(n=2, lr=1.0)
    before = copy.deepcopy(model)
    callback = MMParetoCallback(gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
    pl.Trainer(max_steps=1, callbacks=[callback], **trainer_kwargs()).fit(model, make_loader(2))
    deltas = [
        (p - q).detach().reshape(-1) for p, q in zip(model.parameters(), before.parameters(), strict=True)
    ]
    if algorithm == "norm":
        assert float(torch.cat(deltas).norm()) == pytest.approx(0.01, rel=1e-3)
    else:
        assert float(torch.cat(deltas).abs().max()) == pytest.approx(0.01, rel=1e-3)


class Scheduled(MultiModalNet):
    def __init__(self, interval: str, frequency: int = 1):
        super().__init__(n=2, lr=1.0)
        self.interval, self.frequency = interval, frequency

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": self.interval, "frequency": self.frequency},
        }


@pytest.mark.parametrize(
    ("interval", "frequency", "expected"), [("step", 1, 0.5**6), ("step", 2, 0.5**3), ("epoch", 1, 0.5**3)]
)
def test_lr_schedulers_step_as_in_automatic_optimization(interval, frequency, expected) -> None:
    model = Scheduled(interval, frequency)
    trainer = pl.Trainer(max_epochs=3, callbacks=[MMParetoCallback()], **trainer_kwargs())
    trainer.fit(model, make_loader(2, size=32, batch_size=16))  # 2 batches per epoch
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def test_metrics_reach_the_logger(tmp_path) -> None:
    torch.manual_seed(0)
    callback = MMParetoCallback()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback], **trainer_kwargs(logger=CSVLogger(tmp_path, name="run"))
    )
    trainer.fit(MultiModalNet(n=3), make_loader(3, size=64, batch_size=16))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for enc in ("audio", "visual", "text"):
        for key in ("cos_beta", "alpha_multimodal", "alpha_unimodal", "rescale", "conflicts", "stationary"):
            assert f"mmpareto/{enc}/{key}_step" in columns and f"mmpareto/{enc}/{key}_epoch" in columns
        steps = [r for r in rows if r[f"mmpareto/{enc}/cos_beta_step"]]
        assert len(steps) == 8
        cos = [float(r[f"mmpareto/{enc}/cos_beta_step"]) for r in steps]
        assert all(-1 <= c <= 1 for c in cos)
        conflicts = [float(r[f"mmpareto/{enc}/conflicts_step"]) for r in steps]
        # A step is a conflict exactly when cos beta <= 0 (two objectives per encoder).
        assert conflicts == [float(c <= 0) for c in cos]
        for r in steps:
            am, au = (
                float(r[f"mmpareto/{enc}/alpha_multimodal_step"]),
                float(r[f"mmpareto/{enc}/alpha_unimodal_step"]),
            )
            assert am + au == pytest.approx(1.0, abs=1e-6)
        total = float(steps[-1][f"mmpareto/{enc}/conflicts_total"])
        assert total == sum(conflicts) == callback.totals[enc]["conflicts"]
        epochs = [
            float(r[f"mmpareto/{enc}/conflicts_epoch"])
            for r in rows
            if r.get(f"mmpareto/{enc}/conflicts_epoch")
        ]
        assert sum(epochs) == total
        # Epoch means (folded from running sums into torchmetrics) equal the mean of the step values.
        for epoch in ("0", "1"):
            step_cos = [float(r[f"mmpareto/{enc}/cos_beta_step"]) for r in steps if r["epoch"] == epoch]
            epoch_row = next(
                r for r in rows if r.get(f"mmpareto/{enc}/cos_beta_epoch") and r["epoch"] == epoch
            )
            assert float(epoch_row[f"mmpareto/{enc}/cos_beta_epoch"]) == pytest.approx(
                np.mean(step_cos), abs=1e-6
            )
    loss_steps = [
        float(r["mmpareto/loss_audio_step"])
        for r in rows
        if r.get("mmpareto/loss_audio_step") and r["epoch"] == "0"
    ]
    loss_epoch = next(
        float(r["mmpareto/loss_audio_epoch"])
        for r in rows
        if r.get("mmpareto/loss_audio_epoch") and r["epoch"] == "0"
    )
    assert loss_epoch == pytest.approx(np.mean(loss_steps), rel=1e-5)
    assert "mmpareto/loss_multimodal_step" in columns and "mmpareto/loss_audio_epoch" in columns


def test_resume_keeps_the_cumulative_counters(tmp_path) -> None:
    torch.manual_seed(0)
    first = MMParetoCallback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    model = MultiModalNet(n=2, lr=0.5, dropout=0.0)
    pl.Trainer(max_steps=4, callbacks=[first, ckpt], **trainer_kwargs(enable_checkpointing=True)).fit(
        model, make_loader(2, size=64, batch_size=16)
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("MMParetoCallback"))
    assert state["totals"] == first.totals and state["optimizer_steps"] == 4

    resumed = MMParetoCallback()
    pl.Trainer(max_steps=8, callbacks=[resumed], **trainer_kwargs()).fit(
        MultiModalNet(n=2, lr=0.5, dropout=0.0),
        make_loader(2, size=64, batch_size=16),
        ckpt_path=tmp_path / "last.ckpt",
    )
    torch.manual_seed(0)
    straight = MMParetoCallback()
    pl.Trainer(max_steps=8, callbacks=[straight], **trainer_kwargs()).fit(
        MultiModalNet(n=2, lr=0.5, dropout=0.0), make_loader(2, size=64, batch_size=16)
    )
    assert resumed.totals == straight.totals
    assert resumed.optimizer_steps == straight.optimizer_steps == 8
    assert sum(v["conflicts"] for v in straight.totals.values()) > 0


class Plateau(MultiModalNet):
    def __init__(self, monitor: str):
        super().__init__(n=2, lr=0.05)
        self.monitor = monitor

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        # mode="max" on a decreasing loss: no improvement after the first epoch, so every epoch reduces.
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}


def test_reduce_on_plateau_sees_the_callbacks_epoch_metrics() -> None:
    torch.manual_seed(0)
    model = Plateau("mmpareto/loss_epoch")
    trainer = pl.Trainer(max_epochs=3, callbacks=[MMParetoCallback()], **trainer_kwargs())
    trainer.fit(model, make_loader(2, size=32, batch_size=16))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25)


def test_reduce_on_plateau_with_a_missing_monitor_is_refused() -> None:
    trainer = pl.Trainer(max_epochs=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="'val/nothing', which is not available"):
        trainer.fit(Plateau("val/nothing"), make_loader(2, size=32, batch_size=16))


class PlateauTopLevelMonitor(MultiModalNet):
    def __init__(self, monitor: str | None):
        super().__init__(n=2)
        self.monitor = monitor

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        conf = {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5)}
        return {**conf, "monitor": self.monitor} if self.monitor else conf


def test_reduce_on_plateau_monitor_at_the_top_level_and_missing() -> None:
    trainer = pl.Trainer(max_epochs=2, callbacks=[MMParetoCallback()], **trainer_kwargs())
    trainer.fit(PlateauTopLevelMonitor("mmpareto/loss_epoch"), make_loader(2, size=32, batch_size=16))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    # Stepped once per epoch with the monitored value (best starts at +inf in mode "min").
    assert scheduler.last_epoch == 2 and scheduler.best < float("inf")
    assert scheduler.best == pytest.approx(float(trainer.callback_metrics["mmpareto/loss_epoch"]), rel=0.5)
    trainer = pl.Trainer(max_epochs=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="must include a monitor"):
        trainer.fit(PlateauTopLevelMonitor(None), make_loader(2, size=32, batch_size=16))


def test_every_objective_has_an_alpha_and_the_conflict_rate_is_logged(tmp_path) -> None:
    # "align" reaches audio and visual: those encoders have three objectives, text has two.
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(logger=CSVLogger(tmp_path, name="run")),
    )
    trainer.fit(MultiModalNet(n=3, extra_loss=True), make_loader(3, size=64, batch_size=16))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    expected = {
        "audio": ["alpha_multimodal", "alpha_unimodal", "alpha_align"],
        "visual": ["alpha_multimodal", "alpha_unimodal", "alpha_align"],
        "text": ["alpha_multimodal", "alpha_unimodal"],
    }
    for enc, keys in expected.items():
        steps = [r for r in rows if r.get(f"mmpareto/{enc}/cos_beta_step")]
        assert len(steps) == 8
        assert not any(r.get(f"mmpareto/{enc}/alpha_align_step") for r in steps) or enc != "text"
        for r in steps:
            alphas = [float(r[f"mmpareto/{enc}/{k}_step"]) for k in keys]
            assert sum(alphas) == pytest.approx(1.0, abs=1e-6)
            if r[f"mmpareto/{enc}/conflicts_step"] == "0.0":
                assert alphas == pytest.approx([1 / len(keys)] * len(keys))
        for epoch in ("0", "1"):
            conflicts = [float(r[f"mmpareto/{enc}/conflicts_step"]) for r in steps if r["epoch"] == epoch]
            row = next(
                r for r in rows if r.get(f"mmpareto/{enc}/conflict_rate_epoch") and r["epoch"] == epoch
            )
            assert float(row[f"mmpareto/{enc}/conflict_rate_epoch"]) == pytest.approx(np.mean(conflicts))
            assert row.get(f"mmpareto/{enc}/alpha_align_epoch", "") != "" or enc == "text"


@pytest.mark.parametrize("how", ["monitored", "asked", "default"])
def test_cumulative_counts_are_monitorable_on_every_step(how: str, tmp_path) -> None:
    # Logged on every step when something monitors them (or when asked to), else on the logging steps
    # only: each self.log costs Lightning a tenth of a millisecond or more.
    seen: list[set[str]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(set(trainer.callback_metrics))

    callbacks: list[pl.Callback] = [MMParetoCallback(log_totals_every_step=True if how == "asked" else None)]
    if how == "monitored":
        callbacks.append(
            ModelCheckpoint(tmp_path, monitor="mmpareto/audio/conflicts_total", every_n_train_steps=1)
        )
    kwargs = trainer_kwargs(log_every_n_steps=50, enable_checkpointing=how == "monitored")
    trainer = pl.Trainer(max_steps=5, callbacks=[*callbacks, Watch()], **kwargs)
    trainer.fit(MultiModalNet(n=2), make_loader(2, size=80, batch_size=16))
    assert len(seen) == 5
    totals = {"mmpareto/audio/conflicts_total", "mmpareto/visual/stationary_total"}
    if how == "default":
        assert not any(totals <= keys for keys in seen[:-1])  # no logging step before the last
    else:
        assert all(totals <= keys for keys in seen)
    # Step values are written only on logging steps.
    assert not any("mmpareto/audio/cos_beta_step" in keys for keys in seen[:-1])


@pytest.mark.parametrize(
    ("strategy", "gamma"), [("uniform", None), ("uniform", 1.5), ("multimodal_only", None)]
)
def test_baselines_without_diagnostics_give_the_same_update(strategy: str, gamma) -> None:
    results = []
    for diagnostics in (True, False):
        torch.manual_seed(0)
        model = MultiModalNet(n=2, extra_loss=True, momentum=0.9)
        callback = MMParetoCallback(strategy=strategy, gamma=gamma, diagnostics=diagnostics)
        trainer = pl.Trainer(max_steps=3, callbacks=[callback], **trainer_kwargs())
        trainer.fit(model, make_loader(2, size=64))
        results.append([p.detach().clone() for p in model.parameters()])
        logged = set(trainer.callback_metrics)
        assert ("mmpareto/audio/cos_beta_step" in logged) == diagnostics
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_diagnostics_off_is_refused_for_the_rule_strategies() -> None:
    with pytest.raises(MisconfigurationException, match="needs it"):
        MMParetoCallback(strategy="mmpareto", diagnostics=False)
