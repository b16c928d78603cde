"""An independent float64 re-derivation of MMPareto from the formulas in SPEC.md (section 2), and the
round-off bounds that the tests hold the package to.

Deliberately written differently from the package: per-parameter Python lists, NumPy float64, exactly
rounded dot products (``math.fsum`` of products that are exact in float64), explicit branches, an own
min-norm solver, no shared code. The tolerances are not numbers that passed once: each follows from a
bound stated here (the package's Gram round-off, the write's round-off, and the decisions' sensitivity
to both, measured by perturbing the exact Gram entries by the most the bound allows).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

#: The floor of the rule's enlargement, as the README states it (not imported from the package).
FLOOR_RATIO = 2.0**-10
U64 = 2.0**-53
#: The package's simplex solver (K > 2) is exact for G + SOLVER_RIDGE tr(G) I, as its docstring states.
SOLVER_RIDGE = 1e-12


def unit_round_off(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def underflow_round_off(dtype: torch.dtype) -> float:
    """Absolute error of one rounding into the subnormal range: half the smallest subnormal."""
    info = torch.finfo(dtype)
    return float(info.smallest_normal) * float(info.eps) / 2


def _np(tensors):
    return [t.detach().double().cpu().numpy().reshape(-1) for t in tensors]


def exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of float32 (or narrower) vectors, correctly rounded: their products are exact in
    float64 (they are also within its range), and ``math.fsum`` rounds their sum once."""
    return math.fsum((a * b).tolist())


