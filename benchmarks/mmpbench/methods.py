"""The three timed training steps: ``uniform``, ``mmpareto`` (our engine) and ``authors`` (re-created).

Every method owns a copy of the network and an optimizer, and ``step()`` runs a full training step:
``zero_grad`` + forward + backward(s) + integration + ``SGD(momentum=0.9).step()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpareto_lightning import MMParetoEngine, RuleConfig

from .models import MULTIMODAL, MultiEncoderNet, make_optimizer

METHODS = ("uniform", "mmpareto", "authors")
GAMMA_AUTHORS = 1.5


class Method:
    """One training method: its own copy of the network, its own optimizer, and ``step()``."""

    name = ""

    def __init__(self, net: MultiEncoderNet, batch: Mapping[str, Tensor]) -> None:
        self.net = net
        self.batch = batch
        self.optimizer = make_optimizer(net)

    def step(self) -> None:
        raise NotImplementedError

    def persistent_tensors(self) -> list[Tensor]:
        """State held between steps outside the model and the optimizer (for the CPU memory tracker)."""
        return []

    def close(self) -> None:
        """Release hooks."""


class UniformStep(Method):
    """Plain summed loss, one backward: the baseline every ratio is relative to."""

    name = "uniform"

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.net.losses(self.batch)
        sum(losses.values()).backward()  # type: ignore[union-attr]
        self.optimizer.step()


class EngineStep(Method):
    """Our MMPareto step through the framework-free engine (the engine docstring's loop)."""

    name = "mmpareto"

    def __init__(self, net: MultiEncoderNet, batch: Mapping[str, Tensor], config: RuleConfig | None = None):
        super().__init__(net, batch)
        self.engine = MMParetoEngine(dict(net.encoders.items()), config or RuleConfig())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.engine.capture():
            losses = self.net.losses(self.batch)
        self.engine.backward(losses)
        self.engine.integrate()
        self.optimizer.step()

    # The engine keeps no gradient buffer between steps (the per-loss gradients live from the extra
    # backward to the rule), and its forward hooks exist only inside capture(): the base class's
    # persistent_tensors() and close() apply.


def _authors_min_norm_2(vecs: Sequence[Sequence[Tensor]]) -> tuple[float, float]:
    """``MinNormSolver.find_min_norm_element`` for two objectives, as the official code runs it.

    The official call passes ``list(grads[t].values())``: every per-tensor gradient *and* the
    ``"concat"`` entry, so each dot product is accumulated tensor by tensor, each term moved to the host
    with ``.data.cpu()`` (one synchronisation per tensor and dot product). Double counting the concat
    entry scales all three dot products by two and leaves the weights unchanged.
    """
    v1, v2 = vecs

    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        total: Any = 0.0
        for x, y in zip(a, b, strict=True):
            total += torch.mul(x, y).sum().data.cpu()
        return total

    v1v2, v1v1, v2v2 = dot(v1, v2), dot(v1, v1), dot(v2, v2)
    # ``_min_norm_element_from2``: Python comparisons on host values, clamps included.
    if v1v2 >= v1v1:
        c = 0.999
    elif v1v2 >= v2v2:
        c = 0.001
    else:
        c = float(-1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2)))
    return c, 1.0 - c


def _plain_backward(loss: Tensor, **kwargs: Any) -> None:
    loss.backward(**kwargs)


def _no_mark(phase_end: str) -> None:
    pass


