"""The contract under ordinary Lightning habits: every case ends exact (against plain autograd) or in a
clear error. One test (or a few) per numbered case of the issue "No silent wrong result"."""

from __future__ import annotations

import copy
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass, fields

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _exact import assert_moved_by, expected_deltas
from _models import Arch, Net, make_loader, trainer_kwargs
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from mmpareto_lightning import MMParetoCallback


def _encoders(model):
    return model.mmpareto_encoders()


class StepChecker(pl.Callback):
    """Checks every optimizer step of a fit against plain autograd (SGD, lr 1, no momentum)."""

    def __init__(self, loss_fn=None, strategy: str = "mmpareto") -> None:
        self.loss_fn = loss_fn or (lambda model, batch: model.losses(batch))
        self.strategy = strategy
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = copy.deepcopy(pl_module)
        self.expected = expected_deltas(
            pl_module, _encoders, lambda m: self.loss_fn(m, batch), strategy=self.strategy
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert_moved_by(pl_module, self.before, self.expected)
        self.checked += 1


def _fit(model, steps: int = 2, callbacks=(), loader=None, **kwargs):
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[MMParetoCallback(), *callbacks], **trainer_kwargs(**kwargs)
    )
    trainer.fit(model, loader if loader is not None else make_loader(2))
    return trainer


# ---------------------------------------------------------------- 1. inherited training_step
class StepMixin:
    def training_step(self, batch, batch_idx):
        return self.losses(batch)


class ExistingModule(pl.LightningModule):
    """A user's module that predates MMPareto: its training_step is inherited by the MMPareto class."""

    def training_step(self, batch, batch_idx):
        return self.losses(batch)


class FromMixin(StepMixin, Arch):
    pass


class FromExistingBase(Arch, ExistingModule):
    pass


class AssignedLater(Arch):
    pass


AssignedLater.training_step = lambda self, batch, batch_idx: self.losses(batch)  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", [FromMixin, FromExistingBase, AssignedLater])
def test_inherited_or_assigned_training_step_is_exact(cls) -> None:
    torch.manual_seed(0)
    checker = StepChecker()
    trainer = _fit(cls(), steps=2, callbacks=[checker])
    assert trainer.global_step == 2 and checker.checked == 2


