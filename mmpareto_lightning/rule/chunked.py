"""The rule's passes on accelerators: gradients in chunk-aligned rows, the Gram matrices and the write in
float64 a piece at a time, with a fixed number of operations per piece whatever the number of tensors.

On a GPU the rule is bound by kernel launches, not by arithmetic. Here every tensor of every objective
starts at a multiple of :data:`CHUNK` entries in one zero-padded buffer per call, in the gradients' own
dtype (:class:`ChunkedGradients`): a chunk then belongs to exactly one tensor, so

* the Gram matrices are, per piece of :data:`PIECE_CHUNKS` chunks widened to float64, one elementwise
  product and one sum over the chunk per pair of objectives (each chunk's ``K x K`` products), then one
  ``segment_reduce`` adding each tensor's chunks;
* the write is, per piece widened again, one ``bmm`` of each chunk's coefficients ``(chunks, 1, K)`` with
  the ``(chunks, K, CHUNK)`` view, in float64, rounded once to the gradients' dtype.

Both are exact-product float64 computations (see :mod:`.passes` for the precision statement and
:func:`.passes.gram_error_bound`). The float64 scratch is a piece's, not the gradients': at most
``K + 1`` rows of ``PIECE_CHUNKS * CHUNK`` float64 entries (192 MiB for two objectives), beside one copy
of the gradients in their own dtype. (Widening whole rows cost two float64 copies of every objective's
gradients: 5.9 GB of scratch for two BERT-base encoders; and a ``bmm`` with ``2 x 2`` outputs per chunk
ran at a third of the speed of the elementwise products on an H200.) Gradients that already lie in such
a layout (:func:`chunk_layout`) are stacked by one copy; others are copied in by one multi-tensor copy,
at the price of a view per tensor on the host (no kernel). The number of operations is a fixed number
plus a fixed number per piece of 8M entries: it does not depend on the number of tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from mmpareto_lightning.rule.constants import cached_tensor

__all__ = ["CHUNK", "PIECE_CHUNKS", "ChunkedGradients", "chunk_layout", "chunked_sizes", "objective_pairs"]

#: Entries per chunk: the padding of each tensor (at most ``CHUNK - 1`` zeros) stays a few percent of an
#: encoder, and a chunk's ``K x CHUNK`` block is a well-shaped matrix product.
CHUNK = 1 << 12
#: Chunks widened to float64 at a time (8M entries, 64 MiB a row): bounds the rule's float64 scratch.
PIECE_CHUNKS = 1 << 11


def objective_pairs(k: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The pairs ``i <= j`` and, for every ``(i, j)`` of the full matrix, the index of its pair: both
    triangles come from one entry, so identical gradients give bit-identical Gram entries."""
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    order = [pairs.index((min(i, j), max(i, j))) for i in range(k) for j in range(k)]
    return pairs, order


