"""Expected parameter updates from plain autograd, for models the tests did not design for MMPareto.

``expected_deltas`` runs the model's own loss code on a copy, takes every loss's gradient with respect
to every parameter with ``torch.autograd.grad`` (the direct way), finds which losses reach which encoder,
and applies the independent float64 rule of ``_reference.py``. With plain SGD (no momentum, no weight
decay) one optimizer step must move each parameter by the returned delta, within a bound that follows
from the computation, entry by entry:

* encoder parameters: the rule's bound (``_reference.h_bound``: the write's round-off and the decisions'
  sensitivity to the Gram entries' round-off). The per-loss gradients themselves are the same numbers on
  both sides: the split computes them with the same autograd operations as ``torch.autograd.grad`` of
  each loss (the head-level cotangent at the encoder's output, then the encoder's backward);
* head parameters: their gradient is the ordinary backward of the summed losses, which adds the losses'
  contributions in float32: at most ``(L - 1) u sum_l |g_l|`` from the float64 sum of the separate
  gradients (``L`` losses reaching the parameter);
* the SGD step ``p - lr * g`` rounds to float32: at most ``u |lr g|`` for the product and ``u |p_new|``
  for the difference.

Complex parameters are compared through their real views (``view_as_real``): the rule decides on the
real inner product Re<a, b>, under which a complex gradient is the steepest-ascent direction. Sparse
gradients (embeddings in heads) are densified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from _reference import decision_sensitivity, h_bound, reference_rule, unit_round_off
from torch import nn

LossFn = Callable[[nn.Module], Mapping[str, torch.Tensor]]


def real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (trailing dimension of 2), any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


#: id(parameter) -> for a sparse gradient (an embedding with ``sparse=True`` in a head), per loss: the
#: bound of summing its repeated rows in float32 in another order, ``(m - 1) sum |contributions|`` per
#: entry, and ``m``, the row's repetitions: SGD adds an uncoalesced sparse gradient into the parameter
#: one repetition at a time, each addition rounding at the parameter's magnitude.
SPARSE_REASSOCIATION: dict[int, list[np.ndarray]] = {}
SPARSE_REPEATS: dict[int, list[np.ndarray]] = {}


def _densify(param: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if g.layout == torch.strided:
        return g.detach().clone()
    g = g.detach()
    indices, values = g._indices(), g._values()
    magnitude = torch.sparse_coo_tensor(indices, values.abs(), g.shape).to_dense()
    repeats = torch.sparse_coo_tensor(indices, torch.ones_like(values), g.shape).to_dense()
    bound = ((repeats - 1).clamp_min(0) * magnitude).double().numpy()
    SPARSE_REASSOCIATION.setdefault(id(param), []).append(bound)
    SPARSE_REPEATS.setdefault(id(param), []).append(repeats.double().numpy())
    return g.to_dense()


def per_loss_gradients(model: nn.Module, loss_fn: LossFn) -> dict[str, list[torch.Tensor | None]]:
    """Loss name -> gradient of that loss w.r.t. every trainable parameter (None where it does not reach);
    sparse gradients densified."""
    losses = loss_fn(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        SPARSE_REASSOCIATION.pop(id(p), None)
        SPARSE_REPEATS.pop(id(p), None)
    return {
        name: [
            None if g is None else _densify(p, g)
            for p, g in zip(
                params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), strict=True
            )
        ]
        for name, loss in losses.items()
    }


class ExpectedUpdate(dict):
    """Parameter name -> expected update (float64), with ``bounds``: name -> entrywise bound."""

    def __init__(self) -> None:
        super().__init__()
        self.bounds: dict[str, np.ndarray] = {}
        #: how many float32 additions into the parameter the update takes (1, or a sparse gradient's
        #: repetitions of each row)
        self.additions: dict[str, np.ndarray] = {}

    def scaled(self, factors: Mapping[str, float]) -> ExpectedUpdate:
        """The update of an SGD step with per-parameter learning rates (the bounds are linear in it)."""
        out = ExpectedUpdate()
        for name, value in self.items():
            f = factors.get(name, 0.0)
            out[name], out.bounds[name] = value * f, self.bounds[name] * abs(f)
        out.additions = dict(self.additions)
        return out

    def clipped(
        self, max_norm: float, numels: Mapping[str, int] | None = None
    ) -> tuple[ExpectedUpdate, float]:
        """The update after ``clip_grad_norm_(max_norm)`` (lr 1), and the clipping coefficient.

        torch computes the total norm in float32 (a norm per tensor, then the norm of the norms): its
        relative error is at most ``(n_max + T + 2) u`` (``n_max`` the largest tensor's entries, ``T``
        tensors), on top of the update's own bound; the coefficient ``max_norm / (norm + 1e-6)`` inherits
        it (plus two roundings).
        """
        u = unit_round_off(torch.float32)
        norm = float(np.sqrt(sum(float((v**2).sum()) for v in self.values())))
        spread = float(
            np.sqrt(sum(float(((np.abs(v) + self.bounds[k]) ** 2).sum()) for k, v in self.items()))
        )
        n_max = max(v.size for v in self.values())
        relative = (n_max + len(self) + 4) * u + (spread - norm) / max(norm, 1e-300)
        coef = min(1.0, max_norm / (norm + 1e-6))
        d_coef = coef * relative if coef < 1.0 else 0.0
        out = ExpectedUpdate()
        for name, value in self.items():
            out[name] = value * coef
            out.bounds[name] = self.bounds[name] * coef + d_coef * (np.abs(value) + self.bounds[name])
            out.bounds[name] = out.bounds[name] + u * np.abs(out[name])  # the multiplication by coef
        out.additions = dict(self.additions)
        return out, coef


def recorded_gradients(
    losses: Mapping[str, torch.Tensor], params: list[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """Loss name -> detached gradient of that loss w.r.t. each of ``params`` (zeros where it does not
    reach), taken on the step's own graph (kept for the step's backward)."""
    return {
        name: [
            torch.zeros_like(p) if g is None else g.detach().clone()
            for p, g in zip(
                params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), strict=True
            )
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
    lr: float = 1.0,
    gamma: float | None = None,
) -> ExpectedUpdate:
    """Parameter name -> expected SGD(lr) update of one MMPareto step (float64), with its bound.

    Args:
        model: the module in its state before the step (it is copied, not changed).
        encoders: returns the name -> encoder mapping of a model (applied to the copy).
        loss_fn: computes the named losses of the batch on a model.
        seed: reseed before the forward (to match dropout masks of the real step).
        lr: the SGD learning rate of the step.
        gamma: the rule's gamma (``None``: its default).
    """
    ref = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    grads = per_loss_gradients(ref, loss_fn)
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    index = {id(p): i for i, (_, p) in enumerate(params)}
    names = {id(p): n for n, p in params}
    expected = ExpectedUpdate()
    for n, p in ref.named_parameters():
        expected[n] = np.zeros(tuple(real(p).shape))
        expected.bounds[n] = np.zeros(tuple(real(p).shape))
    u = unit_round_off(torch.float32)
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
        h, info = reference_rule(per_objective, strategy=strategy, rescale=rescale, gamma=gamma)
        sensitivity = decision_sensitivity(info, [real(p).numel() for p in enc_params])
        bounds = h_bound(per_objective, info, sensitivity)
        for p, ht, bt in zip(enc_params, h, bounds, strict=True):
            expected[names[id(p)]] = -lr * ht.reshape(real(p).shape)
            expected.bounds[names[id(p)]] = (lr * bt + u * lr * np.abs(ht)).reshape(real(p).shape)
    for n, p in params:
        if id(p) not in encoder_ids:
            gs = [
                real(gl[index[id(p)]]).double().numpy()
                for gl in grads.values()
                if gl[index[id(p)]] is not None
            ]
            if gs:
                total = sum(gs)
                expected[n] = -lr * total
                accumulation = (len(gs) - 1) * u * sum(np.abs(g) for g in gs)
                accumulation = accumulation + u * sum(SPARSE_REASSOCIATION.get(id(p), [np.zeros(1)]))
                if id(p) in SPARSE_REPEATS:
                    expected.additions[n] = np.maximum(sum(SPARSE_REPEATS[id(p)]), 1.0)
                expected.bounds[n] = lr * accumulation * (1 + 2 * u) + u * lr * np.abs(total)
    return expected


def assert_moved_by(after: nn.Module, before: nn.Module, expected: Mapping[str, np.ndarray]) -> None:
    """Every parameter of ``after`` equals the one of ``before`` plus its expected delta, within the bound
    (``expected.bounds``, plus the float32 rounding of ``p - lr g``: ``u |p_new|``)."""
    old = dict(before.named_parameters())
    bounds = getattr(expected, "bounds", {})
    u = unit_round_off(torch.float32)
    for name, p_new in after.named_parameters():
        new = real(p_new.detach()).double().cpu().numpy()
        delta = new - real(old[name].detach()).double().cpu().numpy()
        want = expected[name]
        additions = getattr(expected, "additions", {}).get(name, 1.0)
        bound = (
            bounds.get(name, np.zeros_like(want))
            + additions * u * (np.abs(new) + np.abs(want)) * (1 + 2 * u)
            + np.finfo(np.float64).tiny
        )
        excess = np.abs(delta - want) - bound
        assert np.all(excess <= 0), (
            f"{name}: update off the reference beyond the bound at {int((excess > 0).sum())} entries "
            f"(worst difference {float(np.abs(delta - want).max()):.3e})"
        )