def test_a_batch_that_bypasses_the_update_is_an_error() -> None:
    class Bypass(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            # Something replaces the wrapped method after the fit started: nothing would be optimized.
            type(pl_module).training_step = lambda self, batch, batch_idx: self.losses(batch)

    class Victim(Net):
        pass

    with pytest.raises(MisconfigurationException, match="ran without MMPareto"):
        _fit(Victim(), steps=2, callbacks=[Bypass()])


def test_training_step_assigned_to_the_instance_is_refused() -> None:
    model = Net()
    model.training_step = lambda batch, batch_idx: model.losses(batch)
    with pytest.raises(MisconfigurationException, match="assigned to this Net instance"):
        _fit(model)


# ---------------------------------------------------------------- 2. a "loss" key
def test_a_loss_key_is_refused_not_counted_twice() -> None:
    class WithLoss(Arch):
        def training_step(self, batch, batch_idx):
            losses = self.losses(batch)
            return {"loss": sum(losses.values()), **losses}

    with pytest.raises(MisconfigurationException, match="'loss' is reserved"):
        _fit(WithLoss())


# ---------------------------------------------------------------- 3. derived encoder outputs
class Tokens(nn.Module):
    """A transformer-like encoder: (batch, 4 tokens, 8) plus a pooled vector derived from the tokens."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 4 * 8)
        self.pool = nn.Linear(8, 8)
        self.mode = mode

    def forward(self, x):
        tokens = torch.tanh(self.proj(x)).view(-1, 4, 8)
        if self.mode == "first":
            return tokens, tokens[:, 0]
        if self.mode == "mean":
            return tokens, tokens.mean(1)
        if self.mode == "same_twice":
            return tokens, tokens
        pooled = torch.tanh(self.pool(tokens[:, 0]))
        if self.mode == "dict":
            return {"last_hidden_state": tokens, "pooler_output": pooled}
        if self.mode == "model_output":
            return FakeModelOutput(last_hidden_state=tokens, pooler_output=pooled)
        return PlainOutput(tokens, pooled)


@dataclass
class FakeModelOutput(OrderedDict):
    """Mimics transformers' ModelOutput: a dataclass that is also an ordered dict of its set fields."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key):
        return dict(self.items())[key] if isinstance(key, str) else self.to_tuple()[key]

    def to_tuple(self):
        return tuple(self[k] for k in self.keys())


@dataclass
class PlainOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class TokenNet(Arch):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.audio = Tokens(5, mode)
        self.visual = Tokens(7, mode)
        self.head = nn.Linear(32, 3)

    def losses(self, batch):
        xa, xv, y = batch
        feats = []
        for encoder, x in ((self.audio, xa), (self.visual, xv)):
            out = encoder(x)
            if isinstance(out, tuple):
                tokens, pooled = out
            elif isinstance(out, dict):
                tokens, pooled = out["last_hidden_state"], out["pooler_output"]
            else:
                tokens, pooled = out.last_hidden_state, out.pooler_output
            if pooled.dim() == 3:  # the same tensor twice
                pooled = pooled[:, 0]
            feats.append((tokens, pooled))
        (ta, pa), (tv, pv) = feats
        fused = torch.cat([ta.mean(1), pa, tv.mean(1), pv], 1)
        return {
            "multimodal": F.cross_entropy(self.head(fused), y),
            "audio": F.cross_entropy(self.head_audio(pa + ta[:, -1]), y),
            "visual": F.cross_entropy(self.head_visual(pv * tv[:, 1]), y),
        }

    def training_step(self, batch, batch_idx):
        return self.losses(batch)


@pytest.mark.parametrize("mode", ["first", "mean", "same_twice", "dict", "model_output", "dataclass"])
@pytest.mark.parametrize("strategy", ["mmpareto", "multimodal_only"])
def test_outputs_derived_from_one_another_split_exactly(mode: str, strategy: str) -> None:
    torch.manual_seed(0)
    checker = StepChecker(strategy=strategy)
    trainer = pl.Trainer(
        max_steps=1, callbacks=[MMParetoCallback(strategy=strategy), checker], **trainer_kwargs()
    )
    trainer.fit(TokenNet(mode), make_loader(2))
    assert checker.checked == 1


# ---------------------------------------------------------------- 4. freezing and unfreezing
class FreezeVisualThenUnfreeze(BaseFinetuning):
    def __init__(self, unfreeze_at_epoch: int = 1) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch

    def freeze_before_training(self, pl_module) -> None:
        self.freeze(pl_module.visual)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        if current_epoch == self.unfreeze_at_epoch:
            self.unfreeze_and_add_param_group(pl_module.visual, optimizer, initial_denom_lr=1.0)


def test_base_finetuning_freeze_then_unfreeze_is_exact() -> None:
    torch.manual_seed(0)
    model = Net()
    visual_before = copy.deepcopy(model.visual)
    checker = StepChecker()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[MMParetoCallback(), FreezeVisualThenUnfreeze(), checker],
        **trainer_kwargs(),
    )
    loader = make_loader(2, size=32, batch_size=16)  # two steps per epoch
    trainer.fit(model, loader)
    assert checker.checked == 4
    # The frozen epoch left the visual encoder alone; the unfrozen one moved it (exactly, per the checker).
    assert not torch.equal(model.visual[0].weight, visual_before[0].weight)


