"""The MMPareto gradient-integration rule, on plain tensors.

Given the gradients ``g_1, ..., g_K`` that ``K`` objectives induce on one encoder (objective 0 is the
multimodal loss, objective 1 the encoder's own unimodal loss, any others follow), the rule returns the
integrated gradient ``h`` that replaces the encoder's gradient. See ``SPEC.md`` section 2:

* ``cos`` and the min-norm weights ``alpha`` are computed over the whole encoder;
* no conflict (every pairwise ``g_i . g_j > 0``): ``h' = sum_i g_i``;
* conflict: ``h' = K * sum_i alpha_i g_i`` with the min-norm ``alpha`` (two objectives: the official
  closed form with its 0.999 / 0.001 clamps; more: the exact simplex solver);
* rescale ``h'`` to the magnitude of ``sum_i g_i``, per parameter tensor and never shrinking (the
  authors' code) or over the whole encoder (the paper's formula), then ``h = gamma * h'``.

Everything the rule decides is a quadratic form of the per-tensor Gram matrices
``G[t, i, j] = <g_i[t], g_j[t]>`` (:mod:`.passes`): the rule reads the gradients once to get them, decides
in float64 on those small matrices, and writes ``h`` once. No value is read back to the host, so the
rule never stalls a GPU.

The core, :func:`integrate_tensor_lists`, takes one list of per-parameter tensors per objective;
:func:`integrate_gradients` is the same rule on *flat* gradients (the encoder's parameters laid end to
end, ``segments`` giving the sizes), which it splits into views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mmpareto_lightning.rule.min_norm import min_norm_simplex
from mmpareto_lightning.rule.passes import Pieces, tensor_grams, weighted_sum

__all__ = [
    "RESCALE_MODES",
    "STRATEGIES",
    "RuleConfig",
    "RuleStats",
    "integrate_gradient_lists",
    "integrate_gradients",
    "integrate_tensor_lists",
]

Strategy = Literal["mmpareto", "pareto", "uniform", "multimodal_only"]
RescaleMode = Literal["per_tensor", "per_encoder"]
STRATEGIES: tuple[str, ...] = ("mmpareto", "pareto", "uniform", "multimodal_only")
RESCALE_MODES: tuple[str, ...] = ("per_tensor", "per_encoder")


@dataclass(frozen=True)
class RuleConfig:
    """How the gradients of one encoder are integrated.

    Args:
        strategy: ``"mmpareto"`` (the method), ``"pareto"`` (conventional MGDA,
            ``h = K * sum_i alpha_i g_i`` on every step, the paper's ablation), ``"uniform"``
            (``h = sum_i g_i``, the usual baseline) or ``"multimodal_only"`` (``h = g_multimodal``, the
            one-joint-loss baseline: unimodal losses do not reach the encoder).
        rescale: ``"per_tensor"`` (official code: each parameter tensor is scaled by
            ``max(1, ||sum_i g_i||_t / ||h'||_t)``) or ``"per_encoder"`` (the paper's formula:
            ``h' / ||h'|| * ||sum_i g_i||`` over the whole encoder). Only used by ``"mmpareto"``.
        gamma: final scale ``gamma``. ``None`` picks the reference value: 1.5 for ``"mmpareto"`` with
            ``"per_tensor"`` rescale (the authors' code), 1.0 otherwise (the paper's formula and the
            baselines).
        stationarity_tol: a step counts as Pareto-stationary when the min-norm point
            ``||sum_i alpha_i g_i||`` is at most ``stationarity_tol`` times the largest ``||g_i||``.
    """

    strategy: Strategy = "mmpareto"
    rescale: RescaleMode = "per_tensor"
    gamma: float | None = None
    stationarity_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; choose one of {STRATEGIES}.")
        if self.rescale not in RESCALE_MODES:
            raise ValueError(f"Unknown rescale {self.rescale!r}; choose one of {RESCALE_MODES}.")
        if self.gamma is not None and not (self.gamma > 0 and self.gamma < float("inf")):
            raise ValueError(f"`gamma` must be a positive finite number, got {self.gamma!r}.")
        if not self.stationarity_tol >= 0:
            raise ValueError(f"`stationarity_tol` must be >= 0, got {self.stationarity_tol!r}.")

    @property
    def effective_gamma(self) -> float:
        """The ``gamma`` actually applied."""
        if self.gamma is not None:
            return float(self.gamma)
        return 1.5 if self.strategy == "mmpareto" and self.rescale == "per_tensor" else 1.0


class RuleStats(NamedTuple):
    """What the rule saw and did on one encoder in one step (float64 or bool tensors, 0-d except
    ``alphas``, on the gradients' device).

    Attributes:
        cos_beta: cosine between objective 0 (multimodal) and objective 1 (unimodal) gradients; 0 when
            either is zero.
        alphas: ``(K,)`` weights used: ``h' = K * sum_i alphas_i g_i`` (``1/K`` each without conflict).
        conflict: some pair of gradients has a non-positive dot product.
        stationary: the min-norm point is ~0 relative to the gradients (Pareto stationarity).
        rescale: ``||h|| / (gamma ||h'||)``, the magnitude enlargement (1 without conflict).
        finite: every gradient entry that entered the dot products was finite.
    """

    cos_beta: Tensor
    alphas: Tensor
    conflict: Tensor
    stationary: Tensor
    rescale: Tensor
    finite: Tensor


# The round-off floor of h'. ||h'||_t^2 = w^T G_t w is a difference of large terms when h' nearly
# cancels (opposite gradients). Each Gram entry adds products rounded to the gradients' precision
# (relative error <= eps / 2 each) in float32 partial sums of at most passes.PIECE products, so
# |dG_ij| <= c eps sum_e |g_ie g_je|, and then
#     |d(w^T G_t w)| <= sum_ij |w_i| |w_j| |dG_ij| <= c eps sum_e (sum_i |w_i g_ie|)^2
#                    <= c eps (sum_i |w_i| ||g_i||_t)^2.
# Measured on adversarial inputs (sizes 1 to 2**21; normal, positive and heavy-tailed entries), c is at
# most 4.5 for single entries, and the error of w^T G_t w itself stays below 1.0 eps (sum ...)^2
# (tests/test_rule.py::test_gram_round_off_is_far_below_the_floor). Below the floor, ||h'||_t is
# round-off and so is the direction of h' as it would be written: h' is then left as it is instead of
# being blown up to ||sum_i g_i||_t. With c = 8, the floor of ||h'||_t for float32 gradients is
# sqrt(8 * 2**-23) ~ 1e-3 of sum_i |w_i| ||g_i||_t, where rounding the gradients to float32 alone
# already moves h' by about 1e-4 of its norm. (A direct norm of h' would allow a floor of order eps,
# at the price of a second read pass and a second write pass.)
_FLOOR_FACTOR = 8.0
#: Maps this process's per-tensor Gram matrices to the ones the rule decides on (sharded training).
GramReduce = Callable[[Tensor], Tensor]
_HALF = (torch.float16, torch.bfloat16)
_TINY = torch.finfo(torch.float64).tiny


def integrate_tensor_lists(
    grads: Sequence[Sequence[Tensor]],
    config: RuleConfig | None = None,
    out: Sequence[Tensor] | None = None,
    gram_reduce: GramReduce | None = None,
) -> tuple[list[Tensor], RuleStats]:
    """Apply the rule to the per-parameter gradients of one encoder.

    The gradients are read once (per-tensor dot products, accumulated in float64) and ``h`` is written
    once; nothing is copied or flattened.

    Args:
        grads: ``K >= 2`` lists of ``T`` tensors, one list per objective (list 0 the multimodal loss,
            list 1 the unimodal loss), tensor ``t`` of every list the gradient of parameter ``t``.
        config: the rule's settings (default: the authors' MMPareto).
        out: optional ``T`` tensors to write ``h`` into; it may be one of the lists in ``grads`` (all of
            its tensors, e.g. the parameters' ``.grad``), which is read before it is overwritten. It must
            not overlap the inputs otherwise.
        gram_reduce: called on the ``(T, K, K)`` float64 per-tensor Gram matrices of the tensors given
            before any decision is taken, and returns the matrices to decide on. Sharded training passes
            local shards and a function that sums the matrices over the ranks holding the other shards
            (one all-reduce of ``T * K * K`` numbers): every rank then takes the decisions of the whole
            encoder and writes its own shard.

    Returns:
        The integrated gradient per parameter (the tensors of ``out`` when given) and the step's
        :class:`RuleStats`.

    Raises:
        ValueError: for fewer than two lists, an empty list, or tensors whose shapes, dtypes or devices
            differ across lists.

    Example::

        g_mm = torch.autograd.grad(loss_mm, encoder_params, retain_graph=True)
        g_uni = torch.autograd.grad(loss_uni, encoder_params, retain_graph=True)
        h, stats = integrate_tensor_lists([g_mm, g_uni], RuleConfig())
        for p, g in zip(encoder_params, h):
            p.grad = g
    """
    lists = [[_real_view(t) for t in g] for g in grads]
    real_out = None if out is None else [_real_view(t) for t in out]
    _check_lists(lists, real_out)
    result, stats = _integrate(lists, config or RuleConfig(), real_out, gram_reduce)
    if out is not None:
        return list(out), stats
    complex_in = [t.is_complex() for t in grads[0]]
    return [torch.view_as_complex(r) if c else r for r, c in zip(result, complex_in, strict=True)], stats


def _real_view(t: Tensor) -> Tensor:
    """Complex gradients as real ones: ``Re<a, b>`` is the dot product of ``view_as_real`` views, the
    inner product under which a complex parameter's gradient is the steepest ascent direction (PyTorch's
    convention), and the write through the view is the complex weighted sum."""
    return torch.view_as_real(t) if t.is_complex() else t


def _integrate(
    lists: list[list[Tensor]],
    config: RuleConfig,
    out: Sequence[Tensor] | None,
    gram_reduce: GramReduce | None = None,
) -> tuple[list[Tensor], RuleStats]:
    if lists[0][0].dtype in _HALF:
        # Half-precision gradients (``bf16-true`` training): integrate in float32, write back once.
        wide = [[t.float() for t in lst] for lst in lists]
        result, stats = _integrate(wide, config, wide[0], gram_reduce)
        target = list(out) if out is not None else [torch.empty_like(t) for t in lists[0]]
        torch._foreach_copy_(target, result)
        return target, stats
    dtype, pieces = lists[0][0].dtype, Pieces()
    grams = tensor_grams(lists, pieces)
    if gram_reduce is not None:
        grams = gram_reduce(grams)
    coefficients, stats = _decide(grams, config, torch.finfo(dtype).eps)
    return weighted_sum(lists, coefficients.to(dtype), out, pieces), stats


def _check_lists(lists: list[list[Tensor]], out: Sequence[Tensor] | None) -> None:
    if len(lists) < 2:
        raise ValueError(f"The rule integrates at least two gradients, got {len(lists)}.")
    if not lists[0]:
        raise ValueError("The gradient lists are empty: an encoder needs at least one parameter.")
    every = [*lists, *([list(out)] if out is not None else [])]
    shapes = [t.shape for t in lists[0]]
    kinds = {(t.dtype, t.device) for lst in every for t in lst}
    for i, lst in enumerate(every):
        if [t.shape for t in lst] != shapes or len(kinds) > 1:
            name = f"gradient list {i}" if i < len(lists) else "`out`"
            raise ValueError(
                f"{name} does not match gradient list 0 tensor by tensor, or the tensors differ in dtype "
                f"or device (shapes {[tuple(s) for s in shapes]}; {sorted(map(str, kinds))})."
            )


def _decide(gram_t: Tensor, config: RuleConfig, eps: float) -> tuple[Tensor, RuleStats]:
    """Per-tensor coefficients ``(K, T)`` of ``h = sum_i c_i g_i`` and the statistics, from the Gram
    matrices ``(T, K, K)`` of gradients with machine epsilon ``eps``.

    Everything is float64 arithmetic on a few numbers per tensor, with branches as ``torch.where``.
    Denominators are clamped to the smallest normal float64 instead of being guarded: Gram entries of
    float32 gradients are either 0 or far above it, so a clamp changes no positive value, and where
    the value is 0 the numerator is 0 too (or the quotient is not selected).
    """
    n, k = gram_t.shape[0], gram_t.shape[1]
    gram = gram_t.sum(0)
    diag = torch.diagonal(gram)
    entries = gram.view(-1).unbind()
    v11, v12, v22 = entries[0], entries[1], entries[k + 1]
    finite = gram.sum() * 0 == 0  # inf * 0 and nan * 0 are nan
    conflict = v12 <= 0 if k == 2 else (gram <= 0).triu(1).any()
    cos_beta = v12 / (v11.sqrt() * v22.sqrt()).clamp_min(_TINY)
    if k == 2:
        official, exact = _min_norm_2(v11, v12, v22)
    else:
        official = exact = min_norm_simplex(gram)
    if config.strategy == "uniform":
        weights = torch.ones_like(diag)
    elif config.strategy == "multimodal_only":
        weights = torch.zeros_like(diag)
        weights[0].fill_(1.0)  # fill_, not "= 1.0", which copies a host scalar
    elif config.strategy == "pareto":
        weights = k * official
    else:
        weights = torch.where(conflict, k * official, 1.0)
    max_square = diag.max()
    stationary = (
        conflict & (max_square > 0) & (exact @ gram @ exact <= config.stationarity_tol**2 * max_square)
    )

    scaled = config.effective_gamma * weights
    if config.strategy != "mmpareto":
        rescale = torch.ones_like(v11)
        coefficients = scaled[:, None].expand(k, n)
    else:
        # Per tensor: ||sum_i g_i||^2, ||h'||^2 and the round-off floor of ||h'||^2 (see _FLOOR_FACTOR).
        target = gram_t.sum((1, 2))
        combined = (gram_t * (weights[:, None] * weights)).sum((1, 2))
        spread = torch.diagonal(gram_t, dim1=1, dim2=2).sqrt() @ weights.abs()
        floor = spread.square() * (_FLOOR_FACTOR * eps)
        if config.rescale == "per_tensor":
            usable = (combined > floor) & conflict
            factors = torch.where(usable, (target / combined.clamp_min(_TINY)).clamp_min(1.0).sqrt(), 1.0)
            # ||h|| / (gamma ||h'||) over the encoder; 1 when h' is 0.
            square = combined.clamp_min(0)
            rescale = ((factors.square() @ square + _TINY) / (square.sum() + _TINY)).sqrt()
        else:
            total = combined.sum()
            usable = (total > floor.sum()) & conflict
            rescale = torch.where(usable, (target.sum() / total.clamp_min(_TINY)).sqrt(), 1.0)
            factors = rescale.expand(n)
        coefficients = scaled[:, None] * factors
    stats = RuleStats(
        cos_beta=cos_beta,
        alphas=weights / k,
        conflict=conflict,
        stationary=stationary,
        rescale=rescale,
        finite=finite,
    )
    return coefficients, stats


def _min_norm_2(v11: Tensor, v12: Tensor, v22: Tensor) -> tuple[Tensor, Tensor]:
    """Official (clamped, as :func:`~mmpareto_lightning.rule.min_norm.min_norm_2`) and exact min-norm weights
    of two gradients, from one evaluation of the closed form."""
    denominator = (v11 + v22 - 2 * v12).clamp_min(_TINY)
    # Each weight from its own formula: 1 - alpha would round a weight of 1e-15 to zero. The interior
    # point is used by the official weights only when v12 < min(v11, v22), where the denominator is > 0.
    interior = (torch.stack([v22, v11]) - v12) / denominator
    # linspace ends exactly on 0.001 and needs no host-to-device copy (unlike torch.tensor).
    high = torch.linspace(0.999, 0.001, 2, dtype=v11.dtype, device=v11.device)
    official = torch.where(v12 >= v11, high, torch.where(v12 >= v22, high.flip(0), interior))
    # The exact minimiser is the interior point clamped to the simplex. (Its value only counts under a
    # conflict, where the denominator is > 0 unless both gradients are 0.)
    return official, interior.clamp(0.0, 1.0)


def integrate_gradients(
    grads: Sequence[Tensor],
    config: RuleConfig | None = None,
    segments: Sequence[int] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, RuleStats]:
    """Apply the rule to the flat gradients of one encoder.

    A thin wrapper of :func:`integrate_tensor_lists`: the flat gradients are split into views along
    ``segments`` (no copies).

    Args:
        grads: ``K >= 2`` one-dimensional tensors of equal size: the encoder's gradient under each
            objective, objective 0 the multimodal loss and objective 1 the unimodal loss.
        config: the rule's settings (default: the authors' MMPareto).
        segments: sizes of the parameter tensors laid end to end in each flat gradient; they must sum
            to the flat size. ``None`` treats the whole vector as one tensor.
        out: optional tensor to write ``h`` into; it may be one of ``grads`` (the inputs are read
            before it is written).

    Returns:
        The integrated gradient ``h`` (``out`` when given) and the :class:`RuleStats` of the step.

    Raises:
        ValueError: for fewer than two gradients, tensors that are not 1-D or differ in size, or
            segments that do not add up.

    Example::

        g_mm, g_uni = torch.randn(1000), torch.randn(1000)
        h, stats = integrate_gradients([g_mm, g_uni], RuleConfig(strategy="mmpareto"))
    """
    k = len(grads)
    if k < 2:
        raise ValueError(f"The rule integrates at least two gradients, got {k}.")
    numel = grads[0].numel()
    for i, g in enumerate(grads):
        if g.ndim != 1 or g.numel() != numel:
            raise ValueError(
                f"All gradients must be 1-D of the same size; gradient {i} has shape {tuple(g.shape)}, "
                f"gradient 0 has {numel} elements. Use integrate_tensor_lists for per-parameter tensors."
            )
    sizes = [numel] if segments is None else [int(s) for s in segments]
    if sum(sizes) != numel:
        raise ValueError(f"`segments` add up to {sum(sizes)}, but the gradients have {numel} elements.")
    result = out if out is not None else torch.empty_like(grads[0])
    if len({(g.dtype, g.device) for g in [*grads, result]}) > 1 or result.shape != grads[0].shape:
        raise ValueError("The gradients and `out` must have one size, dtype and device.")
    # Views of equal flat tensors match tensor by tensor: no per-tensor checks needed.
    views = [list(_real_view(g).view(-1).split(_real_sizes(g, sizes))) for g in grads]
    _, stats = _integrate(
        views, config or RuleConfig(), list(_real_view(result).view(-1).split(_real_sizes(result, sizes)))
    )
    return result, stats


def _real_sizes(flat: Tensor, sizes: list[int]) -> list[int]:
    return [2 * s for s in sizes] if flat.is_complex() else sizes


def integrate_gradient_lists(
    grads: Sequence[Sequence[Tensor]], config: RuleConfig | None = None
) -> tuple[list[Tensor], RuleStats]:
    """Apply the rule to per-parameter gradients into new tensors (:func:`integrate_tensor_lists`
    without ``out``; kept for compatibility).

    Args:
        grads: ``K`` lists, each with one gradient tensor per encoder parameter (same shapes across
            lists); list 0 belongs to the multimodal loss, list 1 to the unimodal loss.
        config: the rule's settings.

    Returns:
        One integrated gradient per parameter, and the step's :class:`RuleStats`.
    """
    return integrate_tensor_lists(grads, config)
