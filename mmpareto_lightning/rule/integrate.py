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

The core, :func:`integrate_encoders`, takes every encoder's lists of per-parameter tensors (one list per
objective) and decides all encoders in one set of operations; :func:`integrate_tensor_lists` is the same
for one encoder, and :func:`integrate_gradients` for *flat* gradients (the encoder's parameters laid end
to end, ``segments`` giving the sizes), which it splits into views. The decisions live in
:mod:`.decide`, the passes over the gradients in :mod:`.passes`, the settings in :mod:`.config`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mmpareto_lightning.rule import passes
from mmpareto_lightning.rule.chunked import ChunkedGradients
from mmpareto_lightning.rule.config import RESCALE_MODES, STRATEGIES, RuleConfig, RuleStats
from mmpareto_lightning.rule.decide import decide
from mmpareto_lightning.rule.passes import Pieces, common_scale

__all__ = [
    "RESCALE_MODES",
    "STRATEGIES",
    "GramReduce",
    "RuleConfig",
    "RuleStats",
    "integrate_encoders",
    "integrate_gradient_lists",
    "integrate_gradients",
    "integrate_tensor_lists",
]

#: Maps this process's per-tensor Gram matrices to the ones the rule decides on (sharded training).
GramReduce = Callable[[Tensor], Tensor]
_HALF = (torch.float16, torch.bfloat16)
# Largest value of each dtype, with a margin for the write's own rounding ((2K + 1) u relative, K <= 12).
_LARGEST = {
    dtype: torch.finfo(dtype).max * (1 - 64 * torch.finfo(dtype).eps)
    for dtype in (torch.float32, torch.float64)
}


def integrate_encoders(
    grads: Sequence[Sequence[Sequence[Tensor]]],
    config: RuleConfig | None = None,
    out: Sequence[Sequence[Tensor] | None] | None = None,
    gram_reduce: GramReduce | None = None,
) -> tuple[list[list[Tensor]], list[RuleStats]]:
    """Apply the rule to every encoder, in one set of operations for all encoders that share the number
    of objectives, the dtype and the device.

    Each encoder is decided on its own gradients (its own cos beta, alpha and rescale); batching only
    shares the operations: the number of operations of a call depends neither on the number of tensors
    nor on the number of encoders.

    Args:
        grads: per encoder, ``K >= 2`` lists of ``T_e`` tensors (see :func:`integrate_tensor_lists`).
        config: the rule's settings (default: the authors' MMPareto).
        out: per encoder, ``None`` or the tensors to write ``h`` into (as in
            :func:`integrate_tensor_lists`).
        gram_reduce: see :func:`integrate_tensor_lists`; called once per group of encoders, on the
            ``(sum_e T_e, K, K)`` matrices of the group, in the order of ``grads``.

    Returns:
        Per encoder, the integrated gradient per parameter and the step's :class:`RuleStats`.
    """
    config = config or RuleConfig()
    outs = list(out) if out is not None else [None] * len(grads)
    if len(outs) != len(grads):
        raise ValueError(f"`out` has {len(outs)} entries for {len(grads)} encoders.")
    encoders = [[[_real_view(t) for t in lst] for lst in enc] for enc in grads]
    real_outs = [None if o is None else [_real_view(t) for t in o] for o in outs]
    groups: dict[tuple[object, ...], list[int]] = {}
    for e, (lists, o) in enumerate(zip(encoders, real_outs, strict=True)):
        _check_lists(lists, o)
        groups.setdefault((len(lists), lists[0][0].dtype, lists[0][0].device), []).append(e)
    results: list[list[Tensor]] = [[] for _ in grads]
    stats: list[RuleStats | None] = [None] * len(grads)
    for (k, _, _), members in groups.items():
        lists = [[t for e in members for t in encoders[e][i]] for i in range(k)]
        counts = [len(encoders[e][0]) for e in members]
        target = None
        if any(real_outs[e] is not None for e in members):
            target = [
                t
                for e in members
                for t in (real_outs[e] or [torch.empty_like(g) for g in encoders[e][0]])  # type: ignore[union-attr]
            ]
        written, group_stats = _integrate(lists, counts, config, target, gram_reduce)
        start = 0
        for e, count, s in zip(members, counts, group_stats, strict=True):
            results[e], stats[e] = written[start : start + count], s
            start += count
    final = []
    for e, enc in enumerate(grads):
        if outs[e] is not None:
            final.append(list(outs[e]))  # type: ignore[arg-type]
        else:
            final.append(
                [
                    torch.view_as_complex(r) if g.is_complex() else r
                    for r, g in zip(results[e], enc[0], strict=True)
                ]
            )
    return final, stats  # type: ignore[return-value]


