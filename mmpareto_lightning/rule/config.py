"""The rule's settings (:class:`RuleConfig`), what it reports per encoder and step (:class:`RuleStats`),
and its one numerical constant (:data:`FLOOR_RATIO`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

__all__ = ["FLOOR_RATIO", "RESCALE_MODES", "STRATEGIES", "RuleConfig", "RuleStats"]

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
        fits: the integrated gradient is certain to fit the gradients' dtype: for every tensor ``t``,
            ``sum_i |c_i| ||g_i||_t`` (which bounds every entry of ``h_t`` and every partial sum of its
            write) is below the dtype's largest value, and so is every coefficient ``c_i``. ``False``
            (gradients of order ``1e38 / K`` in float32, or one objective's gradient on a tensor 1e38
            times smaller than another's) means ``h`` cannot be written: the step must be skipped, though
            every input was finite.
    """

    cos_beta: Tensor
    alphas: Tensor
    conflict: Tensor
    stationary: Tensor
    rescale: Tensor
    finite: Tensor
    fits: Tensor


# The floor of h' (per tensor t, with spread_t = sum_i |w_i| ||g_i||_t).
#
# h is written in the gradients' precision: a multiply and one multiply-add per further objective, each
# entry rounded at most 2K + 1 times (the coefficient included), so the written h'_t is off the exact
# sum_i w_i g_i by at most (2K + 1) u spread_t in norm (u: unit round-off, 2**-24 for float32). Enlarging
# h'_t by ||sum_i g_i||_t / ||h'_t|| enlarges that error too; where h'_t nearly cancels (the objectives'
# gradients nearly opposite on that tensor) it would be blown up to the size of the step. So h'_t is
# enlarged only where ||h'_t|| > FLOOR_RATIO * spread_t: there the written h_t is within
# (2K + 1) u / FLOOR_RATIO of the exact one (5e-4 relative for float32 and K = 2, whatever the
# enlargement), and below it h'_t is left as it is (a tensor at Pareto stationarity, or next to it; the
# authors' code would enlarge it by up to 1 / FLOOR_RATIO or more).
#
# The decision itself is exact to float64 round-off: ||h'_t||^2 = w^T G_t w errs by at most
# sum_ij |w_i||w_j||dG_ij| <= passes.gram_error_bound(numel_t) spread_t^2 (products exact), under
# 2**-23 spread_t^2 for tensors up to 2**30 entries, far below FLOOR_RATIO^2 = 2**-20.
FLOOR_RATIO = 2.0**-10
