"""One real optimizer step through the Trainer against gradients from plain autograd.

The model records, inside its own training step and on the very graph the callback uses, each loss's
gradient with respect to every parameter (``torch.autograd.grad`` per loss: the direct, expensive way).
After one SGD step with lr 1 and no momentum, every parameter must have moved by exactly minus the
MMPareto rule (re-derived independently in float64) applied to those gradients; heads by minus their
summed gradient. BatchNorm, dropout and an in-place ReLU sit inside the encoders.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _exact import ExpectedUpdate, recorded_gradients
from _models import MultiModalNet, make_loader, trainer_kwargs
from _reference import decision_sensitivity, h_bound, kkt_alpha_is_optimal, reference_rule, unit_round_off

from mmpareto_lightning import MMParetoCallback


class RecordingNet(MultiModalNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        self.recorded = recorded_gradients(losses, list(self.parameters()))
        return losses


def _expected_deltas(model: RecordingNet, strategy: str, rescale: str) -> ExpectedUpdate:
    """id(parameter) -> expected SGD(lr=1) update from the recorded per-loss gradients, with its bound
    (see _exact: the rule's bound for encoders, float32 accumulation of the losses for heads)."""
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    rec = model.recorded
    expected = ExpectedUpdate()
    u = unit_round_off(torch.float32)
    encoder_ids: set[int] = set()
    for name, encoder in model.mmpareto_encoders().items():
        enc_params = list(encoder.parameters())
        encoder_ids |= {id(p) for p in enc_params}
        objectives = ["multimodal", name]
        if model.extra_loss and name in model.names[:2]:
            objectives.append("align")
        per_objective = [[rec[o][index[id(p)]] for p in enc_params] for o in objectives]
        h, info = reference_rule(per_objective, strategy=strategy, rescale=rescale)
        if len(objectives) > 2:
            assert kkt_alpha_is_optimal(info["gram"], info["weights"] / len(objectives))
        bounds = h_bound(per_objective, info, decision_sensitivity(info, [p.numel() for p in enc_params]))
        for p, ht, bt in zip(enc_params, h, bounds, strict=True):
            expected[id(p)] = -ht.reshape(p.shape)
            expected.bounds[id(p)] = (bt + u * np.abs(ht)).reshape(p.shape)
    for p in params:
        if id(p) not in encoder_ids:
            gs = [rec[n][index[id(p)]].double().numpy() for n in rec]
            total = sum(gs)
            expected[id(p)] = -total
            accumulation = (len(gs) - 1) * u * sum(np.abs(g) for g in gs)
            expected.bounds[id(p)] = accumulation * (1 + 2 * u) + u * np.abs(total)
    return expected


def _assert_moved_by(model, before, expected: ExpectedUpdate) -> None:
    # p - g rounds to float32 once more: u |p_new| on top of the expected update's bound.
    u = unit_round_off(torch.float32)
    for (name, p_new), p_old in zip(model.named_parameters(), before.parameters(), strict=True):
        new = p_new.detach().double().cpu().numpy()
        delta = new - p_old.detach().double().cpu().numpy()
        bound = expected.bounds[id(p_new)] + u * np.abs(new) * (1 + 2 * u) + np.finfo(np.float64).tiny
        excess = np.abs(delta - expected[id(p_new)]) - bound
        assert np.all(excess <= 0), (
            f"{name}: off the reference beyond the bound at {int((excess > 0).sum())} entries "
            f"(worst difference {float(np.abs(delta - expected[id(p_new)]).max()):.3e})"
        )


def _fit_one_step(model, precision="32-true", **callback_kwargs):
    before = copy.deepcopy(model)
    trainer = pl.Trainer(
        max_steps=1, precision=precision, callbacks=[MMParetoCallback(**callback_kwargs)], **trainer_kwargs()
    )
    trainer.fit(model, make_loader(len(model.names)))
    return before, trainer


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("strategy", ["mmpareto", "pareto", "uniform", "multimodal_only"])
def test_one_step_equals_rule_on_plain_autograd_gradients(n: int, strategy: str) -> None:
    torch.manual_seed(n)
    model = RecordingNet(n=n, lr=1.0)
    before, _ = _fit_one_step(model, strategy=strategy)
    expected = _expected_deltas(model, strategy, "per_tensor")
    _assert_moved_by(model, before, expected)


@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_three_objectives_on_an_encoder(rescale: str) -> None:
    torch.manual_seed(5)
    model = RecordingNet(n=3, extra_loss=True, lr=1.0)
    before, _ = _fit_one_step(model, rescale=rescale)
    expected = _expected_deltas(model, "mmpareto", rescale)
    _assert_moved_by(model, before, expected)


def test_bf16_mixed_matches_direct_per_loss_gradients() -> None:
    torch.manual_seed(3)
    model = RecordingNet(n=2, lr=1.0)
    before, _ = _fit_one_step(model, precision="bf16-mixed")
    expected = _expected_deltas(model, "mmpareto", "per_tensor")
    # Same bf16 graph for both; only the float32 parameter update rounds differently.
    _assert_moved_by(model, before, expected)


def test_batchnorm_running_statistics_update_once() -> None:
    torch.manual_seed(1)
    model = MultiModalNet(n=2)
    plain = copy.deepcopy(model)
    _fit_one_step(model)
    batch = next(iter(make_loader(2)))
    plain.train()
    with torch.no_grad():
        plain.losses(batch)
    for name in model.names:
        bn, bn_plain = model.encoders[name].net[1], plain.encoders[name].net[1]
        torch.testing.assert_close(bn.running_mean, bn_plain.running_mean)
        torch.testing.assert_close(bn.running_var, bn_plain.running_var)
        assert int(bn.num_batches_tracked) == 1


def test_heads_get_plain_summed_gradient_without_gamma() -> None:
    torch.manual_seed(2)
    model = RecordingNet(n=2, lr=1.0)
    before, _ = _fit_one_step(model, gamma=7.0)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for p_new, p_old in zip(model.head.parameters(), before.head.parameters(), strict=True):
        gs = [g[index[id(p_new)]].double() for g in model.recorded.values()]
        # float32 accumulation of the losses' contributions, then p - g rounded (see _exact).
        u = 2.0**-24
        bound = (len(gs) - 1) * u * sum(g.abs() for g in gs) * (
            1 + 2 * u
        ) + 2 * u * p_new.detach().double().abs()
        assert ((p_new.detach().double() - p_old.detach().double() + sum(gs)).abs() <= bound + 1e-300).all()