def integrate_tensor_lists(
    grads: Sequence[Sequence[Tensor]],
    config: RuleConfig | None = None,
    out: Sequence[Tensor] | None = None,
    gram_reduce: GramReduce | None = None,
) -> tuple[list[Tensor], RuleStats]:
    """Apply the rule to the per-parameter gradients of one encoder.

    The gradients are read once (per-tensor Gram matrices: exact products summed in float64) and ``h`` is
    written once; nothing of the gradients' size is copied on CPU.

    Args:
        grads: ``K >= 2`` lists of ``T`` tensors, one list per objective (list 0 the multimodal loss,
            list 1 the unimodal loss), tensor ``t`` of every list the gradient of parameter ``t``.
            Real (float32, float64, bfloat16, float16) or complex (the real inner product ``Re<a, b>``).
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
    results, stats = integrate_encoders([grads], config, [out], gram_reduce)
    return results[0], stats[0]


def _real_view(t: Tensor) -> Tensor:
    """Complex gradients as real ones: ``Re<a, b>`` is the dot product of ``view_as_real`` views, the
    inner product under which a complex parameter's gradient is the steepest ascent direction (PyTorch's
    convention), and the write through the view is the complex weighted sum."""
    return torch.view_as_real(t) if t.is_complex() else t


def _integrate(
    lists: list[list[Tensor]],
    counts: list[int],
    config: RuleConfig,
    out: Sequence[Tensor] | None,
    gram_reduce: GramReduce | None = None,
) -> tuple[list[Tensor], list[RuleStats]]:
    if lists[0][0].dtype in _HALF:
        # Half-precision gradients (``bf16-true`` training): integrate in float32, write back once.
        wide = [[t.float() for t in lst] for lst in lists]
        result, stats = _integrate(wide, counts, config, wide[0], gram_reduce)
        # h must fit the narrow dtype it is written back in (float16: 65504).
        largest = torch.finfo(lists[0][0].dtype).max
        start, narrowed = 0, []
        for count, s in zip(counts, stats, strict=True):
            narrowed.append(s._replace(fits=s.fits & _fits(result[start : start + count], largest)))
            start += count
        target = list(out) if out is not None else [torch.empty_like(t) for t in lists[0]]
        torch._foreach_copy_(target, result)
        return target, narrowed
    dtype = lists[0][0].dtype
    # Float64 gradients are scaled by a power of two of this process's own; sharded training sums Gram
    # matrices over processes, so there they are not scaled (float64 products then hold gradients up to
    # about 1e150).
    scale = common_scale(lists) if gram_reduce is None else None
    # The Gram entries of float64 gradients are those of the gradients times `scale`.
    limit = _LARGEST[dtype] if scale is None else scale * torch.finfo(dtype).max
    if passes._multi_tensor(lists[0][0].device):
        chunked = ChunkedGradients(lists, scale, counts)
        grams = chunked.grams()
        if gram_reduce is not None:
            grams = gram_reduce(grams)
        coefficients, stats = decide(grams, counts, config, limit)
        return chunked.write(coefficients, out), stats
    pieces = Pieces()
    grams = passes.tensor_grams(lists, pieces, scale)
    if gram_reduce is not None:
        grams = gram_reduce(grams)
    coefficients, stats = decide(grams, counts, config, limit)
    return passes.weighted_sum(lists, coefficients.to(dtype), out, pieces), stats


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


def _fits(tensors: Sequence[Tensor], largest: float) -> Tensor:
    """0-d bool tensor: every entry's magnitude is at most ``largest`` (one multi-tensor reduction)."""
    return torch.stack(torch._foreach_norm(list(tensors), float("inf"))).max() <= largest


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
    target = list(_real_view(result).view(-1).split(_real_sizes(result, sizes)))
    _, stats = _integrate(views, [len(sizes)], config or RuleConfig(), target)
    return result, stats[0]


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
