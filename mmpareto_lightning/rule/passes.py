"""The rule's two passes over the gradients: per-tensor Gram matrices (read) and the weighted sum (write).

Every quantity the rule decides on (cosines, min-norm weights, the norms of ``sum_i g_i`` and of
``h' = sum_i w_i g_i`` per tensor, the stationarity test) is a quadratic form of the per-tensor Gram
matrices ``G[t, i, j] = <g_i[t], g_j[t]>``, so the gradients are read once, by :func:`tensor_grams`,
and written once, by :func:`weighted_sum`.

Precision over the whole float range. The Gram entries are float64 sums of float64 products. A product
of two float32 (or bfloat16, float16) numbers is exact in float64 (24 + 24 significant bits <= 53), and
its magnitude lies between ``2**-298`` and ``2**256``: neither overflows nor underflows. So for any finite
float32 gradients, from ``1e-45`` to ``3e38`` entry by entry and one objective ``1e30`` times another, the
only error of ``G[t, i, j]`` is the float64 summation's, bounded by :func:`gram_error_bound` times
``sum_e |g_ie g_je|``. (A float32 dot product overflows at ``1e19`` and loses everything below ``1e-19``:
cos beta came out as -1.4e284 there.) Float64 gradients, whose products can leave the float64 range,
are first multiplied by a power of two common to the whole call, which is exact and leaves every
decision of the rule unchanged (all of them are ratios of Gram entries); see :func:`common_scale`.

Two regimes:

* CPU, bound by memory bandwidth and by the host's time per operator: tensors of at most :data:`SMALL`
  entries are packed into one float64 row per objective and reduced per tensor by one segmented sum;
  larger tensors go piece by piece (at most :data:`PIECE` entries), each piece converted once into a
  float64 scratch row that stays in the cache while its dot products read it.
* Accelerators, bound by kernel launches: :mod:`.chunked` lays the gradients out chunk-aligned in float64
  rows and computes every Gram entry, and writes ``h``, in a fixed number of batched operations whatever
  the number of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmpareto_lightning.rule.chunked import ChunkedGradients, objective_pairs
from mmpareto_lightning.rule.constants import cached_tensor

__all__ = [
    "PIECE",
    "SMALL",
    "Pieces",
    "common_scale",
    "gram_error_bound",
    "tensor_grams",
    "weighted_sum",
]

#: Entries per piece of a large tensor on CPU: the float64 copies of one piece of every objective (2 MiB
#: for two objectives) stay in a core's L2 or L3 cache while the dot products read them.
PIECE = 1 << 17
#: Tensors of at most this many entries are packed together on CPU (one segmented sum for all of them).
SMALL = 1 << 14

#: Unit round-off of float64.
U64 = 2.0**-53


def gram_error_bound(numel: int) -> float:
    """Bound on the error of one Gram entry of a tensor of ``numel`` entries, relative to
    ``sum_e |g_ie g_je|``.

    The products are exact, and any order of summing ``m`` numbers in float64 errs by at most
    ``(m - 1) u`` times the sum of their magnitudes, to first order (Higham, *Accuracy and Stability of
    Numerical Algorithms*, section 4.2): ``numel * 2**-53`` covers one reduction over the whole tensor
    (accelerators), a dot product per piece plus the sum of the pieces (CPU), and one segmented sum (the
    packed small tensors). For ``numel <= 2**30`` that is below ``1.2e-7``, and in practice (blocked
    and pairwise sums) far below.
    """
    return max(numel - 1, 0) * U64 * (1 + 1e-6)


def _multi_tensor(device: torch.device) -> bool:
    """Whether the gradients take the accelerator path (whole-buffer operations) or the CPU path."""
    return device.type != "cpu"


class Pieces:
    """Views of contiguous tensors as 1-D pieces (of at most :data:`PIECE` entries), made once per rule
    call and shared by both passes on CPU."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, int], Sequence[Tensor]] = {}

    def __call__(self, t: Tensor) -> Sequence[Tensor]:
        key = (t.data_ptr(), t.numel())
        views = self._views.get(key)
        if views is None:
            flat = t if t.ndim == 1 else t.view(-1)
            views = flat.split(PIECE) if flat.numel() > PIECE else (flat,)
            self._views[key] = views
        return views


