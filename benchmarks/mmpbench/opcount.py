"""ATen operators dispatched by one training step: the host's work, counted instead of timed.

A step that is bound by the host (tiny tensors, or a GPU waiting for launches) costs about what its
operators cost to dispatch, so the number of operators a step dispatches is a proxy of its host time and
of its kernel launches that does not depend on the machine's load: the same code, seed and batch give
the same count on every run. A :class:`~torch.utils._python_dispatch.TorchDispatchMode` counts every
operator that reaches the dispatcher below autograd (forward, every backward, the rule, the optimizer,
Lightning's own bookkeeping), each call once: the operators a kernel calls internally (e.g. the
per-tensor loop of a ``_foreach_`` fallback) are not dispatched again through the mode.

One steady-state step is counted (after ``warmup`` steps, which cover the first step's one-time graph
checks and allocations): a plain-PyTorch step of each method, and, through a real ``Trainer``, everything
between two ``on_train_batch_start`` calls, i.e. the same interval the through-Lightning timings use.
The random state is seeded before each method and row: the authors' procedure branches on the
gradients (its host-side decisions), and with dropout (BERT) those depend on the random masks.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .lightning_path import LIGHTNING_VARIANTS, _lightning_modules, make_trainer
from .methods import METHOD_CLASSES, METHODS
from .models import MultiEncoderNet


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active, by name (``aten::add_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """The operators ``fn()`` dispatches, by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


def count_plain_ops(
    base: MultiEncoderNet,
    batch: Mapping[str, Tensor],
    warmup: int = 2,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
) -> dict[str, Counter[str]]:
    """Operators of one plain-PyTorch step of each method (its own copy of ``base``), after ``warmup``."""
    out: dict[str, Counter[str]] = {}
    for name in methods:
        torch.manual_seed(seed)
        method = METHOD_CLASSES[name](copy.deepcopy(base), batch)
        for _ in range(warmup):
            method.step()
        out[name] = count_ops(method.step)
        method.close()
    return out


class _CountOneStep:
    """A Lightning callback: counts the operators from the ``warmup``-th batch start to the next."""

    def __init__(self, warmup: int) -> None:
        import lightning.pytorch as pl

        self.warmup = warmup
        self.counter = OpCounter()
        self.active = False
        self.done = False
        state = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
                if index == state.warmup:
                    state.counter.__enter__()
                    state.active = True
                elif index == state.warmup + 1 and state.active:
                    state.stop()
                    state.done = True

        self.callback = Callback()

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.counter.__exit__(None, None, None)


def count_lightning_ops(
    base: MultiEncoderNet,
    batch: Mapping[str, Tensor],
    device: torch.device,
    variants: Sequence[str],
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, Counter[str]]:
    """Operators of one steady-state step through a real ``Trainer``, per through-Lightning variant.

    Returns:
        row label (as in the through-Lightning table) -> operator counts.
    """
    out: dict[str, Counter[str]] = {}
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in variants:
            variant = LIGHTNING_VARIANTS[key]
            module, callbacks = _lightning_modules(copy.deepcopy(base), variant)
            one_step = _CountOneStep(warmup)
            trainer, loader = make_trainer(device, batch, warmup + 2, [*callbacks, one_step.callback])
            torch.manual_seed(seed)
            try:
                trainer.fit(module, train_dataloaders=loader)
            finally:
                one_step.stop()  # a fit that failed mid-step must not leave the mode on the stack
            if not one_step.done:
                raise RuntimeError(f"The Trainer of {variant.label!r} stopped before its counted step ended.")
            out[variant.label] = one_step.counter.counts
    return out


def format_op_table(plain: Mapping[str, Counter[str]], lightning: Mapping[str, Counter[str]]) -> str:
    """Markdown table: ATen operators per step of each plain method and each through-Lightning row."""
    lines = [
        "| step | ATen ops per step | x uniform of the same kind |",
        "|---|---:|---:|",
    ]
    for counts, base_name, suffix in (
        (plain, "uniform", " (plain PyTorch)"),
        (lightning, LIGHTNING_VARIANTS["uniform"].label, ""),
    ):
        base = counts.get(base_name)
        for name, c in counts.items():
            total = sum(c.values())
            ratio = f"{total / sum(base.values()):.2f}x" if base else "n/a"
            lines.append(f"| {name}{suffix} | {total} | {ratio} |")
    return "\n".join(lines)


def format_op_difference(
    plain: Mapping[str, Counter[str]], lightning: Mapping[str, Counter[str]], top: int = 15
) -> str:
    """Markdown table: the operators MMPareto's steps dispatch beyond the uniform steps, most first.

    Ranked by the larger of the two differences (plain engine step - plain uniform step, and Lightning
    ``mmpareto`` row - Lightning ``uniform`` row); every measured step gets a column.
    """
    columns = {f"{k} (plain)": v for k, v in plain.items()}
    columns.update(lightning)
    pairs = [(plain.get("mmpareto"), plain.get("uniform"))]
    pairs.append(
        (
            lightning.get(LIGHTNING_VARIANTS["mmpareto"].label),
            lightning.get(LIGHTNING_VARIANTS["uniform"].label),
        )
    )
    extra: Counter[str] = Counter()
    for ours, base in pairs:
        if ours is not None and base is not None:
            for op in set(ours) | set(base):
                extra[op] = max(extra[op], ours[op] - base[op])
    ranked = [op for op, n in extra.most_common() if n > 0][:top]
    lines = [
        "| operator | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for op in ranked:
        lines.append(f"| `{op}` | " + " | ".join(str(c[op]) for c in columns.values()) + " |")
    return "\n".join(lines)