def test_freezing_an_encoder_mid_fit_skips_it() -> None:
    class FreezeAudioAtStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                for p in pl_module.audio.parameters():
                    p.requires_grad_(False)
                self.frozen = copy.deepcopy(pl_module.audio)

    torch.manual_seed(0)
    model = Net()
    freezer = FreezeAudioAtStep()
    checker = StepChecker()
    _fit(model, steps=3, callbacks=[freezer, checker], loader=make_loader(2, size=64))
    assert checker.checked == 3
    assert torch.equal(model.audio[0].weight, freezer.frozen[0].weight)


def test_an_encoder_frozen_from_the_start_is_skipped_and_its_head_trains() -> None:
    torch.manual_seed(0)
    model = Net()
    for p in model.visual.parameters():
        p.requires_grad_(False)
    head_before = model.head_visual.weight.detach().clone()
    checker = StepChecker()
    _fit(model, steps=2, callbacks=[checker])
    assert checker.checked == 2
    assert not torch.equal(model.head_visual.weight, head_before)


# ---------------------------------------------------------------- 5. losses on encoder parameters
def test_a_weight_penalty_added_mid_fit_is_refused() -> None:
    class Penalised(Net):
        penalty = False

        def losses(self, batch):
            losses = super().losses(batch)
            if self.penalty:
                losses["audio"] = losses["audio"] + 0.1 * self.audio[0].weight.pow(2).sum()
            return losses

    class TurnOn(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            pl_module.penalty = trainer.global_step >= 2

    with pytest.raises(MisconfigurationException, match=r"reaches parameter .* of encoder 'audio'"):
        _fit(Penalised(), steps=4, callbacks=[TurnOn()], loader=make_loader(2, size=64))


# ---------------------------------------------------------------- 6. accumulation, clipping, schedules
class OneCycle(Net):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        self.total_steps = total
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("where", ["trainer", "callback"])
def test_accumulation_counts_optimizer_steps_for_schedules(where: str) -> None:
    torch.manual_seed(0)
    model = OneCycle()
    callback = MMParetoCallback(accumulate_grad_batches=4 if where == "callback" else 1)
    extra = {"accumulate_grad_batches": 4} if where == "trainer" else {}
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **trainer_kwargs(**extra))
    trainer.fit(model, make_loader(2, size=128, batch_size=16))  # 8 batches per epoch
    assert model.total_steps == 4  # 2 epochs x 8 batches / 4
    assert trainer.global_step == 4
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4  # stepped once per optimizer step and ended where it should


def test_trainer_accumulation_equals_the_callbacks() -> None:
    results = []
    for trainer_value, callback_value in ((3, 1), (1, 3)):
        torch.manual_seed(0)
        model = Net()
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=[MMParetoCallback(accumulate_grad_batches=callback_value)],
            **trainer_kwargs(accumulate_grad_batches=trainer_value),
        )
        trainer.fit(model, make_loader(2, size=96, batch_size=16))
        assert trainer.global_step == 2
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_trainer_clipping_equals_the_callbacks() -> None:
    results = []
    for on_trainer in (True, False):
        torch.manual_seed(0)
        model = Net()
        callback = MMParetoCallback(gradient_clip_val=None if on_trainer else 0.05)
        extra = {"gradient_clip_val": 0.05} if on_trainer else {}
        trainer = pl.Trainer(max_steps=2, callbacks=[callback], **trainer_kwargs(**extra))
        trainer.fit(model, make_loader(2))
        results.append([p.detach().clone() for p in model.parameters()])
        if on_trainer:
            assert trainer.gradient_clip_val == 0.05
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_accumulation_set_in_both_places_differently_is_refused() -> None:
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[MMParetoCallback(accumulate_grad_batches=2)],
        **trainer_kwargs(accumulate_grad_batches=3),
    )
    with pytest.raises(MisconfigurationException, match="set it in one place"):
        trainer.fit(Net(), make_loader(2))


# ---------------------------------------------------------------- 7. skipped steps and schedules
def _audio_times_at_second_batch(base: type, factor: float) -> type:
    """``base`` whose audio loss is multiplied by ``factor`` on the second batch of an epoch."""

    class Scaled(base):
        def training_step(self, batch, batch_idx):
            losses = self.losses(batch)
            if batch_idx == 1:
                losses["audio"] = losses["audio"] * factor
            return losses

    return Scaled


