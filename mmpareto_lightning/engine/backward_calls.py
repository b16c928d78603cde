"""The split's backward calls besides the ordinary one: cotangents at the encoders' outputs, and the extra
objectives' gradients straight from their losses. Plain functions of the autograd graph; the splitter
decides when to call them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from mmpareto_lightning.engine.compiled import RetainedGraphCompile
from mmpareto_lightning.engine.objectives import EncoderObjectives
from mmpareto_lightning.engine.safeguards import GradientSplittingError, check_strided

__all__ = ["Replace", "cotangents", "extra_objectives", "main_cotangents"]


def cotangents(
    names: Sequence[str], scaled: Mapping[str, Tensor], outputs: list[Tensor], compiled: bool
) -> dict[str, list[Tensor | None]]:
    """Every loss's cotangent at every captured output (one backward through the heads per loss)."""
    cot: dict[str, list[Tensor | None]] = {}
    with RetainedGraphCompile(compiled):
        for n in names:
            if outputs:
                cot[n] = list(torch.autograd.grad(scaled[n], outputs, retain_graph=True, allow_unused=True))
            else:
                cot[n] = []
    return cot


def main_cotangents(
    mains: Mapping[str, str],
    walked: Mapping[str, list[str]],
    scaled: Mapping[str, Tensor],
    outputs: list[Tensor],
    owner: list[str],
    compiled: bool,
) -> dict[str, list[Tensor | None]]:
    """The cotangents of each encoder's main loss at that encoder's outputs (None elsewhere).

    Main losses that reach only their own encoder are differentiated together, in one backward
    through the heads: each output then receives its own encoder's main loss alone. A main loss
    that reaches other encoders (a shared one) gets a backward of its own.
    """
    shared = {mains[enc] for enc in mains if sum(mains[enc] in walked[e] for e in walked) > 1}
    groups: list[list[str]] = []
    alone = [enc for enc in mains if mains[enc] not in shared]
    if alone:
        groups.append(alone)
    for name in dict.fromkeys(mains[enc] for enc in mains if mains[enc] in shared):
        groups.append([enc for enc in mains if mains[enc] == name])
    cot: dict[str, list[Tensor | None]] = {name: [None] * len(outputs) for name in set(mains.values())}
    with RetainedGraphCompile(compiled):
        for group in groups:
            index = [i for i, o in enumerate(owner) if o in group]
            roots = list(dict.fromkeys(mains[enc] for enc in group))
            grads = torch.autograd.grad(
                [scaled[n] for n in roots],
                [outputs[i] for i in index],
                retain_graph=True,
                allow_unused=True,
            )
            for i, g in zip(index, grads, strict=True):
                cot[mains[owner[i]]][i] = g
    return cot


def extra_objectives(
    layouts: Mapping[str, EncoderObjectives],
    scaled: Mapping[str, Tensor],
    losses: Mapping[str, Tensor],
    describe: Callable[[Tensor], str],
    not_reaching: Callable[[str, str, str, Tensor], str],
) -> None:
    """Every extra objective's gradient on the encoders it reaches, straight from the loss: round r
    differentiates, for every encoder that has one, its r-th extra objective, one backward per loss
    of the round (in the paper's setting: one, the multimodal loss over every encoder)."""
    extra_index = {name: [0, *range(2, len(layout.objectives))] for name, layout in layouts.items()}
    rounds = max((len(v) for v in extra_index.values()), default=0)
    for r in range(rounds):
        by_loss: dict[str, list[tuple[EncoderObjectives, int]]] = {}
        for enc, layout in layouts.items():
            if r < len(extra_index[enc]):
                k = extra_index[enc][r]
                by_loss.setdefault(layout.objectives[k], []).append((layout, k))
        for name, targets in by_loss.items():
            params = [p for layout, _ in targets for p in layout.params]
            grads = torch.autograd.grad(scaled[name], params, retain_graph=True, allow_unused=True)
            check_strided(grads, params, describe)
            start = 0
            for layout, k in targets:
                own = grads[start : start + len(layout.params)]
                start += len(layout.params)
                if k == 0 and all(g is None for g in own):
                    # The graph reaches the encoder's output, but no gradient flows back (a custom
                    # function that returns none): as if the loss did not depend on the encoder.
                    raise GradientSplittingError(not_reaching(layout.name, name, "multimodal", losses[name]))
                layout.add_gradients(k, own)


class Replace:
    """Tensor hook: hand autograd a fixed gradient instead of the incoming one."""

    def __init__(self, replacement: Tensor) -> None:
        self.replacement = replacement

    def __call__(self, grad: Tensor) -> Tensor:
        return self.replacement
