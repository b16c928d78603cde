"""The closure MMPareto hands to the optimizer's ``step``, and the optimizers it cannot serve.

An optimizer's closure is meant to re-evaluate the model: compute the loss and the gradients again.
Under MMPareto the gradients come from the training step's forward, the split and the rule, over a
whole accumulation window, which a closure cannot re-run. What a closure *can* serve is what torch's own
optimizers do with it: call it once, first thing in ``step``, before reading ``.grad``. Lightning runs
``on_before_optimizer_step`` (and with it MMPareto's gradient clipping) inside the closure, so it must be
called exactly once.

:class:`StepClosure` is that closure. It returns the window's loss (so an optimizer that reads the
loss value gets the right one) and refuses, with a clear error, an optimizer that uses it to
re-evaluate: a second call (LBFGS, line searches), or a call after the optimizer changed a parameter or
a gradient (SAM and its variants perturb the parameters, clear the gradients, then call the closure).

* torch's own optimizers (``step`` defined in ``torch.optim``, LBFGS excepted) call a given closure once
  at the start of ``step``: their behaviour is known from their code, and they are not checked.
* any other optimizer is watched every step at the cost of a few attribute reads per parameter (the
  version counters of the parameters and of their gradients, and the gradient objects). A change made
  through ``p.data`` bumps no version counter, so on the first step of each fit the parameters and
  gradients are also compared with a copy taken just before ``step`` (kept in host memory, once). On a
  refusal at that first step the parameters are restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import LBFGS

__all__ = ["StepClosure", "calls_closure_first"]


def calls_closure_first(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` is one of torch's own, which call a given closure once, first thing."""
    module = getattr(getattr(type(optimizer), "step", None), "__module__", None) or ""
    return module.startswith("torch.optim.") and not isinstance(optimizer, LBFGS)


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN matching NaN (a parameter may legitimately hold NaN)."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class StepClosure:
    """The closure of one optimizer step: returns the window's loss, refuses re-evaluation.

    Args:
        optimizer: the optimizer about to step (a ``LightningOptimizer`` or the optimizer itself).
        loss: what the closure returns: the loss of the window whose gradients the step applies.
        compare_values: also compare the parameters and gradients with a copy taken just before the
            step (an optimizer not in ``torch.optim``, on its first step of a fit).
        describe: ``parameter -> its name``, for messages.

    Use :meth:`watching` around ``optimizer.step(closure=...)``, then :meth:`check_called`.
    """

    def __init__(
        self,
        optimizer: Any,
        loss: Tensor | None,
        compare_values: bool = False,
        describe: Callable[[Tensor], str] | None = None,
    ) -> None:
        self.optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        self.name = type(self.optimizer).__name__
        self.loss = loss
        self.calls = 0
        self.trusted = calls_closure_first(self.optimizer)
        self.compare_values = compare_values and not self.trusted
        self._describe = describe or (lambda p: f"of shape {tuple(p.shape)}")
        self._params: list[Tensor] = []
        self._versions: list[int] = []
        self._grads: list[Tensor | None] = []
        self._grad_versions: list[int] = []
        self._copies: list[tuple[Tensor, Tensor | None]] | None = None

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Record the parameters' state as the optimizer's own ``step`` begins (after its step pre-hooks,
        which may change gradients legitimately, e.g. clipping)."""
        if self.trusted:
            yield
            return
        register = getattr(self.optimizer, "register_step_pre_hook", None)
        # Recorded now as well, in case the optimizer's step runs no pre-hooks; the copies only once.
        self._record(copies=not callable(register))
        handle = register(lambda *_: self._record(copies=True)) if callable(register) else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def _record(self, copies: bool) -> None:
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._versions = [p._version for p in self._params]
        self._grads = [p.grad for p in self._params]
        self._grad_versions = [-1 if g is None else g._version for g in self._grads]
        if copies and self.compare_values:
            self._copies = [
                (
                    p.detach().to("cpu", copy=True),
                    None if p.grad is None else p.grad.detach().to("cpu", copy=True),
                )
                for p in self._params
            ]

    def __call__(self) -> Tensor | None:
        self.calls += 1
        if self.calls > 1:
            self._refuse(f"called its closure {self.calls} times in one step")
        if not self.trusted:
            changed = self._changed()
            if changed is not None:
                self._refuse(f"changed {changed} before calling its closure")
        return self.loss

    def _changed(self) -> str | None:
        for i, p in enumerate(self._params):
            grad, before = p.grad, self._grads[i]
            if p._version != self._versions[i]:
                return f"parameter {self._describe(p)}"
            if grad is not before or (grad is not None and grad._version != self._grad_versions[i]):
                return f"the gradient of parameter {self._describe(p)}"
        for p, (value, grad) in zip(self._params, self._copies or [], strict=False):
            if not _same(p.detach().cpu(), value):
                return f"parameter {self._describe(p)} (through `.data`)"
            if grad is not None and not _same(p.grad.detach().cpu(), grad):
                return f"the gradient of parameter {self._describe(p)} (through `.data`)"
        return None

    def _refuse(self, what: str) -> None:
        restored = ""
        if self._copies is not None:
            with torch.no_grad():
                for p, (value, _) in zip(self._params, self._copies, strict=True):
                    p.data.copy_(value)
            restored = " The parameters were restored to their values before the step."
        raise MisconfigurationException(
            f"The optimizer {self.name} {what}: it re-evaluates the loss through the closure of `step` "
            "(as SAM-style optimizers and line searches such as LBFGS do). MMPareto's gradients come from "
            "the training step's forward, the per-loss split and the rule, which a closure cannot re-run, "
            "so the optimizer would use stale gradients. Use an optimizer whose `step` calls its closure "
            "at most once, before changing anything (SGD, Adam, AdamW, ...)." + restored
        )

    def check_called(self) -> None:
        """Refuse an optimizer that never called its closure (Lightning's hooks and clipping run in it)."""
        if self.calls == 0:
            raise MisconfigurationException(
                f"The optimizer {self.name} did not call the closure given to its `step`. Lightning runs "
                "`on_before_optimizer_step` and MMPareto's gradient clipping inside that closure, so they "
                "did not run for this step (Lightning's automatic optimization refuses such an optimizer "
                "too). Call the closure at the start of `step`, as torch's optimizers do "
                "(`loss = closure()` when one is given)."
            )
