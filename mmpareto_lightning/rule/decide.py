"""The rule's decisions, from per-tensor Gram matrices to per-tensor coefficients: ``h = sum_i c_i g_i``.

Everything here is float64 arithmetic on a few numbers per tensor and per encoder, with branches as
``torch.where``: no value goes to the host, and the number of operations depends neither on the number
of tensors nor on the number of encoders (every encoder of one call is decided in the same operations,
batched). Every value is homogeneous of degree 0 in the Gram entries (ratios), so a common power-of-two
scale of the gradients changes nothing.

Denominators are clamped to the smallest normal float64 instead of being guarded: where the value is 0
the numerator is 0 too (or the quotient is not selected).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmpareto_lightning.rule.config import FLOOR_RATIO, RuleConfig, RuleStats
from mmpareto_lightning.rule.constants import cached_tensor
from mmpareto_lightning.rule.min_norm import min_norm_simplex

__all__ = ["decide"]

_TINY = torch.finfo(torch.float64).tiny


def decide(
    gram_t: Tensor, counts: Sequence[int], config: RuleConfig, limit: float | Tensor
) -> tuple[Tensor, list[RuleStats]]:
    """Coefficients ``(K, T)`` and every encoder's statistics.

    Args:
        gram_t: ``(T, K, K)`` float64 Gram matrices, the tensors of the encoders one after another.
        counts: the number of tensors of each encoder (they sum to ``T``).
        config: the rule's settings.
        limit: the largest magnitude the gradients' dtype holds (times the gradients' common scale), for
            :attr:`RuleStats.fits`.
    """
    n, k = gram_t.shape[0], gram_t.shape[1]
    device = gram_t.device
    e = len(counts)
    if e == 1:
        gram = gram_t.sum(0, keepdim=True)  # (E, K, K)
        lengths = owner = None
    else:
        lengths = cached_tensor(
            ("lengths", tuple(counts), device), lambda: torch.tensor(list(counts), device=device)
        )
        owner = cached_tensor(
            ("owner", tuple(counts), device),
            lambda: torch.repeat_interleave(torch.arange(e, device=device), lengths, output_size=n),
        )
        gram = torch.segment_reduce(gram_t, "sum", lengths=lengths, axis=0, unsafe=True)

    if k == 2:
        official, exact, conflict, cos_beta = _two_objectives(gram)
    else:
        conflict = (gram <= 0).triu(1).flatten(1).any(1)
        entries = gram.flatten(1)  # G00, G01, ..., G11 at k + 1
        cos_beta = entries[:, 1] / (entries[:, 0] * entries[:, k + 1]).sqrt().clamp_min(_TINY)
        official = exact = min_norm_simplex(gram)
        cos_beta = cos_beta.clamp(-1.0, 1.0)
    # Cauchy-Schwarz holds for the exact Gram entries; the clamp keeps round-off inside [-1, 1].
    if config.strategy == "uniform":
        weights = torch.ones_like(official)
    elif config.strategy == "multimodal_only":
        weights = cached_tensor(
            ("first", k, device), lambda: torch.eye(k, dtype=torch.float64, device=device)[0]
        )
        weights = weights.expand(e, k)
    elif config.strategy == "pareto":
        weights = k * official
    else:
        weights = torch.where(conflict[:, None], k * official, _one(device))

    # Pareto stationarity: the exact min-norm point is ~0 relative to the largest gradient.
    value = (exact[:, :, None] * gram * exact[:, None, :]).sum((1, 2))
    largest = torch.diagonal(gram, dim1=1, dim2=2).amax(1)
    stationary = conflict & (value < config.stationarity_tol**2 * largest)

    per_tensor = weights if owner is None else weights.index_select(0, owner)  # (T or 1, K)
    conflict_t = conflict if owner is None else conflict.index_select(0, owner)
    # sum_i |w_i| ||g_i||_t: the scale of the floor and of the largest value h_t can take.
    spread = (torch.diagonal(gram_t, dim1=1, dim2=2).sqrt() * per_tensor.abs()).sum(1)
    gamma = config.effective_gamma
    if config.strategy != "mmpareto":
        factors = torch.ones_like(spread)
        rescale = torch.ones_like(cos_beta)
    else:
        # Per tensor: ||sum_i g_i||^2, ||h'||^2 and the floor of ||h'||^2 (see config.FLOOR_RATIO).
        target = gram_t.sum((1, 2))
        combined = (gram_t * (per_tensor[:, :, None] * per_tensor[:, None, :])).sum((1, 2))
        floor = spread.square() * FLOOR_RATIO**2
        if config.rescale == "per_tensor":
            usable = (combined > floor) & conflict_t
            factors = torch.where(
                usable, (target / combined.clamp_min(_TINY)).clamp_min(1.0).sqrt(), _one(device)
            )
            # ||h|| / (gamma ||h'||) over each encoder; 1 where h' is 0.
            square = combined.clamp_min(0)
            sums = _per_encoder(torch.stack([factors.square() * square, square], 1), lengths)
            rescale = ((sums[:, 0] + _TINY) / (sums[:, 1] + _TINY)).sqrt()
        else:
            sums = _per_encoder(torch.stack([combined, floor, target], 1), lengths)
            usable = (sums[:, 0] > sums[:, 1]) & conflict
            rescale = torch.where(usable, (sums[:, 2] / sums[:, 0].clamp_min(_TINY)).sqrt(), _one(device))
            factors = rescale if owner is None else rescale.index_select(0, owner)
            factors = factors.expand(n)
    coefficients = (gamma * per_tensor).t() * factors  # (K, T)
    # h_t and every partial sum of its write are bounded by sum_i |c_i| ||g_i||_t; each coefficient is
    # applied in the gradients' precision (float32 at least) and must fit it too.
    reach = torch.stack([gamma * factors * spread, coefficients.abs().amax(0)], 1)
    largest_reach = _per_encoder(reach, lengths, "max")
    fits = (largest_reach[:, 0] < limit) & (largest_reach[:, 1] < _FLOAT32_LIMIT)
    # A non-finite input entry makes its own squared norm non-finite (float32 products cannot overflow
    # float64; float64 gradients are scaled first), and NaN propagates through amax.
    finite = largest * 0 == 0
    fields = (cos_beta, weights / k, conflict, stationary, rescale, finite, fits)
    stats = [RuleStats(*values) for values in zip(*(f.unbind(0) for f in fields), strict=True)]
    return coefficients, stats


def _one(device: torch.device) -> Tensor:
    return cached_tensor(("one", device), lambda: torch.ones((), dtype=torch.float64, device=device))


_FLOAT32_LIMIT = torch.finfo(torch.float32).max * (1 - 64 * torch.finfo(torch.float32).eps)


def _per_encoder(values: Tensor, lengths: Tensor | None, reduce: str = "sum") -> Tensor:
    """``(T, m)`` per-tensor values reduced over each encoder's tensors: ``(E, m)``."""
    if lengths is None:
        return values.sum(0, keepdim=True) if reduce == "sum" else values.amax(0, keepdim=True)
    return torch.segment_reduce(values, reduce, lengths=lengths, axis=0, unsafe=True)


