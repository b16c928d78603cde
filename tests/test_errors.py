"""Bad input gets a clear error naming the problem and the fix; nothing is silently wrong."""

from __future__ import annotations

import copy
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _models import MultiModalNet, make_loader, trainer_kwargs
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpareto_lightning import MMParetoCallback


def _fit(model, callbacks=None, **kwargs):
    callbacks = [MMParetoCallback()] if callbacks is None else callbacks
    trainer = pl.Trainer(
        max_steps=kwargs.pop("max_steps", 1), callbacks=callbacks, **trainer_kwargs(**kwargs)
    )
    trainer.fit(model, make_loader(len(model.names)))
    return trainer


class Returning(MultiModalNet):
    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def training_step(self, batch, batch_idx):
        return self.fn(self, self.losses(batch))


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (
            lambda m, losses: {k: v for k, v in losses.items() if k != "multimodal"},
            r"Missing loss.*'multimodal'",
        ),
        (lambda m, losses: {k: v for k, v in losses.items() if k != "visual"}, r"Missing loss.*'visual'"),
        (lambda m, losses: sum(losses.values()), "must return a dict of named scalar losses.*Tensor"),
        (lambda m, losses: {**losses, "audio": losses["audio"].detach()}, "'audio' does not require grad"),
        (
            lambda m, losses: {**losses, "extra": torch.ones(2, requires_grad=True)},
            "'extra' must be a scalar",
        ),
    ],
    ids=["no-multimodal", "no-unimodal", "bare-tensor", "detached", "non-scalar"],
)
def test_bad_training_step_output(fn, match) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        _fit(Returning(fn))


class UnreachedUnimodal(MultiModalNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        losses["visual"] = F.cross_entropy(
            self.uni_heads["visual"](torch.zeros(batch[0].shape[0], 8)), batch[-1]
        )
        return losses


class UnreachedMultimodal(MultiModalNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        za = self.encoders["audio"](batch[0])
        losses["multimodal"] = F.cross_entropy(self.head(torch.cat([za, za.detach()], 1)), batch[-1])
        return losses


def test_unimodal_loss_that_never_reaches_its_encoder() -> None:
    with pytest.raises(
        MisconfigurationException, match=r"unimodal loss 'visual' does not depend on .* 'visual'"
    ):
        _fit(UnreachedUnimodal())


def test_multimodal_loss_that_never_reaches_an_encoder() -> None:
    with pytest.raises(
        MisconfigurationException, match=r"multimodal loss 'multimodal' does not depend on .*'visual'"
    ):
        _fit(UnreachedMultimodal())


class SharedEncoders(MultiModalNet):
    def __init__(self):
        super().__init__()
        self.encoders["visual"].net[0] = self.encoders["audio"].net[0]
        self.encoders["visual"].net[0] = nn.Linear(7, 12)
        self.encoders["visual"].net[4] = self.encoders["audio"].net[4]


class EncoderSharesHead(MultiModalNet):
    def __init__(self):
        super().__init__()
        self.uni_heads["audio"].weight = self.encoders["audio"].net[4].weight.__class__(torch.randn(3, 8))
        self.encoders["audio"].net.append(nn.Linear(8, 8))
        self.encoders["audio"].net[5].weight = self.head.weight.__class__(torch.randn(8, 8))
        self.head2 = nn.Linear(8, 8)
        self.head2.weight = self.encoders["audio"].net[5].weight


def test_parameter_in_two_encoders() -> None:
    with pytest.raises(MisconfigurationException, match=r"shared by encoder\(s\) \['audio', 'visual'\]"):
        _fit(SharedEncoders())


def test_encoder_overlapping_a_head() -> None:
    with pytest.raises(MisconfigurationException, match="and a non-encoder module"):
        _fit(EncoderSharesHead())


class NotASubmodule(MultiModalNet):
    def mmpareto_encoders(self):
        return {"audio": self.encoders["audio"], "visual": nn.Linear(7, 8)}


def test_encoder_that_is_not_a_submodule() -> None:
    with pytest.raises(MisconfigurationException, match=r"'visual' .* is not a submodule"):
        _fit(NotASubmodule())


class NoEncoders(MultiModalNet):
    def mmpareto_encoders(self):
        return {}


def test_no_encoders() -> None:
    with pytest.raises(MisconfigurationException, match="non-empty dict"):
        _fit(NoEncoders())


class Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 3)
        self.names = ["audio"]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.layer(batch[0]), batch[-1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_without_the_mixin() -> None:
    with pytest.raises(MisconfigurationException, match="needs an MMParetoModule, got Plain"):
        _fit(Plain())


def test_mixin_without_the_callback() -> None:
    with pytest.raises(
        MisconfigurationException, match=r"add it with `Trainer\(callbacks=\[MMParetoCallback\(\)\]\)`"
    ):
        _fit(MultiModalNet(), callbacks=[])


class Automatic(MultiModalNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = True


def test_automatic_optimization_re_enabled() -> None:
    with pytest.raises(MisconfigurationException, match="automatic_optimization = True"):
        _fit(Automatic())


class TwoOptimizers(MultiModalNet):
    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.encoders.parameters(), lr=0.1),
            torch.optim.SGD(self.head.parameters(), lr=0.1),
        ]


def test_several_optimizers() -> None:
    with pytest.raises(MisconfigurationException, match=r"exactly one optimizer.*returned 2"):
        _fit(TwoOptimizers())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "pcgrad"}, "strategy='pcgrad'"),
        ({"rescale": "global"}, "rescale='global'"),
        ({"gamma": -1.0}, "gamma"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"gradient_clip_val": 0.0}, "gradient_clip_val"),
        ({"gradient_clip_algorithm": "l1"}, "gradient_clip_algorithm"),
        ({"multimodal_key": ""}, "multimodal_key"),
    ],
)
def test_bad_callback_arguments(kwargs, match) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        MMParetoCallback(**kwargs)


