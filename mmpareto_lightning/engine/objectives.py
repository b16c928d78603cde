"""What the split works with: the named losses (checked), and each encoder's objectives and gradients."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmpareto_lightning.engine.safeguards import GradientSplittingError, reaches_parameters

__all__ = [
    "RESERVED_LOSS_KEYS",
    "EncoderObjectives",
    "describe_objects",
    "not_reaching_message",
    "validate_losses",
]

# "loss" is what Lightning users return for automatic optimization; here it would be one more objective
# (counting the others twice when it is their sum), so it is refused.
RESERVED_LOSS_KEYS: tuple[str, ...] = ("loss",)


@dataclass
class EncoderObjectives:
    """The gradient layout of one encoder in the current step (or accumulation window).

    Attributes:
        name: the encoder's name (also the key of its unimodal loss).
        params: the encoder's trainable parameters this step, in layout order.
        objectives: names of the losses that reach the encoder; ``objectives[0]`` is the multimodal loss,
            ``objectives[1]`` the encoder's own loss, then the others in the order the losses were given.
        grads: per objective, one gradient tensor per parameter, valid after
            :meth:`GradientSplitter.backward` until :meth:`GradientSplitter.close_window`. ``grads[1]``
            are the parameters' ``.grad`` tensors themselves.
        reached: per parameter, whether any loss reached it in the window (plain autograd leaves the
            others' ``.grad`` at ``None``, and so does the engine after the rule).
    """

    name: str
    params: list[nn.Parameter]
    objectives: list[str] = field(default_factory=list)
    grads: list[list[Tensor]] = field(default_factory=list)
    reached: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reached = [False] * len(self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def add_gradients(
        self,
        k: int,
        grads: Sequence[Tensor | None],
        to_local: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        """Add one backward's gradients of objective ``k`` (one per parameter; ``None`` where it does not
        reach the parameter, taken as zeros) to the window's, marking the parameters it reached.
        ``to_local`` maps them to the tensors the rule reads (FSDP: the local shards)."""
        new = []
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if g is None:
                g = torch.zeros_like(p)
            else:
                self.reached[i] = True
            new.append(g)
        if to_local is not None:
            new = to_local(new)
        if not self.grads:
            self.grads = [[] for _ in self.objectives]
        if self.grads[k]:
            torch._foreach_add_(self.grads[k], new)
        else:
            self.grads[k] = new


def validate_losses(losses: Mapping[str, Tensor], multimodal_key: str) -> dict[str, Tensor]:
    """Check the named losses (scalar, real floating point, with a graph, the keys required)."""
    if not isinstance(losses, Mapping):
        raise GradientSplittingError(
            f"Losses must be a mapping of name -> scalar loss tensor, got {type(losses).__name__}."
        )
    reserved = [k for k in RESERVED_LOSS_KEYS if k in losses]
    if reserved:
        raise GradientSplittingError(
            f"The loss key {reserved[0]!r} is reserved: every named loss is an objective, so a "
            f"{reserved[0]!r} that sums the others would count them twice. Return only the named "
            f"losses ({multimodal_key!r}, one per encoder, any extra ones); their sum is logged "
            "as `mmpareto/loss`."
        )
    if multimodal_key not in losses:
        raise GradientSplittingError(
            f"Missing loss {multimodal_key!r}: got keys {sorted(losses)}. The multimodal loss must "
            f"be under {multimodal_key!r} and each encoder's unimodal loss under the encoder's name."
        )
    checked: dict[str, Tensor] = {}
    for name, loss in losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise GradientSplittingError(f"Loss {name!r} must be a scalar tensor, got {what}.")
        if not loss.is_floating_point():
            raise GradientSplittingError(
                f"Loss {name!r} has dtype {loss.dtype}; a loss must be a real floating-point scalar "
                "(integer and complex values have no gradient to integrate)."
            )
        if not loss.requires_grad:
            raise GradientSplittingError(
                f"Loss {name!r} does not require grad: it was computed without gradients or detached."
            )
        checked[name] = loss.reshape(())
    return checked


def not_reaching_message(
    enc: str, loss_name: str, role: str, loss: Tensor, encoder: nn.Module, opaque: Sequence[str]
) -> str:
    """Why a required loss does not reach the captured output of ``enc`` (on the error path only)."""
    params = {id(p) for p in encoder.parameters()}
    if not reaches_parameters(loss, params):
        return (
            f"The {role} loss {loss_name!r} does not depend on encoder {enc!r}, so there is nothing "
            "to integrate. Compute it from that encoder's output (for the unimodal loss: a unimodal "
            "head on the encoder's features). On a batch where the encoder must stay out (a missing "
            "modality, or one left out of the fusion), do not call it and leave its loss out."
        )
    path = (
        f"the encoder returned part of its output inside {describe_objects(opaque)}, which MMPareto cannot "
        "look into, or "
        if opaque
        else ""
    )
    return (
        f"The {role} loss {loss_name!r} depends on encoder {enc!r}, but not through the output "
        f"MMPareto captured from the encoder's forward: {path}a head reads a tensor the encoder did "
        "not return (stashed on the module, e.g. `self.features = z` read as `encoder.features`, or "
        "an intermediate feature). The per-loss gradients are split at the tensors the encoder's "
        "forward returns (alone or in tuples, lists, dicts and dataclasses): return the features "
        "from `forward` and compute every head from that return value."
    )


def no_output_message(name: str, opaque: Sequence[str]) -> str:
    """Why encoder ``name`` has a loss but no captured output (its output inside objects of the types
    ``opaque``, or the encoder not called as a module)."""
    if opaque:
        return (
            f"Encoder {name!r} returned its output inside {describe_objects(opaque)}, which MMPareto "
            "cannot look into: it captures the tensors an encoder's forward returns, alone or "
            "in tuples, lists, dicts and dataclasses (ModelOutput included). Return the "
            f"tensors (or make {opaque[0]} a dataclass or a NamedTuple) and compute the heads "
            "from what the encoder returns."
        )
    return (
        f"Encoder {name!r} produced no output that requires grad during the forward pass, but "
        f"its loss {name!r} is there. Call the encoder module itself (its forward hook captures "
        "the output; calling one of its methods, such as `forward_features`, bypasses the hook) "
        "inside the training step, with gradients enabled (reentrant activation "
        "checkpointing of inputs that do not require grad also drops the graph: use "
        "checkpoint(..., use_reentrant=False)). For a missing modality, leave the encoder "
        "uncalled and its loss out."
    )


def describe_objects(type_names: Sequence[str]) -> str:
    listed = " / ".join(f"a {n}" for n in type_names)
    return f"{listed} object" if len(type_names) == 1 else f"{listed} objects"
