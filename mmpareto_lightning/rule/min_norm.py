"""Min-norm solvers over the probability simplex, written as tensor ops.

Both solvers take the Gram matrix of the gradients (``G[i, j] = g_i . g_j``) and return the weights
``alpha`` on the simplex that minimise ``|| sum_i alpha_i g_i ||``. Every decision is a ``torch.where``
so no value ever travels to the host: the solvers can run inside a CUDA training step without a stall.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["min_norm_2", "min_norm_simplex"]


def min_norm_2(v11: Tensor, v12: Tensor, v22: Tensor) -> Tensor:
    """Weights of the min-norm point of ``{g_1, g_2}``, as MMPareto's official code computes them.

    This is the two-vector case of Sener & Koltun's solver (``min_norm_solvers._min_norm_element_from2``)
    exactly as the authors ship it, clamps included: the first weight is ``0.999`` when ``v12 >= v11``
    and ``0.001`` when ``v12 >= v22``, else ``(v22 - v12) / (v11 + v22 - 2 v12)``. Inside the interval
    the second weight is computed as ``(v11 - v12) / (v11 + v22 - 2 v12)`` rather than ``1 - alpha_1``,
    which would round a weight of ``1e-15`` to zero, and everything runs in float64.

    Args:
        v11: ``g_1 . g_1`` (0-d tensor).
        v12: ``g_1 . g_2``.
        v22: ``g_2 . g_2``.

    Returns:
        A float64 tensor ``[alpha_1, alpha_2]`` that sums to one.
    """
    v11, v12, v22 = (v.to(torch.float64) for v in (v11, v12, v22))
    denominator = v11 + v22 - 2 * v12
    # The interior formula is only selected when v12 < min(v11, v22), where the denominator is > 0;
    # guarding it keeps the unselected branch finite.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    interior = torch.stack([(v22 - v12) / safe, (v11 - v12) / safe])
    # Built with fills, not torch.tensor([...]): a host-to-device copy would stall a CUDA stream.
    high = torch.stack([torch.full_like(v11, 0.999), torch.full_like(v11, 0.001)])
    return torch.where(v12 >= v11, high, torch.where(v12 >= v22, high.flip(0), interior))


_SUPPORT_CACHE: dict[tuple[int, str], Tensor] = {}


def _supports(k: int, device: torch.device) -> Tensor:
    key = (k, str(device))
    if key not in _SUPPORT_CACHE:
        masks = [m for m in itertools.product((0.0, 1.0), repeat=k) if any(m)]
        _SUPPORT_CACHE[key] = torch.tensor(masks, dtype=torch.float64, device=device)
    return _SUPPORT_CACHE[key]


def min_norm_simplex(gram: Tensor, max_objectives: int = 12) -> Tensor:
    """Exact min-norm weights for ``K`` vectors from their Gram matrix (or a batch of them).

    The optimum of ``min alpha^T G alpha`` over the simplex satisfies the KKT equations on its own
    support ``S``: ``G_S alpha_S = mu 1``, ``1^T alpha_S = 1``. All ``2^K - 1`` supports are solved at
    once as bordered linear systems (in float64, with a ridge of ``1e-12 * trace(G)`` so that repeated or
    linearly dependent gradients still give a unique solution: the weights are exact for
    ``G + 1e-12 trace(G) I``); the feasible solution (all weights ``>= 0``) with the smallest value is
    the optimum. This replaces Frank-Wolfe's data-dependent stopping rule, which would need a host
    round-trip per iteration, with a fixed number of batched kernels.

    Args:
        gram: ``(..., K, K)`` symmetric positive semi-definite matrices.
        max_objectives: guard against the exponential number of supports.

    Returns:
        ``(..., K)`` weights on the simplex, in ``gram``'s dtype.

    Raises:
        ValueError: for non-square matrices or more than ``max_objectives`` objectives.
    """
    if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"`gram` must be a square matrix, got shape {tuple(gram.shape)}.")
    k = gram.shape[-1]
    if k > max_objectives:
        raise ValueError(
            f"min_norm_simplex solves all 2^K - 1 supports and is limited to K <= {max_objectives} "
            f"objectives per encoder, got K = {k}."
        )
    batch = gram.shape[:-2]
    g = gram.to(torch.float64).reshape(-1, 1, k, k)  # (E, 1, K, K)
    tiny = torch.finfo(torch.float64).tiny
    masks = _supports(k, gram.device)  # (B, K)
    b = masks.shape[0]
    scale = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1, keepdim=True)[..., None].clamp_min(tiny)  # (E,1,1,1)
    eye = torch.eye(k, dtype=torch.float64, device=g.device)
    # Bordered KKT system; rows and columns outside the support become identity rows with rhs 0.
    outer = masks[:, :, None] * masks[:, None, :]  # (B, K, K)
    block = outer * (g / scale + 1e-12 * eye) + (1 - masks)[:, :, None] * eye  # (E, B, K, K)
    system = torch.zeros(*block.shape[:2], k + 1, k + 1, dtype=torch.float64, device=g.device)
    system[..., :k, :k] = block
    system[..., :k, k] = -masks
    system[..., k, :k] = masks
    rhs = torch.zeros(b, k + 1, 1, dtype=torch.float64, device=g.device)
    rhs[:, k, 0].fill_(1.0)  # fill_, not "= 1.0", which copies a host scalar
    solution, _ = torch.linalg.solve_ex(system, rhs.expand(*block.shape[:2], k + 1, 1))
    alphas = solution[..., :k, 0] * masks  # (E, B, K)
    values = (alphas[..., :, None] * g * alphas[..., None, :]).sum((-2, -1))  # (E, B)
    feasible = (alphas >= -1e-9).all(dim=-1) & torch.isfinite(values)
    values = torch.where(feasible, values, torch.full_like(values, float("inf")))
    # gather, not alphas[tensor]: indexing with a tensor of indices reads it back to the host.
    index = torch.argmin(values, dim=1)[:, None, None].expand(-1, 1, k)
    best = torch.gather(alphas, 1, index)[:, 0].clamp_min(0)  # (E, K)
    best = best / best.sum(-1, keepdim=True).clamp_min(tiny)
    return best.reshape(*batch, k).to(gram.dtype)
