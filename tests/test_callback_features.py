"""What the callback adds around the rule: accumulation, clipping, schedulers, metrics, checkpoints."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _bounds import U32, U64, assert_halving_exact, assert_within, gamma, mean_bound, momentum_sgd
from _exact import ExpectedUpdate, assert_moved_by, expected_deltas
from _models import MultiModalNet, make_loader, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_end_to_end import RecordingNet, _assert_moved_by, _expected_deltas

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
    # The window's per-loss gradients, as the callback forms them: each loss divided by 2 (its gradient
    # halves exactly), the two halves added in float32: RN(a / 2 + b / 2) = RN(a + b) / 2, the bits of
    # the float32 mean here (while the halves stay normal, which is checked). So the rule sees these
    # numbers, and test_end_to_end's bounds apply to the step: the rule's round-off for encoders; for
    # heads the float32 sum of the losses, here one loss per head parameter (checked), so the window's
    # sum is the same one addition as the mean here.
    mean = {}
    for name in model.history[0]:
        pairs = [(a, b) for a, b in zip(model.history[0][name], model.history[1][name], strict=True)]
        for a, b in pairs:
            assert_halving_exact(a, b, a + b)
        mean[name] = [(a + b) / 2 for a, b in pairs]
    encoder_ids = {id(p) for enc in model.mmpareto_encoders().values() for p in enc.parameters()}
    for i, p in enumerate(model.parameters()):
        if id(p) not in encoder_ids:
            assert sum(bool(g[i].any()) for g in mean.values()) == 1
    model.recorded = mean
    _assert_moved_by(model, before, _expected_deltas(model, "mmpareto", "per_tensor"))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_acts_on_the_integrated_gradient(algorithm: str) -> None:
    torch.manual_seed(0)
    model = RecordingNet(n=2, lr=1.0)
    before = copy.deepcopy(model)
    callback = MMParetoCallback(gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
    pl.Trainer(max_steps=1, callbacks=[callback], **trainer_kwargs()).fit(model, make_loader(2))
    # The step's update is minus the clipped integrated gradient: the rule on the per-loss gradients
    # recorded on the step's own graph (test_end_to_end's bounds), then clipped as torch clips.
    expected = _expected_deltas(model, "mmpareto", "per_tensor")
    if algorithm == "norm":
        # ExpectedUpdate.clipped: torch's float32 total norm and coefficient, stated there.
        expected, coef = expected.clipped(0.01)
        assert coef < 0.5  # clipping acts (by more than any round-off)
    else:
        # clamp is 1-Lipschitz, so the bound carries over; where it clamps, torch clamps to 0.01 rounded
        # to float32 (u 0.01 away). The update is -grad, and the clamp is odd.
        assert max(float(np.abs(v).max()) for v in expected.values()) > 0.02  # clipping acts
        for key, value in expected.items():
            reach = np.abs(value) + expected.bounds[key] >= 0.01
            expected[key] = np.clip(value, -0.01, 0.01)
            expected.bounds[key] = expected.bounds[key] + np.where(reach, U32 * 0.01, 0.0)
    _assert_moved_by(model, before, expected)


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
    # StepLR multiplies the lr by 0.5 each time: powers of two, exact.
    assert trainer.optimizers[0].param_groups[0]["lr"] == expected


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
            # The rule's two weights sum to 1 within float64 round-off (each from its own quotient of the
            # same denominator, or the official clamps 0.999 and 0.001); each is logged in float32.
            assert_within(am + au, 1.0, U32 * (abs(am) + abs(au)) + gamma(6, U64), "alphas")
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
            # The same float32 numbers as the step values, summed and divided in float32 (_bounds).
            mean, bound = mean_bound(step_cos)
            assert_within(float(epoch_row[f"mmpareto/{enc}/cos_beta_epoch"]), mean, bound, "cos beta")
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
    mean, bound = mean_bound(loss_steps)  # the step values are the float32 losses the epoch mean adds
    assert_within(loss_epoch, mean, bound, "loss_audio_epoch")
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
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.25  # 1.0 halved twice: exact


def test_reduce_on_plateau_with_a_missing_monitor_is_refused() -> None:
    trainer = pl.Trainer(max_epochs=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="'val/nothing', which is not available"):
        trainer.fit(Plateau("val/nothing"), make_loader(2, size=32, batch_size=16))


class RecordingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """Keeps every value it is stepped with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def step(self, metrics, epoch=None) -> None:
        self.seen.append(float(metrics))
        super().step(metrics)


class PlateauTopLevelMonitor(MultiModalNet):
    def __init__(self, monitor: str | None):
        super().__init__(n=2)
        self.monitor = monitor

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        conf = {"optimizer": opt, "lr_scheduler": RecordingPlateau(opt, factor=0.5)}
        return {**conf, "monitor": self.monitor} if self.monitor else conf