def official_alphas(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """Sener & Koltun two-vector solver as in MMPareto's min_norm_solvers.py (both weights)."""
    if v12 >= v11:
        return 0.999, 0.001
    if v12 >= v22:
        return 0.001, 0.999
    # Both weights from their own closed form: 1 - a would lose a weight of 1e-15 to round-off.
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12)), (v11 - v12) / (v11 + v22 - 2 * v12)


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """min_{alpha in simplex} alpha^T G alpha by enumerating the supports (NumPy least squares on the KKT
    system of each), the best feasible point: an own solver, not the package's."""
    k = gram.shape[0]
    scale = max(np.trace(gram), 1e-300)
    best, best_value = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = gram[np.ix_(s, s)] / scale
            system[:size, size] = -1.0
            system[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
            if np.any(solution < -1e-12):
                continue
            alpha = np.zeros(k)
            alpha[s] = np.clip(solution, 0, None)
            alpha /= alpha.sum()
            value = alpha @ gram @ alpha
            if value < best_value - 1e-15 * scale:
                best, best_value = alpha, value
    assert best is not None
    return best


def kkt_alpha_is_optimal(gram: np.ndarray, alpha: np.ndarray, tol: float = 1e-7) -> bool:
    """Certificate for min_{alpha in simplex} alpha^T G alpha: (G alpha)_i >= alpha^T G alpha for all i."""
    value = alpha @ gram @ alpha
    grad = gram @ alpha
    scale = max(np.abs(gram).max(), 1e-300)
    return bool(
        np.all(alpha >= -1e-9) and abs(alpha.sum() - 1) < 1e-9 and np.all(grad >= value - tol * scale)
    )


def exact_grams(per_objective: list[list[torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor Gram matrices ``(T, K, K)``, correctly rounded, and ``sum_e |g_ie g_je|``."""
    tensors = [_np(lst) for lst in per_objective]
    k, n = len(tensors), len(tensors[0])
    gram = np.zeros((n, k, k))
    absolute = np.zeros((n, k, k))
    for t in range(n):
        for i in range(k):
            for j in range(i, k):
                a, b = tensors[i][t], tensors[j][t]
                gram[t, i, j] = gram[t, j, i] = exact_dot(a, b)
                absolute[t, i, j] = absolute[t, j, i] = exact_dot(np.abs(a), np.abs(b))
    return gram, absolute


def decide(
    gram_t: np.ndarray,
    strategy: str = "mmpareto",
    rescale: str = "per_tensor",
    alpha_k: np.ndarray | None = None,
) -> dict:
    """The rule's decisions from per-tensor Gram matrices: weights ``w`` (``h' = sum_i w_i g_i``), the
    per-tensor enlargement ``factors``, cos beta, conflict, whether each tensor's h' clears the floor."""
    k = gram_t.shape[1]
    gram = gram_t.sum(axis=0)
    n0, n1 = math.sqrt(max(gram[0, 0], 0)), math.sqrt(max(gram[1, 1], 0))
    cos = gram[0, 1] / (n0 * n1) if n0 > 0 and n1 > 0 else 0.0
    conflict = any(gram[i, j] <= 0 for i in range(k) for j in range(i + 1, k))
    if k == 2:
        mgda = np.array(official_alphas(gram[0, 0], gram[0, 1], gram[1, 1]))
    else:
        mgda = np.asarray(alpha_k, dtype=np.float64) if alpha_k is not None else min_norm_weights(gram)

    if strategy == "uniform":
        weights = np.ones(k)
    elif strategy == "multimodal_only":
        weights = np.zeros(k)
        weights[0] = 1.0
    elif strategy == "pareto" or conflict:
        weights = k * mgda
    else:
        weights = np.ones(k)

    n = gram_t.shape[0]
    combined = np.array([weights @ gram_t[t] @ weights for t in range(n)])
    summed = np.array([gram_t[t].sum() for t in range(n)])
    spread = np.array([np.abs(weights) @ np.sqrt(np.clip(np.diag(gram_t[t]), 0, None)) for t in range(n)])
    floors = FLOOR_RATIO * spread
    factors = np.ones(n)
    if strategy == "mmpareto" and conflict:
        if rescale == "per_tensor":
            for t in range(n):
                if math.sqrt(max(combined[t], 0)) > floors[t]:
                    factors[t] = max(1.0, math.sqrt(max(summed[t], 0.0) / combined[t]))
        elif math.sqrt(max(combined.sum(), 0)) > np.linalg.norm(floors):
            factors[:] = math.sqrt(max(summed.sum(), 0.0) / combined.sum())
    return {"cos": cos, "conflict": conflict, "weights": weights, "factors": factors}


def reference_rule(
    per_objective: list[list[torch.Tensor]],
    strategy: str = "mmpareto",
    rescale: str = "per_tensor",
    gamma: float | None = None,
    alpha_k: np.ndarray | None = None,
) -> tuple[list[np.ndarray], dict]:
    """Integrated gradient per parameter tensor (float64), and what was decided.

    per_objective[i][t]: gradient of objective i (0 multimodal, 1 unimodal, ...) for parameter tensor t.
    alpha_k: for K > 2, min-norm weights to use (default: this module's own solver).
    """
    tensors = [_np(lst) for lst in per_objective]
    k = len(tensors)
    if gamma is None:
        gamma = 1.5 if (strategy == "mmpareto" and rescale == "per_tensor") else 1.0
    gram_t, absolute = exact_grams(per_objective)
    info = decide(gram_t, strategy, rescale, alpha_k)
    weights, factors = info["weights"], info["factors"]
    result = [
        gamma * factors[t] * sum(weights[i] * tensors[i][t] for i in range(k)) for t in range(len(tensors[0]))
    ]
    info.update(gram=gram_t.sum(axis=0), gram_t=gram_t, absolute=absolute, gamma=gamma)
    info.update(strategy=strategy, rescale=rescale, alpha_k=alpha_k)
    return result, info


def gram_error_bound(numel: int) -> float:
    """The package's stated bound on a Gram entry's error relative to ``sum_e |g_ie g_je|`` (restated, not
    imported): exact products, any float64 summation order of ``numel`` terms."""
    return max(numel - 1, 0) * U64 * (1 + 1e-6)


def decision_sensitivity(info: dict, numels: list[int], mgda_fixed: bool = False) -> dict:
    """How far the decisions can move when every Gram entry errs by the most the bound allows.

    To first order the decisions are linear in the Gram entries' errors, and the worst case over the box
    of allowed errors is the sum over entries of each entry's effect at its bound: every entry of every
    tensor is moved by +- ``gram_error_bound(numel_t) * sum_e |g_ie g_je|`` (both triangles together),
    the decisions recomputed, and the largest changes added up. Where an allowed error crosses a branch
    (a clamp, the conflict sign, the floor), the jump is included: the decision is ill-conditioned
    there and no tighter bound holds. ``mgda_fixed`` keeps given K > 2 weights (``alpha_k``) fixed.
    """
    gram_t, absolute = info["gram_t"], info["absolute"]
    n, k = gram_t.shape[0], gram_t.shape[1]
    alpha_k = info["alpha_k"] if mgda_fixed else None
    base = decide(gram_t, info["strategy"], info["rescale"], alpha_k)
    d_weights, d_factors, d_cos = np.zeros(k), np.zeros(n), 0.0
    for t in range(n):
        delta = gram_error_bound(numels[t])
        for i in range(k):
            for j in range(i, k):
                step = delta * absolute[t, i, j]
                if step == 0:
                    continue
                worst_w, worst_f, worst_c = np.zeros(k), np.zeros(n), 0.0
                for sign in (1.0, -1.0):
                    moved = gram_t.copy()
                    moved[t, i, j] += sign * step
                    if i != j:
                        moved[t, j, i] += sign * step
                    out = decide(moved, info["strategy"], info["rescale"], alpha_k)
                    worst_w = np.maximum(worst_w, np.abs(out["weights"] - base["weights"]))
                    worst_f = np.maximum(worst_f, np.abs(out["factors"] - base["factors"]))
                    worst_c = max(worst_c, abs(out["cos"] - base["cos"]))
                d_weights += worst_w
                d_factors += worst_f
                d_cos += worst_c
    if k > 2 and alpha_k is None:
        # The package's simplex solver regularises the diagonal (see SOLVER_RIDGE).
        moved = gram_t.copy()
        moved[0] += SOLVER_RIDGE * np.trace(gram_t.sum(axis=0)) * np.eye(k)
        out = decide(moved, info["strategy"], info["rescale"], alpha_k)
        d_weights += np.abs(out["weights"] - base["weights"])
        d_factors += np.abs(out["factors"] - base["factors"])
    return {"weights": d_weights, "factors": d_factors, "cos": d_cos}


def h_bound(per_objective: list[list[torch.Tensor]], info: dict, sensitivity: dict) -> list[np.ndarray]:
    """Entrywise bound on ``|h_package - h_reference|``.

    * The write: ``h_e = sum_i c_i g_ie`` in the gradients' precision (coefficients rounded to it, a
      multiply, one multiply-add per further objective): at most ``(2K + 1) (u sum_i |c_i g_ie| + eta)``,
      with ``c_i = gamma F_t w_i``, ``u`` the gradients' unit round-off and ``eta`` half their smallest
      subnormal (a rounding into the subnormal range errs absolutely, not relatively); float32's for
      narrower dtypes, which are integrated in float32, plus one final rounding to their own
      ``u |h_e| + eta``.
    * The decisions: ``gamma (dF_t |sum_i w_i g_ie| + F_t sum_i dw_i |g_ie| + dF_t sum_i dw_i |g_ie|)``
      with ``dw``, ``dF`` from :func:`decision_sensitivity`, plus float64 round-off of the decisions
      themselves (a few hundred ``2**-53`` relative).
    """
    tensors = [_np(lst) for lst in per_objective]
    dtype = per_objective[0][0].dtype
    narrow = dtype in (torch.float16, torch.bfloat16)
    u = unit_round_off(torch.float32 if narrow else dtype)
    k = len(tensors)
    gamma, w, f = info["gamma"], info["weights"], info["factors"]
    dw = sensitivity["weights"] + 1e3 * U64 * np.abs(w)
    df = sensitivity["factors"] + 1e3 * U64 * f
    bounds = []
    for t in range(len(tensors[0])):
        mags = [np.abs(tensors[i][t]) for i in range(k)]
        h_prime = np.abs(sum(w[i] * tensors[i][t] for i in range(k)))
        weighted = sum(abs(w[i]) * mags[i] for i in range(k))
        moved = sum(dw[i] * mags[i] for i in range(k))
        eta = underflow_round_off(torch.float32 if narrow else dtype)
        # A coefficient below the smallest normal rounds absolutely: eta |g_ie| per objective.
        write = (2 * k + 1) * (u * gamma * (f[t] + df[t]) * (weighted + moved) + eta) + eta * sum(mags)
        decisions = gamma * (df[t] * h_prime + (f[t] + df[t]) * moved)
        bound = write + decisions
        if narrow:
            final = unit_round_off(dtype) * gamma * (f[t] + df[t]) * (h_prime + moved) * (1 + 4 * u)
            bound = bound + final + underflow_round_off(dtype)
        bounds.append(bound * (1 + 1e-6) + np.finfo(np.float64).tiny)
    return bounds


def assert_rule_output(
    ours: list[torch.Tensor],
    per_objective: list[list[torch.Tensor]],
    strategy: str = "mmpareto",
    rescale: str = "per_tensor",
    gamma: float | None = None,
    alpha_k: np.ndarray | None = None,
    stats=None,
) -> dict:
    """``ours`` (and ``stats``) against the reference, within the stated bounds; returns the reference's
    ``info`` and the sensitivity."""
    ref, info = reference_rule(per_objective, strategy, rescale, gamma, alpha_k)
    numels = [t.numel() for t in per_objective[0]]
    sensitivity = decision_sensitivity(info, numels, mgda_fixed=alpha_k is not None)
    for t, (o, r, b) in enumerate(zip(ours, ref, h_bound(per_objective, info, sensitivity), strict=True)):
        got = o.detach().double().cpu().numpy().reshape(-1)
        excess = np.abs(got - r) - b
        assert np.all(excess <= 0), (
            f"tensor {t}: |ours - reference| exceeds the bound at {int((excess > 0).sum())} entries; worst "
            f"difference {float(np.abs(got - r).max()):.3e}, bound there {float(b[np.argmax(excess)]):.3e}"
        )
    if stats is not None:
        assert bool(stats.conflict) == info["conflict"]
        k = len(per_objective)
        cos_bound = sensitivity["cos"] + 1e3 * U64
        assert abs(float(stats.cos_beta) - info["cos"]) <= cos_bound
        assert -1.0 <= float(stats.cos_beta) <= 1.0
        alphas = stats.alphas.detach().double().cpu().numpy() * k
        assert np.all(np.abs(alphas - info["weights"]) <= sensitivity["weights"] + 1e3 * U64)
    info["sensitivity"] = sensitivity
    return info