def chunked_sizes(sizes: Sequence[int]) -> list[int]:
    """Each tensor's size rounded up to a whole number of chunks (at least one)."""
    return [max(1, -(-n // CHUNK)) * CHUNK for n in sizes]


def chunk_layout(tensors: Sequence[Tensor]) -> Tensor | None:
    """The buffer the tensors lie in, when they lie in it chunk-aligned, one after another (the engine's
    layout on accelerators), else ``None``. Decided from storages and offsets, not addresses, so that it
    holds for ``meta`` tensors too (where every address is 0)."""
    first = tensors[0]
    storage = first.untyped_storage()
    start = offset = first.storage_offset()
    for t, padded in zip(tensors, chunked_sizes([t.numel() for t in tensors]), strict=True):
        if (
            t.storage_offset() != offset
            or not t.is_contiguous()
            or t.untyped_storage()._cdata != storage._cdata
        ):
            return None
        offset += padded
    if offset * first.element_size() > storage.nbytes():
        return None
    return first.as_strided((offset - start,), (1,), start)


class ChunkedGradients:
    """``K`` objectives' gradients as rows ``(K, chunks * CHUNK)`` in their dtype, chunk-aligned per tensor.

    Args:
        grads: ``K`` lists of ``T`` tensors (same shapes across lists), float32 or float64.
        scale: a power of two to multiply by (float64 gradients; see :func:`.passes.common_scale`).
        counts: the number of tensors of each encoder, when ``grads`` holds several encoders' tensors one
            after another (each encoder's own buffers are then recognised).
    """

    def __init__(
        self,
        grads: Sequence[Sequence[Tensor]],
        scale: Tensor | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        first = grads[0][0]
        self.device, self.dtype = first.device, first.dtype
        self.shapes = [t.shape for t in grads[0]]
        self.sizes = [t.numel() for t in grads[0]]
        self.padded = chunked_sizes(self.sizes)
        bounds = [0, *itertools.accumulate(counts or [len(self.sizes)])]
        self.runs = list(itertools.pairwise(bounds))  # each encoder's tensors (its own buffers)
        k, total = len(grads), sum(self.padded)
        buffers = [[chunk_layout(lst[a:b]) for a, b in self.runs] for lst in grads]
        if all(b is not None for row in buffers for b in row):
            # The engine's layout (a buffer per encoder and objective): the padding is zero already.
            joined = [row[0] if len(row) == 1 else torch.cat(row) for row in buffers]
            rows = torch.stack(joined)  # type: ignore[arg-type]
        else:
            rows = torch.zeros(k, total, dtype=self.dtype, device=self.device)
            targets = [v for i in range(k) for v in self._views(rows[i])]
            torch._foreach_copy_(targets, [t for lst in grads for t in lst])
        self.rows, self.scale = rows, scale
        self.chunks = total // CHUNK
        self.pieces = [(a, min(a + PIECE_CHUNKS, self.chunks)) for a in range(0, self.chunks, PIECE_CHUNKS)]

    def _views(self, flat: Tensor) -> list[Tensor]:
        """Each tensor's place in a chunk-aligned flat buffer, in the tensor's shape."""
        return [
            part.narrow(0, 0, n).view(shape)
            for part, n, shape in zip(flat.split(self.padded), self.sizes, self.shapes, strict=True)
        ]

    def _wide(self, first: int, last: int) -> Tensor:
        """Chunks ``first:last`` of every row in float64, scaled: ``(K, last - first, CHUNK)``."""
        piece = self.rows[:, first * CHUNK : last * CHUNK].to(torch.float64)
        if self.scale is not None:
            piece = piece * self.scale  # out of place: float64 rows are the gradients themselves
        return piece.view(piece.shape[0], last - first, CHUNK)

    def _chunk_counts(self) -> Tensor:
        device = self.device
        return cached_tensor(
            ("chunk counts", tuple(self.padded), device),
            lambda: torch.tensor([p // CHUNK for p in self.padded], device=device),
        )

    def grams(self) -> Tensor:
        """``(T, K, K)`` float64 Gram matrices: per piece, an elementwise product and a sum per pair of
        objectives; then one segmented sum over each tensor's chunks."""
        k = self.rows.shape[0]
        pairs, order = objective_pairs(k)
        per_piece = []
        for first, last in self.pieces:
            wide = self._wide(first, last)
            per_piece.append(torch.stack([(wide[i] * wide[j]).sum(1) for i, j in pairs], 1))
        products = per_piece[0] if len(per_piece) == 1 else torch.cat(per_piece)  # (chunks, pairs)
        # unsafe=True: the lengths are right by construction, and the safe path checks them on the host
        # (two reads of device values: a stall per call on a GPU).
        sums = torch.segment_reduce(products, "sum", lengths=self._chunk_counts(), axis=0, unsafe=True)
        device = self.device
        symmetric = cached_tensor(("pair of entry", k, device), lambda: torch.tensor(order, device=device))
        return sums.index_select(1, symmetric).view(-1, k, k)

    def write(self, coefficients: Tensor, out: Sequence[Tensor] | None) -> list[Tensor]:
        """``h[t] = sum_i coefficients[i, t] g_i[t]`` computed in float64 and rounded once, into ``out``
        (or new tensors). ``out`` may alias the inputs: they were copied already."""
        device = self.device
        owner = cached_tensor(
            ("chunk owner", tuple(self.padded), device),
            lambda: torch.repeat_interleave(
                torch.arange(len(self.padded), device=device), self._chunk_counts(), output_size=self.chunks
            ),
        )
        per_chunk = coefficients.to(torch.float64).index_select(1, owner).t().unsqueeze(1)  # (chunks, 1, K)
        # Into the first row (a piece's gradients are widened before its result is written), or, for new
        # tensors, a buffer of their own: views of the rows would keep all K rows alive.
        result = self.rows[0] if out is not None else torch.empty_like(self.rows[0])
        for first, last in self.pieces:
            wide = torch.bmm(per_chunk[first:last], self._wide(first, last).transpose(0, 1)).view(-1)
            if self.scale is not None:
                wide = wide / self.scale  # exact: a power of two
            result[first * CHUNK : last * CHUNK].copy_(wide)
        if out is None:
            return self._views(result)
        targets = list(out)
        buffers = [chunk_layout(targets[a:b]) for a, b in self.runs]
        if all(b is not None for b in buffers):
            # The engine's layout: one copy per encoder (the padding stays zero).
            parts = [result] if len(buffers) == 1 else result.split([b.numel() for b in buffers])  # type: ignore[union-attr]
            for buffer, part in zip(buffers, parts, strict=True):
                buffer.copy_(part)  # type: ignore[union-attr]
        else:
            torch._foreach_copy_(targets, self._views(result))
        return targets
