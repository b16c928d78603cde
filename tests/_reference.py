"""An independent float64 re-derivation of MMPareto from the formulas in SPEC.md (section 2).

Deliberately written differently from the package: per-parameter Python lists, NumPy float64, explicit
branches, no shared code. Tests compare the package against it.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(tensors):
    return [t.detach().double().cpu().numpy().reshape(-1) for t in tensors]


def official_alphas(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """Sener & Koltun two-vector solver as in MMPareto's min_norm_solvers.py (both weights)."""
    if v12 >= v11:
        return 0.999, 0.001
    if v12 >= v22:
        return 0.001, 0.999
    # Both weights from their own closed form: 1 - a would lose a weight of 1e-15 to round-off.
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12)), (v11 - v12) / (v11 + v22 - 2 * v12)


def kkt_alpha_is_optimal(gram: np.ndarray, alpha: np.ndarray, tol: float = 1e-7) -> bool:
    """Certificate for min_{alpha in simplex} alpha^T G alpha: (G alpha)_i >= alpha^T G alpha for all i."""
    value = alpha @ gram @ alpha
    grad = gram @ alpha
    scale = max(np.abs(gram).max(), 1e-300)
    return bool(
        np.all(alpha >= -1e-9) and abs(alpha.sum() - 1) < 1e-9 and np.all(grad >= value - tol * scale)
    )


def reference_rule(
    per_objective: list[list[torch.Tensor]],
    strategy: str = "mmpareto",
    rescale: str = "per_tensor",
    gamma: float | None = None,
    alpha_k: np.ndarray | None = None,
) -> tuple[list[np.ndarray], dict]:
    """Integrated gradient per parameter tensor (float64), and what was decided.

    per_objective[i][t]: gradient of objective i (0 multimodal, 1 unimodal, ...) for parameter tensor t.
    alpha_k: for K > 2, min-norm weights to use (verified separately with kkt_alpha_is_optimal).
    """
    k = len(per_objective)
    tensors = [_np(lst) for lst in per_objective]
    flat = [np.concatenate(ts) for ts in tensors]
    gram = np.array([[float(a @ b) for b in flat] for a in flat])
    if gamma is None:
        gamma = 1.5 if (strategy == "mmpareto" and rescale == "per_tensor") else 1.0
    n0, n1 = np.sqrt(gram[0, 0]), np.sqrt(gram[1, 1])
    cos = gram[0, 1] / (n0 * n1) if n0 > 0 and n1 > 0 else 0.0
    conflict = any(gram[i, j] <= 0 for i in range(k) for j in range(i + 1, k))
    if k == 2:
        mgda = np.array(official_alphas(gram[0, 0], gram[0, 1], gram[1, 1]))
    else:
        assert alpha_k is not None
        mgda = np.asarray(alpha_k, dtype=np.float64)

    if strategy == "uniform":
        weights = np.ones(k)
    elif strategy == "multimodal_only":
        weights = np.zeros(k)
        weights[0] = 1.0
    elif strategy == "pareto" or conflict:
        weights = k * mgda
    else:
        weights = np.ones(k)

    n_tensors = len(tensors[0])
    result = []
    combined_all = [sum(weights[i] * tensors[i][t] for i in range(k)) for t in range(n_tensors)]
    summed_all = [sum(tensors[i][t] for i in range(k)) for t in range(n_tensors)]
    # h' that is zero up to float64 round-off (exactly opposite gradients) has no direction to enlarge.
    floors = [
        1e-9 * sum(abs(weights[i]) * np.linalg.norm(tensors[i][t]) for i in range(k))
        for t in range(n_tensors)
    ]
    if strategy == "mmpareto" and conflict and rescale == "per_encoder":
        norm_h = np.sqrt(sum(float(c @ c) for c in combined_all))
        norm_s = np.sqrt(sum(float(s @ s) for s in summed_all))
        lam = norm_s / norm_h if norm_h > np.linalg.norm(floors) else 1.0
    for t in range(n_tensors):
        h = combined_all[t]
        if strategy == "mmpareto" and conflict:
            if rescale == "per_tensor":
                nh, ns = np.linalg.norm(h), np.linalg.norm(summed_all[t])
                factor = max(1.0, ns / nh) if nh > floors[t] else 1.0
            else:
                factor = lam
            h = factor * h
        result.append(gamma * h)
    return result, {"cos": cos, "conflict": conflict, "weights": weights, "gram": gram}
