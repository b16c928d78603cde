"""The split's passes for encoders sharded with FSDP2 (``fully_shard``).

Differences from the single-device and DDP split (:mod:`mmpareto_lightning.engine.splitting`):

- The extra objectives' encoder gradients come from real backward passes, not ``torch.autograd.grad``:
  the graph holds FSDP's unsharded parameter copies, and only a backward that accumulates into their
  ``.grad`` runs FSDP's post-backward hook, which reduce-scatters (and averages over the ranks) into the
  sharded ``.grad``. Each pass takes the shards it produced and puts the earlier ``.grad`` back, so the
  ordinary backward still leaves the main objective's gradient in ``.grad``. Only the encoders' unsharded
  parameters are differentiated (``inputs=``): heads and anything upstream are untouched.
- Every rank must run the same backward passes through the same sharded modules (each one gathers parameters
  and reduce-scatters gradients collectively). The ranks agree first on which losses reach which encoder
  (:meth:`~mmpareto_lightning.distributed.ShardedEncoders.agree`, from a walk of the heads' graph,
  :func:`~mmpareto_lightning.engine.safeguards.losses_reaching`); where a loss does not reach an encoder on
  this rank, the pass runs with a zero cotangent. An encoder output no loss reaches on this rank still
  enters the ordinary backward through a zero-valued term (:func:`untouched_terms`). Every check that can
  fail on one rank alone runs before the agreement, which carries a refusal to the other ranks
  (:func:`agree_on_step`).
- FSDP modules the forward left gathered (``reshard_after_forward=False``, or a root's default) stay
  gathered through the heads' and the extra passes (:func:`~mmpareto_lightning.distributed.sharded.
  keep_gathered`, on the modules :func:`recording_fsdp_modules` saw run): the split then all-gathers
  nothing the forward did not hold, and its extra communication is one reduce-scatter of the encoders'
  gradients per extra objective (plus, for modules that reshard after forward, one all-gather).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmpareto_lightning.distributed.sharded import FSDPModule, ShardedEncoders, ShardingError, local_tensors
from mmpareto_lightning.engine.capture import CapturedOutput
from mmpareto_lightning.engine.safeguards import GradientSplittingError, check_graph, losses_reaching

if TYPE_CHECKING:
    from mmpareto_lightning.engine.objectives import EncoderObjectives

__all__ = [
    "agree_on_step",
    "capture_recording_fsdp_modules",
    "extra_backward_passes",
    "nothing",
    "recording_fsdp_modules",
    "untouched_terms",
]


def nothing() -> None:
    """What there is to release when no step holds FSDP groups gathered."""


@contextmanager
def capture_recording_fsdp_modules(
    capture: AbstractContextManager[None], sink: dict[int, nn.Module]
) -> Iterator[None]:
    """The encoders' output capture, recording the FSDP modules that run forward too."""
    with capture, recording_fsdp_modules(sink):
        yield


def agree_on_step(
    sharded: ShardedEncoders,
    losses: Mapping[str, Tensor],
    called: list[str],
    captured: Mapping[str, Sequence[CapturedOutput]],
    parameter_owners: Mapping[int, str],
    trainable: Mapping[str, int],
    describe: Callable[[Tensor], str],
) -> tuple[list[str], dict[str, list[str]]]:
    """Check this rank's step, then agree with every rank on the encoders taking part and the losses
    that reach each (see :meth:`ShardedEncoders.agree`). Every check that could fail on one rank only
    runs before the agreement, so a refusal reaches the other ranks (through the agreement) instead of
    leaving them waiting in a collective.

    Returns:
        The encoders taking part, and encoder -> the losses that reach it on some rank.
    """
    reach = losses_reaching(losses, {enc: captured[enc] for enc in called})
    check_graph(losses, captured, called, {**parameter_owners, **sharded.graph_owners()}, describe)
    try:
        sharded.check_gradient_sync()
        agreed = sharded.agree(list(losses), called, reach, trainable)
    except ShardingError as err:
        raise GradientSplittingError(str(err)) from err
    return agreed.present, agreed.reach


@contextmanager
def recording_fsdp_modules(sink: dict[int, nn.Module]) -> Iterator[None]:
    """Record in ``sink`` every ``fully_shard``-ed module that runs forward inside the block (heads and
    fusion modules included, which the split does not otherwise know): a global forward hook, registered
    only while the block is open."""
    sink.clear()

    def record(module: nn.Module, args: object, output: object) -> None:
        if FSDPModule is not None and isinstance(module, FSDPModule):
            sink[id(module)] = module

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield
    finally:
        handle.remove()


def extra_backward_passes(
    layouts: Mapping[str, EncoderObjectives],
    cot: Mapping[str, Sequence[Tensor | None]],
    owner: Sequence[str],
    outputs: Sequence[Tensor],
    graph_params: Callable[[Sequence[nn.Parameter]], list[Tensor]],
) -> None:
    """Every extra objective's gradient on every encoder, as local shards, into ``layout.grads``.

    Round ``r`` runs one backward for the ``r``-th extra objective of every encoder that has one (the
    paper's setting needs one round), from all of the encoder's outputs (zero cotangents where the loss
    does not reach an output on this rank, so every rank runs the same pass).

    Args:
        layouts: this step's layouts (``params`` are the sharded parameters).
        cot: loss -> cotangent per captured output (``None``: the loss does not reach it here).
        owner: the encoder of each captured output.
        outputs: the captured outputs.
        graph_params: maps sharded parameters to the tensors FSDP puts in the graph for them.
    """
    extra_index = {name: [0, *range(2, len(layout.objectives))] for name, layout in layouts.items()}
    rounds = max((len(v) for v in extra_index.values()), default=0)
    for r in range(rounds):
        outs: list[Tensor] = []
        cots: list[Tensor] = []
        targets: list[tuple[EncoderObjectives, int]] = []
        for enc, layout in layouts.items():
            if r >= len(extra_index[enc]):
                continue
            k = extra_index[enc][r]
            for i, o in enumerate(owner):
                if o == enc:
                    c = cot[layout.objectives[k]][i]
                    outs.append(outputs[i])
                    cots.append(c if c is not None else torch.zeros_like(outputs[i]))
            targets.append((layout, k))
        params = [p for layout, _ in targets for p in layout.params]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            inputs = graph_params(params)
            torch.autograd.backward(outs, cots, retain_graph=True, inputs=inputs or None)
            fresh = [p.grad for p in params]
        finally:
            for p, g in zip(params, kept, strict=True):
                p.grad = g
        start = 0
        for layout, k in targets:
            layout.add_gradients(k, fresh[start : start + len(layout.params)], to_local=local_tensors)
            start += len(layout.params)


def untouched_terms(
    outputs: Sequence[Tensor],
    owner: Sequence[str],
    cot: Mapping[str, Sequence[Tensor | None]],
    present: Sequence[str],
) -> list[Tensor]:
    """Zero-valued terms that put every output of the encoders taking part, which no loss reaches on
    this rank, into the ordinary backward: the other ranks' backward runs through it (and
    reduce-scatters), so this rank's must too. The output's gradient is then the zero replacement."""
    terms = []
    for i, (out, enc) in enumerate(zip(outputs, owner, strict=True)):
        if enc in present and all(c[i] is None for c in cot.values()):
            flat = out.reshape(1) if out.dim() == 0 else out
            terms.append(flat.narrow(0, 0, 0).sum())
    return terms
