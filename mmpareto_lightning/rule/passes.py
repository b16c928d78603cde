"""The rule's two passes over the gradients: per-tensor Gram matrices (read) and the weighted sum (write).

Every quantity the rule decides on (cosines, min-norm weights, the norms of ``sum_i g_i`` and of
``h' = sum_i w_i g_i`` per tensor, the stationarity test) is a quadratic form of the per-tensor Gram
matrices ``G[t, i, j] = <g_i[t], g_j[t]>``, so the gradients are read once, by :func:`tensor_grams`,
and written once, by :func:`weighted_sum`.

Two regimes. On CPU the rule is bound by memory bandwidth: a tensor larger than :data:`PIECE` entries
is processed piece by piece, every piece by all the operations that need it one after another, so that
only the first of them reads it from main memory, and nothing of the gradients' size is allocated. On
accelerators the rule is bound by kernel launches: multi-tensor (``_foreach``) operations handle all
tensors with a fixed number of kernels.

Precision. A float32 dot product over millions of entries on CPU (BLAS ``sdot``) loses up to about
``1e-6`` relative; here no float32 sum runs over more than :data:`PIECE` products, within about
``2e-7`` relative, and the pieces' sums are added in float64. The products themselves are rounded to
float32, which the rule's round-off floor accounts for (see ``rule._FLOOR_FACTOR``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PIECE", "Pieces", "tensor_grams", "weighted_sum"]

#: Entries per piece on CPU: two or three float32 pieces fit in a core's L2 cache (1.25 MiB on current
#: server cores), and a float32 ``sdot`` over this many products errs by at most about 4.5 eps relative
#: to the sum of the products' magnitudes (8.4 eps at 2**17: the floor in rule.py assumes <= 8).
PIECE = 1 << 16


def _multi_tensor(device: torch.device) -> bool:
    """Whether the Gram matrices come from multi-tensor operations (accelerators) or from dot products
    (CPU, where the multi-tensor reductions are far slower than dot products)."""
    return device.type != "cpu"


class Pieces:
    """Views of contiguous tensors as 1-D pieces (of at most :data:`PIECE` entries on CPU, whole on
    accelerators), made once per rule call and shared by both passes."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, int], Sequence[Tensor]] = {}

    def __call__(self, t: Tensor) -> Sequence[Tensor]:
        key = (t.data_ptr(), t.numel())
        views = self._views.get(key)
        if views is None:
            flat = t if t.ndim == 1 else t.view(-1)
            views = flat.split(PIECE) if flat.numel() > PIECE and not _multi_tensor(t.device) else (flat,)
            self._views[key] = views
        return views


def tensor_grams(grads: Sequence[Sequence[Tensor]], pieces: Pieces | None = None) -> Tensor:
    """``(T, K, K)`` float64 Gram matrices: ``G[t, i, j]`` is the dot product of ``grads[i][t]`` and
    ``grads[j][t]``.

    On CPU: dot products, tensor by tensor and piece by piece, no temporary. Elsewhere: a fixed number
    of multi-tensor operations, at the price of one temporary of the size of one gradient.

    Args:
        grads: ``K`` lists of ``T`` tensors; ``grads[i][t]`` all have the same shape, dtype (float32 or
            float64) and device.
        pieces: the piece views to use (to share them with :func:`weighted_sum`).

    Returns:
        A float64 tensor of shape ``(T, K, K)`` on the gradients' device.
    """
    k, n = len(grads), len(grads[0])
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    # Both triangles from one entry: identical gradients give bit-identical Gram entries.
    order = [pairs.index((min(i, j), max(i, j))) for i in range(k) for j in range(k)]
    if _multi_tensor(grads[0][0].device):
        packed = _pair_sums_by_foreach(grads, pairs)
        return torch.stack([packed[p] for p in order], dim=1).view(n, k, k)
    pieces = pieces or Pieces()
    dots = [_dots_by_piece(tensors, pairs, pieces) for tensors in zip(*grads, strict=True)]
    return torch.stack([d[p] for d in dots for p in order]).to(torch.float64).view(n, k, k)


def _pair_sums_by_foreach(grads: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]]) -> Tensor:
    """``(pairs, T)`` float64 dot products from multi-tensor operations.

    There is no multi-tensor dot product, so a sum of products comes from absolute sums, accumulated in
    float64: ``sum(p) = sum(|p|) - 2 sum(|min(p, 0)|)``, whose round-off is that of rounding the products
    to float32. The diagonal is computed the same way, so that identical gradients give bit-identical
    Gram entries.
    """
    lists = [list(g) for g in grads]
    sums: list[Tensor] = []
    for i, j in pairs:
        products = torch._foreach_mul(lists[i], lists[j])
        sums.extend(torch._foreach_powsum(products, 1, dtype=torch.float64))
        torch._foreach_clamp_max_(products, 0.0)
        sums.extend(torch._foreach_powsum(products, 1, dtype=torch.float64))
    raw = torch.stack(sums).view(len(pairs), 2, len(lists[0]))
    return raw[:, 0] - 2 * raw[:, 1]