def common_scale(grads: Sequence[Sequence[Tensor]]) -> Tensor | None:
    """For float64 gradients, a power of two that brings the largest entry of all of them near 1 (``None``
    for narrower dtypes, whose products cannot leave the float64 range).

    Multiplying every gradient by one power of two is exact and scales every Gram entry by its square:
    the rule's decisions are ratios of Gram entries and do not change.
    """
    if grads[0][0].dtype != torch.float64:
        return None
    largest = torch.stack(torch._foreach_norm([t for lst in grads for t in lst], float("inf"))).max()
    exponent = torch.frexp(largest).exponent  # largest = m * 2**e with 0.5 <= m < 1 (0 -> e = 0)
    return torch.ldexp(torch.ones_like(largest), -exponent)


# ----------------------------------------------------------------------------------------------- read


def tensor_grams(
    grads: Sequence[Sequence[Tensor]],
    pieces: Pieces | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """``(T, K, K)`` float64 Gram matrices: ``G[t, i, j]`` is the dot product of ``grads[i][t]`` and
    ``grads[j][t]`` (times ``scale**2``).

    Args:
        grads: ``K`` lists of ``T`` tensors; ``grads[i][t]`` all have the same shape, dtype (float32 or
            float64) and device.
        pieces: the piece views to use (to share them with :func:`weighted_sum`).
        scale: a power of two to multiply the gradients by first (:func:`common_scale` for float64
            gradients; ``None`` for narrower ones).

    Returns:
        A float64 tensor of shape ``(T, K, K)`` on the gradients' device. Each entry errs by at most
        ``gram_error_bound(numel)`` times ``sum_e |g_ie g_je|`` (the products are exact).
    """
    if _multi_tensor(grads[0][0].device):
        return ChunkedGradients(grads, scale).grams()
    return _cpu_grams(grads, pieces or Pieces(), scale)


def _cpu_grams(grads: Sequence[Sequence[Tensor]], pieces: Pieces, scale: Tensor | None) -> Tensor:
    k, n = len(grads), len(grads[0])
    pairs, order = objective_pairs(k)
    small = [t for t in range(n) if grads[0][t].numel() <= SMALL]
    large = [t for t in range(n) if grads[0][t].numel() > SMALL]
    parts = []
    if small:
        parts.append(_packed_pair_sums(grads, small, pairs, scale))
    if large:
        parts.append(_pieced_pair_sums(grads, large, pairs, pieces, scale))
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (pairs, T), small ones first
    # Back to the tensors' order, and to full (T, K, K) matrices, by cached indices: indexing with
    # Python lists would build index tensors from host data every call.
    columns = cached_tensor(
        ("columns", tuple(small), tuple(large)), lambda: torch.tensor(_inverse([*small, *large]))
    )
    entries = cached_tensor(("entries", k), lambda: torch.tensor(order))
    return sums.index_select(1, columns).index_select(0, entries).t().reshape(n, k, k)


def _inverse(permutation: list[int]) -> list[int]:
    inverse = [0] * len(permutation)
    for position, value in enumerate(permutation):
        inverse[value] = position
    return inverse


def _packed_pair_sums(
    grads: Sequence[Sequence[Tensor]], chosen: list[int], pairs: list[tuple[int, int]], scale: Tensor | None
) -> Tensor:
    """``(pairs, len(chosen))`` dot products of small tensors: every objective's tensors packed into one
    float64 row, the pairs' products, one segmented sum."""
    k = len(grads)
    sizes = [grads[0][t].numel() for t in chosen]
    # One concatenation in the gradients' dtype, then one widening (cat into a float64 row converts
    # entry by entry, twice as slow).
    packed = torch.cat([grads[i][t].reshape(-1) for i in range(k) for t in chosen])
    rows = packed.view(k, -1).to(torch.float64)
    if scale is not None:
        rows.mul_(scale)
    # Every (i, j) product, both triangles (bitwise equal: a product commutes and each row is reduced
    # alike), in one vectorised multiplication; the pairs are picked from the sums.
    lengths = cached_tensor(("lengths", k, tuple(sizes)), lambda: torch.tensor(sizes).expand(k * k, -1))
    products = (rows.unsqueeze(1) * rows.unsqueeze(0)).view(k * k, -1)
    sums = torch.segment_reduce(products, "sum", lengths=lengths, axis=1, unsafe=True)  # (K * K, T)
    index = cached_tensor(("upper", k), lambda: torch.tensor([i * k + j for i, j in pairs]))
    return sums.index_select(0, index)


def _pieced_pair_sums(
    grads: Sequence[Sequence[Tensor]],
    chosen: list[int],
    pairs: list[tuple[int, int]],
    pieces: Pieces,
    scale: Tensor | None,
) -> Tensor:
    """``(pairs, len(chosen))`` dot products of large tensors, piece by piece: each piece of each objective
    is converted once into a float64 scratch row (read from memory once), then every pair's dot product
    reads the rows from the cache."""
    k = len(grads)
    scratch = torch.empty(k, PIECE, dtype=torch.float64)
    columns = []
    for t in chosen:
        tensors = [g[t] if g[t].is_contiguous() else g[t].contiguous() for g in grads]
        dots: list[list[Tensor]] = [[] for _ in pairs]
        for piece in zip(*(pieces(x) for x in tensors), strict=True):
            m = piece[0].numel()
            rows = scratch[:, :m]
            for i in range(k):
                if scale is None:
                    rows[i].copy_(piece[i])
                else:
                    torch.mul(piece[i], scale, out=rows[i])
            for p, (i, j) in enumerate(pairs):
                dots[p].append(torch.dot(rows[i], rows[j]))
        columns.append(torch.stack([torch.stack(d).sum() if len(d) > 1 else d[0] for d in dots]))
    return torch.stack(columns, dim=1)


# ---------------------------------------------------------------------------------------------- write


def weighted_sum(
    grads: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    out: Sequence[Tensor] | None = None,
    pieces: Pieces | None = None,
) -> list[Tensor]:
    """``h[t] = sum_i coefficients[i, t] * grads[i][t]``, written once.

    A multiply, then a fused multiply-add per further gradient: multi-tensor operations over the
    tensors, except on CPU for tensors above :data:`PIECE` entries, which go piece by piece so that the
    multiply-add finds the piece it adds to in the cache. (On accelerators the rule writes through
    :class:`.chunked.ChunkedGradients` instead; this function's multi-tensor fallback there takes one
    kernel per tensor.)

    Args:
        grads: ``K`` lists of ``T`` tensors.
        coefficients: ``(K, T)`` tensor in the gradients' dtype, on their device.
        out: ``T`` tensors to write into: separate from ``grads``, or the tensors of one of its lists
            (that list is scaled in place first, then the others are added).
        pieces: the piece views to use (to share them with :func:`tensor_grams`).

    Returns:
        ``out``, or new tensors.

    Raises:
        ValueError: when ``out`` shares some but not all tensors with a list of ``grads``.
    """
    k, n, lists = len(grads), len(grads[0]), [list(g) for g in grads]
    aliased = [] if out is None else _aliased(out, lists)
    if len(aliased) > 1:
        # The same tensors passed as two objectives and as ``out``: go through new tensors.
        result = weighted_sum(lists, coefficients)
        torch._foreach_copy_(list(out), result)  # type: ignore[arg-type]
        return list(out)  # type: ignore[arg-type]
    pieces = pieces or Pieces()
    first = aliased[0] if aliased else 0
    order = [first, *(i for i in range(k) if i != first)]
    scalars = [list(row.unbind()) for row in coefficients]
    if _multi_tensor(lists[0][0].device):
        return _weighted_sum_per_tensor(lists, scalars, order, out, aliased)
    target: list[Tensor | None] = list(out) if out is not None else [None] * n
    touched = [*lists, *([] if out is None else [list(out)])]
    blocks = {t for t in range(n) if lists[0][t].numel() > PIECE and _blockwise([lst[t] for lst in touched])}
    rest = [t for t in range(n) if t not in blocks]
    if rest:

        def pick(items: Sequence[Tensor | None]) -> list[Tensor]:
            return [items[t] for t in rest]  # type: ignore[misc]

        if out is None:
            dest = torch._foreach_mul(pick(lists[first]), pick(scalars[first]))
        else:
            dest = pick(target)
            if not aliased:
                torch._foreach_copy_(dest, pick(lists[first]))
            torch._foreach_mul_(dest, pick(scalars[first]))
        for i in order[1:]:
            torch._foreach_addcmul_(dest, pick(lists[i]), pick(scalars[i]))
        for t, d in zip(rest, dest, strict=True):
            target[t] = d
    for t in sorted(blocks):
        destination = target[t]
        if destination is None:
            destination = target[t] = torch.empty_like(lists[0][t])
        split = [pieces(lists[i][t]) for i in order]
        for dest_piece, *piece in zip(pieces(destination), *split, strict=True):
            torch.mul(piece[0], scalars[first][t], out=dest_piece)
            for i, p in zip(order[1:], piece[1:], strict=True):
                dest_piece.addcmul_(p, scalars[i][t])
    return target  # type: ignore[return-value]


def _weighted_sum_per_tensor(
    lists: list[list[Tensor]],
    scalars: list[list[Tensor]],
    order: list[int],
    out: Sequence[Tensor] | None,
    aliased: list[int],
) -> list[Tensor]:
    """The multi-tensor write on accelerators, with per-tensor 0-d coefficient tensors that stay on the
    device.

    Python's ``torch._foreach_mul_(tensors, [0-d tensors])`` binds the coefficients as a list of
    *scalars* and reads each one back to the host (a synchronisation per tensor); the explicit
    ``.List`` overload keeps them tensors (one kernel per tensor, no synchronisation).
    """
    first = order[0]
    if out is None:
        dest = torch.ops.aten._foreach_mul.List(lists[first], scalars[first])
    else:
        dest = list(out)
        if not aliased:
            torch._foreach_copy_(dest, lists[first])
        torch.ops.aten._foreach_mul_.List(dest, scalars[first])
    for i in order[1:]:
        # tensor2 of addcmul is always a tensor list: no read-back here.
        torch._foreach_addcmul_(dest, lists[i], scalars[i])
    return dest


def _blockwise(tensors: Sequence[Tensor]) -> bool:
    """Whether these tensors (one per gradient, and the output) are written piece by piece."""
    first = tensors[0]
    return (
        first.numel() > PIECE and not _multi_tensor(first.device) and all(t.is_contiguous() for t in tensors)
    )


def _aliased(out: Sequence[Tensor], lists: list[list[Tensor]]) -> list[int]:
    """The lists whose tensors are the tensors of ``out`` (``out`` is taken to be separate from a list
    whose first tensor it does not share)."""
    found = []
    for i, lst in enumerate(lists):
        if _same_memory(out[0], lst[0]):
            if not all(_same_memory(o, g) for o, g in zip(out, lst, strict=True)):
                raise ValueError(f"`out` aliases gradient list {i} only in part; alias all of it or none.")
            found.append(i)
    return found


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors start at the same place of the same storage (decided without addresses, which
    ``meta`` tensors lack)."""
    return (
        a.storage_offset() == b.storage_offset() and a.untyped_storage()._cdata == b.untyped_storage()._cdata
    )