def test_reduce_on_plateau_monitor_at_the_top_level_and_missing() -> None:
    trainer = pl.Trainer(max_epochs=2, callbacks=[MMParetoCallback()], **trainer_kwargs())
    trainer.fit(PlateauTopLevelMonitor("mmpareto/loss_epoch"), make_loader(2, size=32, batch_size=16))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    # Stepped once per epoch with the monitored value: the last one is the logged epoch loss itself, and
    # best is what ReduceLROnPlateau's rule ("min", relative threshold 1e-4) keeps of the values: exact.
    assert scheduler.last_epoch == 2 and len(scheduler.seen) == 2
    assert scheduler.seen[-1] == float(trainer.callback_metrics["mmpareto/loss_epoch"])
    best = float("inf")
    for value in scheduler.seen:
        best = value if value < best * (1 - scheduler.threshold) else best
    assert scheduler.best == best < float("inf")
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
            # Weights on the simplex, normalised by their float64 sum (K divisions, a K-term sum: within
            # gamma(2K) of 1), each logged in float32; the sum here adds K - 1 float64 roundings.
            bound = U32 * sum(abs(a) for a in alphas) + gamma(3 * len(keys), U64)
            assert_within(sum(alphas), 1.0, bound, "alphas")
            if r[f"mmpareto/{enc}/conflicts_step"] == "0.0":
                # No conflict: the weights are 1 / K in float64, logged in float32: those very numbers.
                third = float(torch.tensor(1 / len(keys), dtype=torch.float32))
                assert alphas == [third] * len(keys)
        for epoch in ("0", "1"):
            conflicts = [float(r[f"mmpareto/{enc}/conflicts_step"]) for r in steps if r["epoch"] == epoch]
            row = next(
                r for r in rows if r.get(f"mmpareto/{enc}/conflict_rate_epoch") and r["epoch"] == epoch
            )
            mean, bound = mean_bound(conflicts)
            assert_within(float(row[f"mmpareto/{enc}/conflict_rate_epoch"]), mean, bound, "conflict rate")
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


class MomentumStepChecker(pl.Callback):
    """Checks every step of a fit with SGD and momentum against plain autograd from the step's own state
    (the buffers read from the optimizer), with the bounds of ``_bounds.momentum_sgd``.

    ``plain``: the encoders get gamma times the gradient of the summed losses (one ordinary backward,
    which ``torch.autograd.grad`` of the same sum reproduces bit for bit, then the float32 product with
    gamma: ``u |gamma g|`` for the product, ``u |gamma| |g|`` for gamma rounded to float32); otherwise the
    rule on the per-loss gradients (``_exact.expected_deltas``). Heads get the summed gradient either way.
    The reference's forward replays the step's dropout masks: it draws from the generator state the step
    starts from, which is restored for the step.
    """

    def __init__(self, strategy: str, gamma: float | None, plain: bool, momentum: float, lr: float) -> None:
        self.strategy, self.gamma, self.plain = strategy, gamma, plain
        self.momentum, self.lr = momentum, lr
        self.checked = 0

    def _gradient(self, pl_module, batch) -> ExpectedUpdate:
        rng = torch.get_rng_state()
        if not self.plain:
            step = expected_deltas(
                pl_module,
                lambda m: m.mmpareto_encoders(),
                lambda m: m.losses(batch),
                self.strategy,
                gamma=self.gamma,
            )
            torch.set_rng_state(rng)
            return step.scaled({name: -1.0 for name in step})  # lr 1: the update is -gradient
        ref = copy.deepcopy(pl_module)
        named = list(ref.named_parameters())
        grads = torch.autograd.grad(sum(ref.losses(batch).values()), [p for _, p in named], allow_unused=True)
        torch.set_rng_state(rng)
        encoder_ids = {id(p) for enc in ref.mmpareto_encoders().values() for p in enc.parameters()}
        factor = 1.0 if self.gamma is None else self.gamma
        gradient = ExpectedUpdate()
        for (name, p), g in zip(named, grads, strict=True):
            g = torch.zeros_like(p) if g is None else g
            value = g.double().numpy()
            if id(p) in encoder_ids and factor != 1.0:
                gradient[name] = factor * value
                gradient.bounds[name] = 2 * U32 * np.abs(factor * value) * (1 + U32)
            else:
                gradient[name], gradient.bounds[name] = value, np.zeros_like(value)
        return gradient

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = copy.deepcopy(pl_module)
        gradient = self._gradient(pl_module, batch)
        state = trainer.optimizers[0].state
        buffers = {
            n: state[p]["momentum_buffer"] if "momentum_buffer" in state.get(p, {}) else None
            for n, p in pl_module.named_parameters()
        }
        self.update, self.buffers = momentum_sgd(gradient, buffers, self.momentum, self.lr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert_moved_by(pl_module, self.before, self.update)
        state = trainer.optimizers[0].state
        for name, p in pl_module.named_parameters():
            got = state[p]["momentum_buffer"].double().numpy()
            assert_within(got, self.buffers[name], self.buffers.bounds[name], f"momentum of {name}")
        self.checked += 1


@pytest.mark.parametrize(
    ("strategy", "gamma"), [("uniform", None), ("uniform", 1.5), ("multimodal_only", None)]
)
def test_baselines_without_diagnostics_give_the_same_update(strategy: str, gamma) -> None:
    # Each fit, with and without the split, is held step by step to its own exact reference: the rule on
    # the per-loss gradients, or (uniform without diagnostics) gamma times the gradient of the summed
    # losses. The two are the same update in exact arithmetic; their float32 results are not compared
    # with each other, since the encoder's backward rounds J^T (c_m + c_u) and J^T c_m + J^T c_u
    # differently, by an amount no stated bound covers.
    for diagnostics in (True, False):
        torch.manual_seed(0)
        model = MultiModalNet(n=2, extra_loss=True, momentum=0.9)
        plain = strategy == "uniform" and not diagnostics
        checker = MomentumStepChecker(strategy, gamma, plain, momentum=0.9, lr=model.lr)
        callback = MMParetoCallback(strategy=strategy, gamma=gamma, diagnostics=diagnostics)
        trainer = pl.Trainer(max_steps=3, callbacks=[callback, checker], **trainer_kwargs())
        trainer.fit(model, make_loader(2, size=64))
        assert checker.checked == 3
        logged = set(trainer.callback_metrics)
        assert ("mmpareto/audio/cos_beta_step" in logged) == diagnostics


def test_diagnostics_off_is_refused_for_the_rule_strategies() -> None:
    with pytest.raises(MisconfigurationException, match="needs it"):
        MMParetoCallback(strategy="mmpareto", diagnostics=False)