class IntermediateLoss(MultiModalNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        hidden = self.encoders["audio"].net[0](batch[0])
        losses["audio"] = losses["audio"] + hidden.pow(2).mean()
        return losses


def test_loss_that_bypasses_the_encoder_output() -> None:
    with pytest.raises(
        MisconfigurationException, match=r"'audio' reaches parameter .* of encoder 'audio'.*without passing"
    ):
        _fit(IntermediateLoss())


class CheckpointedEncoder(nn.Module):
    def __init__(self, dim, reentrant):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, 12), nn.ReLU(), nn.Linear(12, 8))
        self.reentrant = reentrant

    def forward(self, x):
        # Reentrant checkpointing only tracks gradients when an input requires them.
        return checkpoint(self.inner, x.requires_grad_(self.reentrant), use_reentrant=self.reentrant)


class Checkpointed(MultiModalNet):
    def __init__(self, reentrant):
        super().__init__()
        self.encoders["audio"] = CheckpointedEncoder(5, reentrant)


def test_reentrant_checkpointing_is_refused_with_the_fix() -> None:
    with pytest.raises(MisconfigurationException, match="use_reentrant=False"):
        _fit(Checkpointed(reentrant=True))


def test_non_reentrant_checkpointing_works() -> None:
    model = Checkpointed(reentrant=False)
    before = copy.deepcopy(model)
    _fit(model)
    assert not torch.equal(model.encoders["audio"].inner[0].weight, before.encoders["audio"].inner[0].weight)


class NonFinite(MultiModalNet):
    def __init__(self, bad_step: int, value: float, where: str = "loss"):
        super().__init__(momentum=0.9)
        self.bad_step, self.value, self.where = bad_step, value, where

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        if batch_idx == self.bad_step and self.current_epoch == 0:
            if self.where == "loss":
                losses["visual"] = losses["visual"] * self.value
            else:  # finite loss, non-finite gradient
                losses["audio"] = losses["audio"] + 0 * torch.sqrt(self.encoders["audio"](batch[0]) * 0).sum()
        return losses


@pytest.mark.parametrize(
    ("value", "where"), [(float("nan"), "loss"), (float("inf"), "loss"), (1.0, "gradient")]
)
def test_non_finite_step_is_skipped_and_counted(value, where) -> None:
    torch.manual_seed(0)
    model = NonFinite(bad_step=1, value=value, where=where)
    snapshots = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(copy.deepcopy(pl_module.state_dict()))

    callback = MMParetoCallback()
    expected = "'visual'" if where == "loss" else "none"
    with pytest.warns(RuntimeWarning, match=f"non-finite values.*loss\\(es\\) .*{expected}.*skipped"):
        trainer = _fit(model, callbacks=[callback, Snapshot()], max_steps=3)
    assert callback.skipped_steps == 1
    # The forward of the skipped step still updates BatchNorm statistics (as under GradScaler); the
    # parameters must not move.
    for name, _ in model.named_parameters():
        torch.testing.assert_close(
            snapshots[1][name], snapshots[0][name], msg=f"{name} changed on the skipped step"
        )
    for tensor in model.state_dict().values():
        assert torch.isfinite(tensor.float()).all()
    momentum = trainer.optimizers[0].state[next(model.parameters())]["momentum_buffer"]
    assert torch.isfinite(momentum).all()


def test_command_without_jsonargparse_names_the_extra_to_install() -> None:
    # A fresh interpreter in which jsonargparse is missing, as after a plain `pip install .`.
    script = """
import sys
import lightning_utilities.core.imports as imports
is_available = imports.RequirementCache.__bool__
imports.RequirementCache.__bool__ = lambda self: (
    False if "jsonargparse" in str(self.requirement) else is_available(self)
)
sys.modules["jsonargparse"] = None
from mmpareto_lightning.cli import main
main(["fit", "--help"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode != 0
    assert 'needs jsonargparse: pip install "mmpareto-lightning[examples]"' in out.stderr