# Official clamps (b >= a, then b >= c), then the exact minimiser's ends.
_ENDS = ((0.999, 0.001), (0.001, 0.999), (1.0, 0.0), (0.0, 1.0))


def _two_objectives(gram: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Official (clamped) and exact min-norm weights ``(E, 2)``, conflict and cos beta ``(E,)`` of two
    objectives, from one evaluation of the closed form per encoder.

    With ``a = g1.g1``, ``b = g1.g2``, ``c = g2.g2``: the official solver gives ``(0.999, 0.001)`` when
    ``b >= a``, ``(0.001, 0.999)`` when ``b >= c``, else ``((c - b) / D, (a - b) / D)`` with
    ``D = a + c - 2 b``; each weight from its own formula (``1 - alpha`` would round a weight of
    ``1e-15`` to zero). The exact weights replace the clamps by 1 and 0.
    """
    device = gram.device
    entries = gram.flatten(1)  # (E, 4): a, b, b, c
    b = entries[:, 1]
    swap = cached_tensor(("swap", device), lambda: torch.tensor([3, 0], device=device))
    numerators = entries.index_select(1, swap) - b[:, None]  # (c - b, a - b)
    interior = numerators / numerators.sum(1, keepdim=True).clamp_min(_TINY)
    at_or_below = numerators <= 0  # (b >= c, b >= a)
    b_ge_a, b_ge_c = at_or_below[:, 1:], at_or_below[:, :1]
    ends = [
        cached_tensor(
            ("end", i, device), lambda i=i: torch.tensor(_ENDS[i], dtype=torch.float64, device=device)
        )
        for i in range(4)
    ]
    official = torch.where(b_ge_a, ends[0], torch.where(b_ge_c, ends[1], interior))
    exact = torch.where(b_ge_a, ends[2], torch.where(b_ge_c, ends[3], interior))
    cos_beta = (b / (entries[:, 0] * entries[:, 3]).sqrt().clamp_min(_TINY)).clamp(-1.0, 1.0)
    return official, exact, b <= 0, cos_beta