def _dots_by_piece(
    tensors: Sequence[Tensor], pairs: Sequence[tuple[int, int]], pieces: Pieces
) -> list[Tensor]:
    """Dot products of the pairs, piece by piece (a piece is read from memory by its first dot product
    only), the pieces' float32 sums added in float64."""
    if tensors[0].numel() <= PIECE or not tensors[0].is_contiguous():
        flat = [t if t.ndim == 1 else t.reshape(-1) for t in tensors]
        return [torch.dot(flat[i], flat[j]) for i, j in pairs]
    dots: list[list[Tensor]] = [[] for _ in pairs]
    for piece in zip(*(pieces(t) for t in tensors), strict=True):
        for p, (i, j) in enumerate(pairs):
            dots[p].append(torch.dot(piece[i], piece[j]))
    return [torch.stack(d).sum(dtype=torch.float64) for d in dots]


def weighted_sum(
    grads: Sequence[Sequence[Tensor]],
    coefficients: Tensor,
    out: Sequence[Tensor] | None = None,
    pieces: Pieces | None = None,
) -> list[Tensor]:
    """``h[t] = sum_i coefficients[i, t] * grads[i][t]``, written once.

    A multiply, then a fused multiply-add per further gradient: multi-tensor operations over the
    tensors, except on CPU for tensors above :data:`PIECE` entries, which go piece by piece so that the
    multiply-add finds the piece it adds to in the cache, and on accelerators for gradients that lie end
    to end in flat buffers (the engine's layout), which take one kernel per gradient over each buffer.

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
    if out is not None and _multi_tensor(lists[0][0].device):
        spans = [_flat_span(lst) for lst in [*(lists[i] for i in order), list(out)]]
        if all(span is not None for span in spans):
            # Rows picked by integer indexing: indexing with a list would copy the list to the device.
            rows = torch.stack([coefficients[i] for i in order])
            _write_spans(spans, rows, [t.numel() for t in lists[0]])  # type: ignore[arg-type]
            return list(out)
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
    """The write on accelerators, with per-tensor 0-d coefficient tensors that stay on the device.

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


def _flat_span(tensors: Sequence[Tensor]) -> Tensor | None:
    """One 1-D view over the tensors when they lie end to end in one storage (the engine's layout)."""
    first = tensors[0]
    size, address = first.element_size(), first.data_ptr()
    for t in tensors:
        if t.data_ptr() != address or not t.is_contiguous():
            return None
        address += t.numel() * size
    total = (address - first.data_ptr()) // size
    # Consecutive addresses inside the first tensor's storage are that storage.
    if first.storage_offset() + total > first.untyped_storage().nbytes() // size:
        return None
    return first.as_strided((total,), (1,))


_SIZES: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _write_spans(spans: Sequence[Tensor], coefficients: Tensor, sizes: list[int]) -> None:
    """``spans[-1] = sum_i coefficients[i, t] * spans[i]`` over flat spans, ``t`` the tensor of each entry.

    Per-tensor coefficients would make multi-tensor operations fall back to one kernel per tensor;
    expanded to one coefficient per entry they take one kernel per gradient over the whole span.
    """
    device = spans[0].device
    key = (tuple(sizes), device)
    repeats = _SIZES.get(key)
    if repeats is None:
        # Made once per layout: the host-to-device copy is not repeated on later steps.
        if len(_SIZES) >= 64:
            _SIZES.clear()
        repeats = _SIZES[key] = torch.tensor(sizes, device=device)
    per_entry = torch.repeat_interleave(coefficients, repeats, dim=1, output_size=spans[0].numel())
    destination = spans[-1]
    torch.mul(spans[0], per_entry[0], out=destination)
    for span, c in zip(spans[1:-1], per_entry[1:], strict=True):
        destination.addcmul_(span, c)


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
        if out[0].data_ptr() == lst[0].data_ptr():
            if any(o.data_ptr() != g.data_ptr() for o, g in zip(out, lst, strict=True)):
                raise ValueError(f"`out` aliases gradient list {i} only in part; alias all of it or none.")
            found.append(i)
    return found
