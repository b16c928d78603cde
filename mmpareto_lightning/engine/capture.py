"""Capture each encoder's outputs during a forward pass, behind a fresh autograd boundary.

The split differentiates every loss with respect to the encoders' outputs. Encoders often return
several tensors where one is computed from another (``(tokens, tokens[:, 0])``, a HuggingFace output
with ``last_hidden_state`` and a ``pooler_output`` computed from it, the same tensor twice). The gradient
of a loss with respect to ``tokens`` then *includes* the path through ``tokens[:, 0]``, and pushing both
cotangents back through the encoder would count that path twice.

So the forward hook hands the rest of the model an alias (a ``view_as``, no copy) of every output
tensor instead of the tensor itself: the heads only ever see the aliases, and the encoder's internal
dependence between its outputs stays behind them. The gradient with respect to an alias is exactly
what flows into the encoder through that output, each path once.

Hooks are registered only while a capture is open, so the model holds no hook, closure or graph tensor
between steps (it can be deep-copied and pickled during a fit).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CapturedOutput", "OutputCapture", "map_tensors"]


@dataclasses.dataclass
class CapturedOutput:
    """One output tensor of an encoder, as the rest of the model saw it."""

    alias: Tensor
    version: int


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor], other: Callable[[Any], None] | None = None) -> Any:
    """Rebuild ``obj`` with ``fn`` applied to every tensor inside tuples, lists, mappings and dataclasses.

    Named tuples, ``OrderedDict`` and ``ModelOutput``-style classes (a dataclass that is also an ordered
    dict) keep their type. Objects of any other type are returned unchanged (and passed to ``other``,
    if given, unless they are plain values: ``None``, numbers, strings, enums, dtypes, devices).
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn, other) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return type(obj)(map_tensors(v, fn, other) for v in obj)
    if isinstance(obj, Mapping):
        new = copy.copy(obj)
        for key, value in obj.items():
            mapped = map_tensors(value, fn, other)
            if mapped is not value:
                new[key] = mapped  # a ModelOutput's __setitem__ also sets the attribute
        return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            mapped = map_tensors(value, fn, other)
            if mapped is not value:
                object.__setattr__(new, f.name, mapped)
        return new
    if other is not None and not isinstance(obj, _PLAIN):
        other(obj)
    return obj


_PLAIN = (type(None), numbers.Number, str, bytes, enum.Enum, torch.dtype, torch.device, type)


def _holds_grad_tensor(obj: Any, depth: int = 2) -> bool:
    """Whether an object of a type :func:`map_tensors` does not look into keeps a tensor that requires
    grad in its attributes (a few levels down): for error messages only."""
    if isinstance(obj, Tensor):
        return obj.requires_grad
    if depth == 0:
        return False
    if isinstance(obj, (list, tuple)):
        values: Any = obj
    elif isinstance(obj, Mapping):
        values = obj.values()
    else:
        try:
            values = vars(obj).values()
        except TypeError:  # no __dict__: its __slots__, if any
            values = [getattr(obj, n, None) for n in getattr(type(obj), "__slots__", ())]
    return any(_holds_grad_tensor(v, depth - 1) for v in values)


class OutputCapture:
    """Records the outputs of named modules during the forward passes run inside :meth:`capture`.

    Args:
        modules: name -> module whose outputs are captured.

    Example::

        capture = OutputCapture({"audio": net.audio, "visual": net.visual})
        with capture.capture():
            losses = compute_losses(net, batch)
        capture.outputs["audio"]           # the aliases the heads saw
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.outputs: dict[str, list[CapturedOutput]] = {name: [] for name in self.modules}
        # Type names of objects the modules returned that hold tensors but that the capture cannot look
        # into (not a tuple, list, dict or dataclass): their tensors reach the heads uncaptured.
        self.opaque: dict[str, list[str]] = {name: [] for name in self.modules}

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the modules' outputs during the forward pass run inside this block."""
        self.clear()
        handles = [
            module.register_forward_hook(_CaptureHook(self.outputs[name], self.opaque[name]))
            for name, module in self.modules.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def clear(self) -> None:
        """Let go of the captured tensors (and the graph they hold)."""
        for outputs in self.outputs.values():
            outputs.clear()
        for opaque in self.opaque.values():
            opaque.clear()

    def modified_in_place(self) -> list[str]:
        """Names of the modules an output of which was modified in place after the forward."""
        return [
            name
            for name, outputs in self.outputs.items()
            if any(o.alias._version != o.version for o in outputs)
        ]

    def tensors(self, names: Sequence[str]) -> tuple[list[Tensor], list[str]]:
        """The captured aliases of ``names``, flat, and the name each belongs to."""
        tensors, owner = [], []
        for name in names:
            for o in self.outputs[name]:
                tensors.append(o.alias)
                owner.append(name)
        return tensors, owner


class _CaptureHook:
    """Forward hook: replace each output tensor that requires grad by a recorded alias."""

    def __init__(self, sink: list[CapturedOutput], opaque: list[str]) -> None:
        self.sink = sink
        self.opaque = opaque

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None

        def boundary(t: Tensor) -> Tensor:
            if not t.requires_grad:
                return t
            alias = t.view_as(t)
            self.sink.append(CapturedOutput(alias, alias._version))
            return alias

        def other(obj: Any) -> None:
            if _holds_grad_tensor(obj) and type(obj).__name__ not in self.opaque:
                self.opaque.append(type(obj).__name__)

        return map_tensors(output, boundary, other)
