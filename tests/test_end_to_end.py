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
from _models import MultiModalNet, make_loader, trainer_kwargs
from _reference import kkt_alpha_is_optimal, reference_rule

from mmpareto_lightning import MMParetoCallback, min_norm_simplex


class RecordingNet(MultiModalNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        params = list(self.parameters())
        self.recorded = {
            name: [
                torch.zeros_like(p) if g is None else g.detach().clone()
                for p, g in zip(
                    params,
                    torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True),
                    strict=True,
                )
            ]
            for name, loss in losses.items()
        }
        return losses


def _expected_deltas(model: RecordingNet, strategy: str, rescale: str) -> dict[int, np.ndarray]:
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    rec = model.recorded
    expected: dict[int, np.ndarray] = {}
    encoder_ids: set[int] = set()
    for name, encoder in model.mmpareto_encoders().items():
        enc_params = list(encoder.parameters())
        encoder_ids |= {id(p) for p in enc_params}
        objectives = ["multimodal", name]
        if model.extra_loss and name in model.names[:2]:
            objectives.append("align")
        per_objective = [[rec[o][index[id(p)]] for p in enc_params] for o in objectives]
        alpha = None
        if len(objectives) > 2:
            flat = [torch.cat([t.reshape(-1) for t in lst]).double() for lst in per_objective]
            gram = torch.stack([torch.stack([a @ b for b in flat]) for a in flat])
            alpha = min_norm_simplex(gram).numpy()
            assert kkt_alpha_is_optimal(gram.numpy(), alpha)
        h, _ = reference_rule(per_objective, strategy=strategy, rescale=rescale, alpha_k=alpha)
        for p, ht in zip(enc_params, h, strict=True):
            expected[id(p)] = -ht.reshape(p.shape)
    for p in params:
        if id(p) not in encoder_ids:
            expected[id(p)] = -sum(rec[n][index[id(p)]].double().numpy() for n in rec)
    return expected


def _assert_moved_by(model, before, expected, rtol: float, atol_rel: float) -> None:
    for (name, p_new), p_old in zip(model.named_parameters(), before.parameters(), strict=True):
        delta = (p_new.detach() - p_old.detach()).double().numpy()
        scale = np.abs(expected[id(p_new)]).max()
        # p - g rounds to float32 at the parameter's magnitude: tiny updates are compared at that level.
        floor = 4 * np.finfo(np.float32).eps * float(p_old.detach().abs().max())
        np.testing.assert_allclose(
            delta, expected[id(p_new)], rtol=rtol, atol=atol_rel * scale + floor, err_msg=name
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
    _assert_moved_by(model, before, expected, rtol=1e-5, atol_rel=2e-6)


@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_three_objectives_on_an_encoder(rescale: str) -> None:
    torch.manual_seed(5)
    model = RecordingNet(n=3, extra_loss=True, lr=1.0)
    before, _ = _fit_one_step(model, rescale=rescale)
    expected = _expected_deltas(model, "mmpareto", rescale)
    _assert_moved_by(model, before, expected, rtol=1e-4, atol_rel=1e-5)


def test_bf16_mixed_matches_direct_per_loss_gradients() -> None:
    torch.manual_seed(3)
    model = RecordingNet(n=2, lr=1.0)
    before, _ = _fit_one_step(model, precision="bf16-mixed")
    expected = _expected_deltas(model, "mmpareto", "per_tensor")
    # Same bf16 graph for both; only the float32 parameter update rounds differently.
    _assert_moved_by(model, before, expected, rtol=1e-4, atol_rel=1e-5)


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
        summed = sum(g[index[id(p_new)]] for g in model.recorded.values())
        torch.testing.assert_close(p_new.detach() - p_old.detach(), -summed, rtol=1e-5, atol=1e-6)