def test_a_skipped_step_keeps_steps_and_schedules_consistent() -> None:
    torch.manual_seed(0)
    model = _audio_times_at_second_batch(OneCycle, float("inf"))()
    callback = MMParetoCallback()
    trainer = pl.Trainer(max_steps=8, callbacks=[callback], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="step was skipped"):
        trainer.fit(model, make_loader(2, size=256, batch_size=16))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 8 and model.total_steps == 8 and scheduler.last_epoch == 8
    assert callback.skipped_steps == 1 and callback.optimizer_steps == 8


class RecordLosses(pl.Callback):
    """Each batch's losses as the training step returned them (float32, on the host)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in outputs.items()})


def _assert_epoch_means(trainer: pl.Trainer, rows: list[dict[str, float]]) -> None:
    # The plugin adds at most 4 positive float32 values in float64 and divides once: relative error
    # below 6 * 2**-53 of the mean; 1e-12 leaves room.
    assert rows
    for key in rows[0]:
        want = math.fsum(r[key] for r in rows) / len(rows)
        name = "mmpareto/loss_epoch" if key == "loss" else f"mmpareto/loss_{key}_epoch"
        got = float(trainer.callback_metrics[name])
        assert abs(got - want) <= 1e-12 * abs(want), (name, got, want)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_skipped_step_enters_every_loss_mean_with_zero_weight(accumulate: int) -> None:
    # A NaN unimodal loss skips the optimizer step: none of that step's losses (the finite ones too, and
    # the other batch of its accumulation window) may enter the epoch means.
    torch.manual_seed(0)
    record = RecordLosses()
    callback = MMParetoCallback(accumulate_grad_batches=accumulate)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback, record], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="step was skipped"):
        trainer.fit(_audio_times_at_second_batch(Net, float("nan"))(), make_loader(2, size=64, batch_size=16))
    assert callback.skipped_steps == 1 and len(record.rows) == 4
    skipped = {1} if accumulate == 1 else {0, 1}
    _assert_epoch_means(trainer, [r for i, r in enumerate(record.rows) if i not in skipped])


def test_float64_losses_beyond_float32_range_enter_the_means() -> None:
    # Finite float64 losses of 1e45 (float32 overflows at 3.4e38) train and are averaged, not dropped.
    class Huge(Net):
        def training_step(self, batch, batch_idx):
            return {k: v * 1e45 for k, v in self.losses(batch).items()}

    torch.manual_seed(0)
    record = RecordLosses()
    callback = MMParetoCallback()
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback, record], **trainer_kwargs(precision="64-true"))
    trainer.fit(Huge(), make_loader(2, size=32, batch_size=16))
    assert callback.skipped_steps == 0 and min(r["loss"] for r in record.rows) > 1e45
    _assert_epoch_means(trainer, record.rows)


# ---------------------------------------------------------------- 8. two callbacks
def test_two_callbacks_are_refused() -> None:
    # Two with the same settings: Lightning itself refuses them (same state key).
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MMParetoCallback`"):
        pl.Trainer(max_steps=1, callbacks=[MMParetoCallback(), MMParetoCallback()], **trainer_kwargs())
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[MMParetoCallback(), MMParetoCallback(strategy="uniform")],
        **trainer_kwargs(),
    )
    with pytest.raises(MisconfigurationException, match="2 MMParetoCallbacks"):
        trainer.fit(Net(), make_loader(2))


# ---------------------------------------------------------------- 9. the user's own log keys
def test_the_users_log_keys_are_never_overwritten() -> None:
    class Logs(Arch):
        def training_step(self, batch, batch_idx):
            losses = self.losses(batch)
            self.log("train/loss", 123.0)
            self.log("loss", 7.0)
            return losses

    trainer = _fit(Logs(), steps=2)
    assert float(trainer.callback_metrics["train/loss"]) == 123.0
    assert float(trainer.callback_metrics["loss"]) == 7.0
    assert "mmpareto/loss_step" in trainer.callback_metrics


PLUGIN_KEYS = ["mmpareto/loss", "mmpareto/loss_audio_step", "mmpareto/skipped_steps", "mmpareto/visual/x"]


@pytest.mark.parametrize("name", PLUGIN_KEYS)
@pytest.mark.parametrize("hook", ["training_step", "validation_step"])
def test_a_plugin_key_logged_by_the_user_is_refused(name: str, hook: str) -> None:
    # The user's value and the plugin's would overwrite each other silently in the logger.
    class Logs(Net):
        def training_step(self, batch, batch_idx):
            if hook == "training_step":
                self.log(name, 1000.0, on_step=True, on_epoch=True)
            return self.losses(batch)

        def validation_step(self, batch, batch_idx):
            self.log(name, 1000.0)

    settings = trainer_kwargs(limit_val_batches=1, val_check_interval=1)
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback()], **settings)
    with pytest.raises(MisconfigurationException, match=r"MMParetoCallback's own.*Log it under another name"):
        trainer.fit(Logs(), make_loader(2), make_loader(2, size=16))


def test_other_keys_under_the_plugins_prefix_are_the_users() -> None:
    class Logs(Net):
        def training_step(self, batch, batch_idx):
            self.log("mmpareto/custom", 45.0)
            self.log("mmpareto/audio_extra", 46.0)  # not under an encoder's folder
            return self.losses(batch)

    trainer = _fit(Logs(), steps=2)
    assert float(trainer.callback_metrics["mmpareto/custom"]) == 45.0
    assert float(trainer.callback_metrics["mmpareto/audio_extra"]) == 46.0


# ---------------------------------------------------------------- 10. the Tuner
class Tunable(Net):
    def __init__(self) -> None:
        super().__init__()
        self.lr = 0.1
        self.batch_size = 4

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return make_loader(2, size=64, batch_size=self.batch_size)


def test_tuner_lr_find_and_scale_batch_size_then_fit() -> None:
    from lightning.pytorch.tuner import Tuner

    torch.manual_seed(0)
    model = Tunable()
    trainer = pl.Trainer(max_epochs=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    tuner = Tuner(trainer)
    finder = tuner.lr_find(model, num_training=8, min_lr=1e-4, max_lr=1.0, early_stop_threshold=None)
    assert finder is not None and len(finder.results["lr"]) == 8
    new_size = tuner.scale_batch_size(model, mode="power", steps_per_trial=1, max_trials=3)
    assert new_size == model.batch_size >= 4
    trainer.fit(model)
    assert trainer.global_step == 64 // model.batch_size


# ---------------------------------------------------------------- 11. validation reusing training_step
def test_validation_and_test_steps_can_reuse_training_step() -> None:
    class Reuse(Net):
        def validation_step(self, batch, batch_idx):
            losses = self.training_step(batch, batch_idx)
            self.log("val/loss", sum(losses.values()))

        def test_step(self, batch, batch_idx):
            losses = self.training_step(batch, batch_idx)
            self.log("test/loss", sum(losses.values()))

    torch.manual_seed(0)
    model = Reuse()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[MMParetoCallback()], **trainer_kwargs(num_sanity_val_steps=1)
    )
    loader = make_loader(2)
    trainer.fit(model, loader, loader)
    assert "val/loss" in trainer.callback_metrics
    trainer.test(model, loader)
    assert "test/loss" in trainer.callback_metrics


# ---------------------------------------------------------------- 12. skipping a batch with None
@pytest.mark.parametrize("accumulate", [1, 2])
def test_returning_none_skips_the_batch(accumulate: int) -> None:
    class SkipOdd(Net):
        def training_step(self, batch, batch_idx):
            return None if batch_idx % 2 else self.losses(batch)

    torch.manual_seed(0)
    model = SkipOdd()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MMParetoCallback(accumulate_grad_batches=accumulate)],
        **trainer_kwargs(),
    )
    trainer.fit(model, make_loader(2, size=64, batch_size=16))  # 4 batches, 2 skipped
    assert trainer.global_step == 2 if accumulate == 1 else 2


def test_returning_none_is_exact_for_the_batches_that_train() -> None:
    class SkipOdd(Net):
        def training_step(self, batch, batch_idx):
            return None if batch_idx % 2 else self.losses(batch)

    torch.manual_seed(0)
    model = SkipOdd()

    class CheckEven(StepChecker):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.skip = batch_idx % 2 == 1
            if not self.skip:
                super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            else:
                self.before = copy.deepcopy(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.skip:
                for p, q in zip(pl_module.parameters(), self.before.parameters(), strict=True):
                    assert torch.equal(p, q)
            else:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    checker = CheckEven()
    trainer = pl.Trainer(max_epochs=1, callbacks=[MMParetoCallback(), checker], **trainer_kwargs())
    trainer.fit(model, make_loader(2, size=64, batch_size=16))
    assert checker.checked == 2 and trainer.global_step == 2


# ---------------------------------------------------------------- 13. a missing modality
class MissingVisualOnOddBatches(Net):
    def losses(self, batch):
        xa, _, y = batch
        if int(y.sum()) % 2 == 0:
            return super().losses(batch)
        za = self.audio(xa)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, torch.zeros_like(za)], 1)), y),
            "audio": F.cross_entropy(self.head_audio(za), y),
        }


def test_a_missing_modality_gets_no_update_and_the_others_are_exact() -> None:
    torch.manual_seed(0)
    model = MissingVisualOnOddBatches()
    loader = make_loader(2, size=128, batch_size=16)
    assert {int(b[-1].sum()) % 2 for b in loader} == {0, 1}  # both kinds of batch occur
    checker = StepChecker()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MMParetoCallback(), checker],
        **trainer_kwargs(),
    )

    class MomentumFree(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if pl_module.visual[0].weight.grad is not None:
                return
            # Plain autograd leaves a module that was not called without a gradient.
            assert all(p.grad is None for p in pl_module.visual.parameters())
            self.seen = True

    watcher = MomentumFree()
    trainer.callbacks.append(watcher)
    trainer.fit(model, loader)
    assert checker.checked == 8 and getattr(watcher, "seen", False)


# ---------------------------------------------------------------- 14. copies during a fit
def test_the_module_can_be_deep_copied_and_pickled_during_a_fit() -> None:
    from lightning.pytorch.callbacks import WeightAveraging

    class Copies(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clone = copy.deepcopy(pl_module)
            restored = pickle.loads(pickle.dumps(pl_module))
            for a, b in zip(clone.parameters(), restored.parameters(), strict=True):
                assert torch.equal(a, b)
            # The copies carry no forward hook and train with plain autograd outside the fit.
            assert not clone.audio._forward_hooks and not restored.visual._forward_hooks
            self.copied = True

    torch.manual_seed(0)
    copies = Copies()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[MMParetoCallback(), copies, WeightAveraging()], **trainer_kwargs()
    )
    trainer.fit(Net(), make_loader(2, size=64))
    assert copies.copied and trainer.global_step == 4


# ---------------------------------------------------------------- 15. exceptions mid-fit
def test_an_exception_leaves_nothing_behind() -> None:
    class Boom(Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return self.losses(batch)

    model = Boom()
    trainer = pl.Trainer(max_epochs=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, make_loader(2, size=64))
    assert not model.audio._forward_hooks and not model.visual._forward_hooks
    plain = pl.Trainer(max_steps=1, **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="no MMParetoCallback is attached"):
        plain.fit(Net(), make_loader(2))
    with pytest.raises(MisconfigurationException, match="no MMParetoCallback is attached"):
        plain.fit(model, make_loader(2))


# ---------------------------------------------------------------- 16. nn.ModuleDict encoders
def test_module_dict_encoders() -> None:
    class Dict(Net):
        def mmpareto_encoders(self):
            return nn.ModuleDict({"audio": self.audio, "visual": self.visual})

    torch.manual_seed(0)
    checker = StepChecker()
    _fit(Dict(), steps=1, callbacks=[checker])
    assert checker.checked == 1


# ---------------------------------------------------------------- clear errors (or support)
@pytest.mark.parametrize("names", [("a.b", "c/d"), ("training", "type")])
def test_free_form_encoder_names(names) -> None:
    first, second = names

    class Named(Net):
        def mmpareto_encoders(self):
            return {first: self.audio, second: self.visual}

        def losses(self, batch):
            losses = super().losses(batch)
            return {"multimodal": losses["multimodal"], first: losses["audio"], second: losses["visual"]}

    torch.manual_seed(0)
    trainer = _fit(Named(), steps=2)
    assert f"mmpareto/{first}/conflicts_total" in trainer.callback_metrics


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_an_integer_or_complex_loss_is_refused(dtype) -> None:
    class Typed(Net):
        def training_step(self, batch, batch_idx):
            losses = self.losses(batch)
            losses["count"] = torch.ones((), dtype=dtype)
            return losses

    with pytest.raises(MisconfigurationException, match=f"dtype {dtype}"):
        _fit(Typed())


def test_an_in_place_op_on_an_encoder_output_is_refused() -> None:
    class InPlace(Net):
        def losses(self, batch):
            xa, xv, y = batch
            za, zv = self.audio(xa), self.visual(xv)
            za_relu = torch.relu_(za)  # a head starting with ReLU(inplace=True)
            return {
                "multimodal": F.cross_entropy(self.head(torch.cat([za_relu, zv], 1)), y),
                "audio": F.cross_entropy(self.head_audio(za_relu), y),
                "visual": F.cross_entropy(self.head_visual(zv), y),
            }

    with pytest.raises(MisconfigurationException, match="modified in place"):
        _fit(InPlace())


def test_whole_module_compile_is_refused() -> None:
    compiled = torch.compile(Net())
    with pytest.raises(MisconfigurationException, match=r"torch\.compile"):
        _fit(compiled)


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_other_than_fsdp2_are_refused(name: str) -> None:
    from types import SimpleNamespace

    from lightning.pytorch import strategies

    from mmpareto_lightning.lightning.callback import MMParetoCallback as Callback
    from mmpareto_lightning.lightning.fit_checks import check_trainer

    # These strategies need GPUs (and DeepSpeed a package); the check only looks at the strategy's type.
    cls = getattr(strategies, name, None) or type(name, (strategies.DDPStrategy,), {})
    trainer = SimpleNamespace(callbacks=[], strategy=cls.__new__(cls))
    with pytest.raises(MisconfigurationException, match=f"does not support the {name} strategy") as info:
        check_trainer(trainer, Net(), Callback)
    # ModelParallelStrategy (FSDP2) is supported: tests/test_fsdp.py.
    assert "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)" in str(info.value)


def test_automatic_optimization_re_enabled_in_setup_is_refused() -> None:
    class Sneaky(Net):
        def setup(self, stage):
            self.automatic_optimization = True

    with pytest.raises(MisconfigurationException, match="automatic_optimization = True"):
        _fit(Sneaky())


def test_resuming_with_another_strategy_warns_that_counters_restart(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[MMParetoCallback(), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)],
        **trainer_kwargs(enable_checkpointing=True),
    )
    trainer.fit(Net(), make_loader(2, size=64))
    ckpt = next(tmp_path.glob("*.ckpt"))
    resumed = pl.Trainer(max_steps=3, callbacks=[MMParetoCallback(strategy="uniform")], **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match="restart from zero"):
        resumed.fit(Net(), make_loader(2, size=64), ckpt_path=ckpt)
