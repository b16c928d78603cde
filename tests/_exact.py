"""Expected parameter updates from plain autograd, for models the tests did not design for MMPareto.

``expected_deltas`` runs the model's own loss code on a copy, takes every loss's gradient with respect
to every parameter with ``torch.autograd.grad`` (the direct way), finds which losses reach which encoder,
and applies the independent float64 rule of ``_reference.py``. With plain SGD (lr 1, no momentum, no
weight decay) one optimizer step must move each parameter by exactly the returned delta.

Complex parameters are compared through their real views (``view_as_real``): the rule decides on the
real inner product Re<a, b>, under which a complex gradient is the steepest-ascent direction.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from _reference import reference_rule
from torch import nn

from mmpareto_lightning import min_norm_simplex

LossFn = Callable[[nn.Module], Mapping[str, torch.Tensor]]


def real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (trailing dimension of 2), any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def per_loss_gradients(model: nn.Module, loss_fn: LossFn) -> dict[str, list[torch.Tensor | None]]:
    """Loss name -> gradient of that loss w.r.t. every trainable parameter (None where it does not reach)."""
    losses = loss_fn(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        name: [
            None if g is None else g.detach().to_dense() if g.layout != torch.strided else g.detach().clone()
            for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        ]
        for name, loss in losses.items()
    }


def expected_deltas(
    model: nn.Module,
    encoders: Callable[[nn.Module], Mapping[str, nn.Module]],
    loss_fn: LossFn,
    strategy: str = "mmpareto",
    rescale: str = "per_tensor",
    multimodal_key: str = "multimodal",
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Parameter name -> expected SGD(lr=1) update of one MMPareto step (float64).

    Args:
        model: the module in its state before the step (it is copied, not changed).
        encoders: returns the name -> encoder mapping of a model (applied to the copy).
        loss_fn: computes the named losses of the batch on a model.
        seed: reseed before the forward (to match dropout masks of the real step).
    """
    ref = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    grads = per_loss_gradients(ref, loss_fn)
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    index = {id(p): i for i, (_, p) in enumerate(params)}
    expected = {n: np.zeros(tuple(real(p).shape)) for n, p in ref.named_parameters()}
    encoder_ids: set[int] = set()
    for enc_name, encoder in encoders(ref).items():
        enc_params = [p for p in encoder.parameters() if p.requires_grad]
        encoder_ids |= {id(p) for p in encoder.parameters()}
        reaching = [
            loss for loss, gl in grads.items() if any(gl[index[id(p)]] is not None for p in enc_params)
        ]
        if not enc_params or not reaching:
            continue  # frozen, or not called this step: no update
        objectives = [multimodal_key, enc_name] + [o for o in reaching if o not in (multimodal_key, enc_name)]
        per_objective = [
            [
                real(torch.zeros_like(p) if grads[o][index[id(p)]] is None else grads[o][index[id(p)]])
                for p in enc_params
            ]
            for o in objectives
        ]
        alpha = None
        if len(objectives) > 2:
            flat = [torch.cat([t.reshape(-1) for t in lst]).double() for lst in per_objective]
            gram = torch.stack([torch.stack([a @ b for b in flat]) for a in flat])
            alpha = min_norm_simplex(gram).numpy()
        h, _ = reference_rule(per_objective, strategy=strategy, rescale=rescale, alpha_k=alpha)
        names = {id(p): n for n, p in params}
        for p, ht in zip(enc_params, h, strict=True):
            expected[names[id(p)]] = -ht.reshape(real(p).shape)
    for n, p in params:
        if id(p) not in encoder_ids:
            gs = [gl[index[id(p)]] for gl in grads.values() if gl[index[id(p)]] is not None]
            if gs:
                expected[n] = -sum(real(g).double().numpy() for g in gs)
    return expected


def assert_moved_by(
    after: nn.Module, before: nn.Module, expected: Mapping[str, np.ndarray], rtol: float = 1e-5
) -> None:
    """Every parameter of ``after`` equals the one of ``before`` plus its expected delta."""
    old = dict(before.named_parameters())
    for name, p_new in after.named_parameters():
        p_old = old[name]
        delta = real(p_new.detach() - p_old.detach()).double().cpu().numpy()
        want = expected[name]
        scale = float(np.abs(want).max()) if want.size else 0.0
        floor = 4 * np.finfo(np.float32).eps * float(p_old.detach().abs().max())
        np.testing.assert_allclose(delta, want, rtol=rtol, atol=1e-6 * scale + floor, err_msg=name)
