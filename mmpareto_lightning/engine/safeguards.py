"""What keeps the split exact from step to step: checks of the autograd graph, and encoder buffers.

The split is exact only for graphs of a certain shape (losses reach encoder parameters through the
encoders' outputs alone; nothing trainable outside an encoder feeds it; no reentrant checkpointing).
The model can change between steps, so :func:`check_graph` walks the graph every step; it stays cheap
because it only visits nodes (no tensor is read). :func:`buffers_kept` undoes what the extra backward
does to buffers when the encoder recomputes its forward (non-reentrant activation checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mmpareto_lightning.engine.capture import CapturedOutput

__all__ = [
    "GradientSplittingError",
    "buffers_kept",
    "check_graph",
    "check_strided",
    "losses_reaching",
    "post_accumulate_grad_hooks_held",
    "reaches_parameters",
    "run_post_accumulate_grad_hooks",
]


class GradientSplittingError(ValueError):
    """The losses or the encoders do not allow an exact per-objective split of the gradients."""


def check_graph(
    losses: Mapping[str, Tensor],
    captured: Mapping[str, Sequence[CapturedOutput]],
    present: Iterable[str],
    owner: Mapping[int, str],
    describe: Callable[[Tensor], str],
    inspect: Callable[[object, str], None] | None = None,
) -> None:
    """Refuse, every step, a graph in which the split would be silently wrong.

    Two walks of the autograd graph. From the losses down to the encoders' output boundary (the
    heads' nodes only): no loss may reach an encoder parameter other than through the encoder's
    output. From each encoder's outputs up through the encoder: no reentrant checkpointing (it
    hides the parameters from ``autograd.grad``), no trainable parameter outside the encoder (it
    would get only the unimodal gradient) and no other encoder's output (encoders in a chain).
    Both run every step, since the model can change between steps (a penalty term, checkpointing
    or unfreezing switched on mid-fit). ``inspect(node, where)``, if given, sees every node of both
    walks (``where``: ``"the heads of loss 'x'"`` or ``"encoder 'x'"``) and may raise.
    """
    stops = {o.alias.grad_fn for outs in captured.values() for o in outs}
    seen: set[object] = set()
    for name, loss in losses.items():
        stack = [loss.grad_fn]
        where = f"the heads of loss {name!r}"
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in stops:
                continue
            seen.add(node)
            if inspect is not None:
                inspect(node, where)
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in owner and variable.requires_grad:
                raise GradientSplittingError(
                    f"Loss {name!r} reaches parameter {describe(variable)} of encoder "
                    f"{owner[id(variable)]!r} without passing through the encoder's output, so "
                    "its gradient cannot be split exactly. Compute losses only from the encoders' "
                    "outputs, as the encoder's forward returns them (no losses on intermediate features "
                    "or on tensors stashed on the module, no weight penalties on encoder parameters "
                    "inside a loss: use the optimizer's weight_decay, no parameters shared with a head)."
                )
            stack.extend(next_node for next_node, _ in node.next_functions)
    boundary = {o.alias.grad_fn: enc for enc, outs in captured.items() for o in outs}
    for enc in present:
        walked: set[object] = set()
        stack = [o.alias.grad_fn for o in captured[enc]]
        own = {o.alias.grad_fn for o in captured[enc]}
        where = f"encoder {enc!r}"
        while stack:
            node = stack.pop()
            if node is None or node in walked:
                continue
            walked.add(node)
            if inspect is not None:
                inspect(node, where)
            if node in boundary and node not in own:
                raise GradientSplittingError(
                    f"Encoder {enc!r} is computed from the output of encoder {boundary[node]!r}: "
                    "encoders in a chain would count the downstream encoder's paths twice. Make them "
                    "one encoder, or feed both from the inputs."
                )
            if type(node).__name__ == "CheckpointFunctionBackward":
                raise GradientSplittingError(
                    "Reentrant activation checkpointing inside encoder "
                    f"{enc!r} hides its parameters from torch.autograd.grad, so the per-loss gradients "
                    "would be lost. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False) "
                    "(transformers: gradient_checkpointing_kwargs={'use_reentrant': False})."
                )
            variable = getattr(node, "variable", None)
            if (
                isinstance(variable, nn.Parameter)
                and variable.requires_grad
                and owner.get(id(variable)) != enc
            ):
                where = owner.get(id(variable))
                raise GradientSplittingError(
                    f"Trainable parameter {describe(variable)} "
                    + (f"of encoder {where!r} " if where else "outside every encoder ")
                    + f"feeds encoder {enc!r}: through the split it would get only the unimodal "
                    "loss's gradient. Make it part of the encoder (e.g. the whole transformer, "
                    "embeddings included, rather than its `.encoder`), or freeze it."
                )
            stack.extend(next_node for next_node, _ in node.next_functions)


def losses_reaching(
    losses: Mapping[str, Tensor], captured: Mapping[str, Sequence[CapturedOutput]]
) -> dict[str, list[str]]:
    """Encoder -> the names of the losses whose graph reaches one of its captured outputs (in the order
    of ``losses``), from a walk of the heads' nodes only (the walk stops at the outputs).

    One walk for all losses: every node's set of reachable encoders is computed once (post-order), so
    the shared part of the heads (a fusion head and the losses' sums) is visited once.
    """
    stops = {o.alias.grad_fn: enc for enc, outs in captured.items() for o in outs}
    below: dict[object, frozenset[str]] = {}
    empty: frozenset[str] = frozenset()
    for loss in losses.values():
        root = loss.grad_fn
        stack: list[tuple[object, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            if node is None or (not done and node in below):
                continue
            if node in stops:
                below[node] = frozenset((stops[node],))
                continue
            children = [n for n, _ in node.next_functions if n is not None]  # type: ignore[attr-defined]
            if done:
                reached: set[str] = set()
                for child in children:
                    reached |= below.get(child, empty)
                below[node] = frozenset(reached)
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in children if child not in below)
    reach: dict[str, list[str]] = {enc: [] for enc in captured}
    for name, loss in losses.items():
        for enc in below.get(loss.grad_fn, empty):
            reach[enc].append(name)
    return reach


def reaches_parameters(loss: Tensor, parameter_ids: set[int]) -> bool:
    """Whether ``loss`` depends on any of the parameters (by id): a walk of its whole autograd graph,
    for error messages only."""
    seen: set[object] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in parameter_ids:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


@contextmanager
def post_accumulate_grad_hooks_held(params: Iterable[Tensor], held: dict[int, Tensor]) -> Iterator[None]:
    """Keep the post-accumulate-grad hooks of ``params`` from running during the backward inside.

    The split's ordinary backward accumulates only the main objective's gradient into an encoder
    parameter's ``.grad``, and the rule replaces it afterwards. A post-accumulate-grad hook (a
    per-parameter clip, an optimizer step in backward, a memory tracker) must see the gradient that is
    applied, so it is held here (the hook dictionary is emptied in place, so the handles keep working)
    and the parameter is added to ``held``; :func:`run_post_accumulate_grad_hooks` runs the hooks once
    ``.grad`` holds the integrated gradient.
    """
    saved = []
    for p in params:
        hooks = p._post_accumulate_grad_hooks
        if hooks:
            saved.append((hooks, dict(hooks)))
            hooks.clear()
            held[id(p)] = p
    try:
        yield
    finally:
        for hooks, kept in saved:
            added = dict(hooks)  # registered during the backward: after the earlier ones
            hooks.clear()
            hooks.update(kept)
            hooks.update(added)


def run_post_accumulate_grad_hooks(params: Iterable[Tensor]) -> None:
    """Run the post-accumulate-grad hooks of ``params`` that hold a gradient, as the backward would."""
    with torch.no_grad():
        for p in params:
            hooks = p._post_accumulate_grad_hooks
            if hooks and p.grad is not None:
                for hook in list(hooks.values()):
                    hook(p)


def check_strided(
    grads: Iterable[Tensor], params: Sequence[Tensor], describe: Callable[[Tensor], str]
) -> None:
    """Refuse a sparse gradient on an encoder parameter: the rule works on dense (strided) tensors."""
    for p, g in zip(params, grads, strict=False):
        if g is not None and g.layout != torch.strided:
            raise GradientSplittingError(
                f"Parameter {describe(p)} got a sparse gradient ({g.layout}), e.g. from "
                "`nn.Embedding(sparse=True)` or `F.embedding(..., sparse=True)` in an encoder. MMPareto "
                "combines the per-loss gradients of an encoder as dense tensors. Use `sparse=False` in "
                "the encoders (sparse embeddings in heads are fine)."
            )


@contextmanager
def buffers_kept(buffers: Mapping[str, list[Tensor]], snapshots: dict[str, list[Tensor]]) -> Iterator[None]:
    """Keep the encoders' buffers (BatchNorm statistics; ``encoder -> its buffers now``) as they are
    across the extra backward.

    Under non-reentrant activation checkpointing every backward recomputes the forward, which would
    update running statistics once more than plain training does. The buffers are copied into
    persistent snapshots before (one multi-tensor copy, no allocation) and back after.
    """
    for enc, bs in buffers.items():
        kept = snapshots.get(enc)
        if (
            kept is None
            or len(kept) != len(bs)
            or any(
                k.shape != b.shape or k.dtype != b.dtype or k.device != b.device
                for k, b in zip(kept, bs, strict=True)
            )
        ):
            kept = snapshots[enc] = [torch.empty_like(b) for b in bs]
        if bs:
            torch._foreach_copy_(kept, bs)
    yield
    # Kernels update running statistics without bumping version counters, so a change cannot be
    # detected: the snapshot is copied back unconditionally (nothing else writes buffers here),
    # through `.data` so that buffers saved for the ordinary backward keep their version.
    for enc, bs in buffers.items():
        if bs:
            torch._foreach_copy_([b.data for b in bs], snapshots[enc])