def authors_update(
    params: Mapping[str, Sequence[nn.Parameter]],
    losses: Mapping[str, Tensor],
    optimizer: Any,
    backward: Callable[..., None] = _plain_backward,
    mark: Callable[[str], None] = _no_mark,
) -> int:
    """Everything the official ``code/MMPareto.py`` does after the forward, for any number of encoders.

    Kept deliberately as the authors wrote it (dicts of clones, host-side decisions, a fourth backward),
    generalised only from the hard-coded audio/visual pair to a loop over encoders.

    Args:
        params: encoder -> its parameters.
        losses: ``{"multimodal": ..., <encoder>: ...}`` from one forward.
        optimizer: has ``zero_grad()`` and ``step()`` (a ``LightningOptimizer`` through Lightning).
        backward: ``backward(loss, retain_graph=...)``; Lightning passes ``manual_backward``.
        mark: called at the end of each phase (``"extra backward"``, ``"decision"``, ``"ordinary
            backward"``, ``"rescale"``) by the phase breakdown.

    Returns:
        The number of encoders whose gradients conflicted (``cos <= 0``) this step.
    """
    # The official loop logs every loss with ``.item()`` (three host synchronisations).
    _ = [loss.item() for loss in losses.values()]

    # grads[encoder][loss] = per-tensor clones + the flattened "concat" entry, as in the official code.
    grads: dict[str, dict[str, list[Tensor]]] = {n: {} for n in params}
    for loss_name, loss in losses.items():
        backward(loss, retain_graph=True)
        reached = list(params) if loss_name == MULTIMODAL else [loss_name]
        for enc in reached:
            clones = [p.grad.data.clone() for p in params[enc]]  # type: ignore[union-attr]
            grads[enc][loss_name] = [*clones, torch.cat([g.flatten() for g in clones])]
        optimizer.zero_grad()
    mark("extra backward")

    weights: dict[str, tuple[float, float]] = {}
    conflicts = 0
    for enc in params:
        g_m, g_u = grads[enc][MULTIMODAL], grads[enc][enc]
        cos = F.cosine_similarity(g_m[-1], g_u[-1], dim=0)
        if cos > 0:  # a host synchronisation, as ``if(this_cos_audio>0)``
            weights[enc] = (0.5, 0.5)
        else:
            conflicts += 1
            weights[enc] = _authors_min_norm_2([g_m, g_u])
    mark("decision")

    total = sum(losses.values())
    backward(total)
    mark("ordinary backward")
    for enc, ps in params.items():
        a_m, a_u = weights[enc]
        g_m, g_u = grads[enc][MULTIMODAL], grads[enc][enc]
        for i, p in enumerate(ps):
            three_norm = torch.norm(p.grad.data.clone())  # type: ignore[union-attr]
            new_grad = 2 * a_m * g_m[i] + 2 * a_u * g_u[i]
            new_norm = torch.norm(new_grad)
            diff = three_norm / new_norm
            if diff > 1:  # one host synchronisation per parameter tensor
                p.grad = diff * new_grad * GAMMA_AUTHORS
            else:
                p.grad = new_grad * GAMMA_AUTHORS
    mark("rescale")
    optimizer.step()
    _ = total.item()  # type: ignore[union-attr]  # ``_loss += loss.item()``
    return conflicts


class AuthorsStep(Method):
    """Re-creation of the training step of the official ``code/MMPareto.py`` (see :func:`authors_update`)."""

    name = "authors"

    def __init__(self, net: MultiEncoderNet, batch: Mapping[str, Tensor]) -> None:
        super().__init__(net, batch)
        self.params = net.encoder_params()
        self.conflicts = 0
        self.decisions = 0

    def step(self, mark: Callable[[str], None] = _no_mark) -> None:
        self.optimizer.zero_grad()
        losses = self.net.losses(self.batch)
        mark("forward")
        self.conflicts += authors_update(self.params, losses, self.optimizer, mark=mark)
        self.decisions += len(self.params)


METHOD_CLASSES: dict[str, type[Method]] = {
    "uniform": UniformStep,
    "mmpareto": EngineStep,
    "authors": AuthorsStep,
}


def build_methods(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], names: Sequence[str] = METHODS
) -> dict[str, Method]:
    """Independent copies of the same initial network, one per method."""
    return {n: METHOD_CLASSES[n](copy.deepcopy(base), batch) for n in names}
