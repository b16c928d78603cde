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

Everything is a tensor operation: no value is read back to the host, so the rule never stalls a GPU.
The rule works on *flat* gradients (one 1-D tensor per objective, the encoder's parameters laid end to
end); ``segments`` gives the sizes of the parameter tensors inside that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mmpareto_lightning.min_norm import min_norm_2, min_norm_simplex

__all__ = [
    "RESCALE_MODES",
    "STRATEGIES",
    "RuleConfig",
    "RuleStats",
    "integrate_gradient_lists",
    "integrate_gradients",
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
    """What the rule saw and did on one encoder in one step (0-d tensors, on the gradients' device).

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


def _gram(grads: Sequence[Tensor]) -> Tensor:
    k = len(grads)
    # Every entry, the diagonal included, is a dot product, so identical gradients give bit-identical
    # entries and the solver's ``v12 >= v11`` test sees them as identical.
    dots = {(i, j): torch.dot(grads[i], grads[j]) for i in range(k) for j in range(i, k)}
    return torch.stack([torch.stack([dots[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)])


def _exact_min_norm_value(gram: Tensor) -> Tensor:
    """``||sum_i alpha_i g_i||`` at the exact (unclamped) min-norm weights, in float64."""
    g = gram.to(torch.float64)
    if g.shape[0] == 2:
        v11, v12, v22 = g[0, 0], g[0, 1], g[1, 1]
        denominator = v11 + v22 - 2 * v12
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        a = torch.where(denominator > 0, ((v22 - v12) / safe).clamp(0, 1), torch.ones_like(v11))
        alpha = torch.stack([a, 1 - a])
    else:
        alpha = min_norm_simplex(g)
    return (alpha @ g @ alpha).clamp_min(0).sqrt()


def _segment_norms(flat: Tensor, segments: Sequence[int]) -> Tensor:
    if len(segments) == 1:
        return torch.linalg.vector_norm(flat).reshape(1)
    return torch.stack(torch._foreach_norm(list(torch.split(flat, list(segments)))))


def integrate_gradients(
    grads: Sequence[Tensor],
    config: RuleConfig | None = None,
    segments: Sequence[int] | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, RuleStats]:
    """Apply the rule to the flat gradients of one encoder.

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
    config = config or RuleConfig()
    if grads and grads[0].dtype in (torch.float16, torch.bfloat16):
        # Half-precision gradients (``bf16-true`` training): integrate in float32, write back.
        h, stats = integrate_gradients([g.float() for g in grads], config, segments)
        result = out if out is not None else torch.empty_like(grads[0])
        return result.copy_(h), stats
    k = len(grads)
    if k < 2:
        raise ValueError(f"The rule integrates at least two gradients, got {k}.")
    numel = grads[0].numel()
    for i, g in enumerate(grads):
        if g.ndim != 1 or g.numel() != numel:
            raise ValueError(
                f"All gradients must be 1-D of the same size; gradient {i} has shape {tuple(g.shape)}, "
                f"gradient 0 has {numel} elements. Flatten them first (see integrate_gradient_lists)."
            )
    segments = [numel] if segments is None else [int(s) for s in segments]
    if sum(segments) != numel:
        raise ValueError(f"`segments` add up to {sum(segments)}, but the gradients have {numel} elements.")

    gram = _gram(grads)
    finite = torch.isfinite(gram).all()
    norms = torch.diagonal(gram).clamp_min(0).sqrt()
    pair_dots = gram[torch.triu_indices(k, k, offset=1, device=gram.device).unbind()]
    conflict = (pair_dots <= 0).any()
    denominator = norms[0] * norms[1]
    cos_beta = torch.where(denominator > 0, gram[0, 1] / torch.where(denominator > 0, denominator, 1.0), 0.0)

    ones = torch.ones(k, dtype=gram.dtype, device=gram.device)
    if config.strategy == "uniform":
        weights = ones
    elif config.strategy == "multimodal_only":
        weights = torch.zeros_like(ones)
        weights[0].fill_(1.0)
    else:
        if k == 2:
            mgda = min_norm_2(gram[0, 0], gram[0, 1], gram[1, 1]).to(gram.dtype)
        else:
            mgda = min_norm_simplex(gram)
        weights = k * mgda if config.strategy == "pareto" else torch.where(conflict, k * mgda, ones)
    alphas = weights / k
    weights = weights.to(grads[0].dtype)

    # ``target`` holds sum_i g_i until its norms are taken, then it is reused to hold h'.
    target = grads[0].clone()
    for g in grads[1:]:
        target.add_(g)
    target_norms = _segment_norms(target, segments)
    combined = target
    combined.copy_(grads[0]).mul_(weights[0])
    for i in range(1, k):
        combined.addcmul_(grads[i], weights[i])
    combined_norms = _segment_norms(combined, segments)

    gamma = config.effective_gamma
    if config.strategy == "mmpareto":
        # Below the round-off floor of the weighted sum, h' is noise (e.g. exactly opposite gradients):
        # enlarging it would amplify that noise to the size of sum_i g_i, so it is left as it is.
        eps = torch.finfo(grads[0].dtype).eps
        seg_norms = torch.stack([_segment_norms(g, segments) for g in grads]).to(combined_norms.dtype)
        floors = 64 * eps * (weights.abs().to(seg_norms.dtype)[:, None] * seg_norms).sum(dim=0)
        if config.rescale == "per_tensor":
            usable = combined_norms > floors
            ratio = target_norms / torch.where(usable, combined_norms, 1.0)
            factors = torch.where(usable, ratio.clamp_min(1.0), 1.0)
        else:
            total, total_target = combined_norms.norm(), target_norms.norm()
            usable = total > floors.norm()
            factor = torch.where(usable, total_target / torch.where(usable, total, 1.0), 1.0)
            factors = factor.expand(len(segments))
        factors = torch.where(conflict, factors, 1.0)
    else:
        factors = torch.ones_like(combined_norms)

    scaled = factors * gamma
    result = out if out is not None else combined
    if len(segments) == 1 or config.rescale == "per_encoder" or config.strategy != "mmpareto":
        torch.mul(combined, scaled[0], out=result)
    else:
        if result is not combined:
            result.copy_(combined)
        torch._foreach_mul_(list(torch.split(result, segments)), list(scaled.unbind()))

    combined_total = combined_norms.norm()
    rescale = torch.where(combined_total > 0, (factors * combined_norms).norm() / combined_total, 1.0)
    max_norm = norms.max()
    stationary = (
        conflict
        & (max_norm > 0)
        & (_exact_min_norm_value(gram) <= config.stationarity_tol * max_norm.to(torch.float64))
    )
    stats = RuleStats(
        cos_beta=cos_beta,
        alphas=alphas,
        conflict=conflict,
        stationary=stationary,
        rescale=rescale,
        finite=finite,
    )
    return result, stats


def integrate_gradient_lists(
    grads: Sequence[Sequence[Tensor]], config: RuleConfig | None = None
) -> tuple[list[Tensor], RuleStats]:
    """Apply the rule to per-parameter gradients, e.g. the output of ``torch.autograd.grad``.

    Convenience wrapper of :func:`integrate_gradients` for plain PyTorch code: flattens the ``K``
    gradient lists (one copy each), integrates, and splits the result back into tensors shaped like the
    parameters.

    Args:
        grads: ``K`` lists, each with one gradient tensor per encoder parameter (same shapes across
            lists); list 0 belongs to the multimodal loss, list 1 to the unimodal loss.
        config: the rule's settings.

    Returns:
        One integrated gradient per parameter, and the step's :class:`RuleStats`.
    """
    if len(grads) < 2:
        raise ValueError(f"The rule integrates at least two gradient lists, got {len(grads)}.")
    shapes = [g.shape for g in grads[0]]
    for i, gl in enumerate(grads):
        if [g.shape for g in gl] != shapes:
            raise ValueError(f"Gradient list {i} does not have the shapes of gradient list 0: {shapes}.")
    flats = [torch.cat([g.reshape(-1) for g in gl]) for gl in grads]
    segments = [g.numel() for g in grads[0]]
    flat, stats = integrate_gradients(flats, config, segments=segments)
    return [t.view(shape) for t, shape in zip(torch.split(flat, segments), shapes, strict=True)], stats


def integrate_tensor_lists(
    grads: Sequence[Sequence[Tensor]], config: RuleConfig | None = None, out: Sequence[Tensor] | None = None
) -> tuple[list[Tensor], RuleStats]:
    """TEMPORARY adapter (replaced by the per-tensor rule): flatten, integrate, write back."""
    segments = [g.numel() for g in grads[0]]
    flats = [torch.cat([g.reshape(-1) for g in gl]) for gl in grads]
    flat, stats = integrate_gradients(flats, config, segments=segments)
    pieces = [t.view_as(g) for t, g in zip(torch.split(flat, segments), grads[0], strict=True)]
    if out is None:
        return pieces, stats
    torch._foreach_copy_(list(out), pieces)
    return list(out), stats
