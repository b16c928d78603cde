"""Where a step through the Trainer spends its time: functions (cProfile) and operators (torch.profiler).

``--profile`` runs one ``Trainer.fit`` per variant with three consecutive windows of ``steps`` steps
after a warm-up: one timed without any profiler, one under :mod:`cProfile` (which Python function costs
what, ``mmpareto_lightning``'s own and the Lightning/optimizer entry points), one under
``torch.profiler`` with input shapes (which operator costs what: a full pass over the encoder gradients
shows up as an operator whose input has an encoder parameter's size). Both profilers slow a step down
somewhat; read their tables as shares of a step, and the first window's time as the step's.
"""

from __future__ import annotations

import copy
import cProfile
import logging
import pstats
import statistics
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .lightning_path import LIGHTNING_VARIANTS, _lightning_modules, make_trainer
from .models import MultiEncoderNet
from .timing import now, sync

# Entry points outside the package whose cumulative time is worth a row (what they include differs:
# in automatic optimization the optimizer step runs the closure, i.e. the forward and the backward).
_ENTRY_POINTS = {"manual_backward", "backward", "step", "zero_grad", "log", "log_dict", "training_step"}
_OWN_PACKAGE = "mmpareto_lightning"


class _Windows:
    """A Lightning callback: at each ``on_train_batch_start`` it closes one window and opens the next."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        import lightning.pytorch as pl

        self.device, self.warmup, self.steps = device, warmup, steps
        self.stamps: list[float] = []
        self.cprofile = cProfile.Profile()
        self.torch_profile: Any = None
        windows = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
                windows.at_batch_start(index)

        self.callback = Callback()

    def at_batch_start(self, index: int) -> None:
        sync(self.device)
        first, second, third = (self.warmup + k * self.steps for k in (1, 2, 3))
        if self.warmup <= index <= first:
            self.stamps.append(now())
        if index == first:
            self.cprofile.enable()
        elif index == second:
            self.cprofile.disable()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self.torch_profile.__enter__()
        elif index == third:
            self.torch_profile.__exit__(None, None, None)


def _function_rows(stats: pstats.Stats, steps: int) -> list[str]:
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if _OWN_PACKAGE in path or (name in _ENTRY_POINTS and ("lightning" in path or "torch" in path)):
            short = path[path.rfind(_OWN_PACKAGE) :] if _OWN_PACKAGE in path else path.rsplit("/", 2)[-1]
            rows.append((cumulative, f"| `{short}:{line}` {name} | {calls / steps:.1f} ", own))
    rows.sort(reverse=True)
    return [f"{text}| {cum / steps * 1e3:.2f} | {own / steps * 1e3:.2f} |" for cum, text, own in rows[:25]]


def _builtin_rows(stats: pstats.Stats, steps: int) -> list[str]:
    rows = []
    for (path, _, name), (_, calls, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if path == "~" and ("torch" in name or "Tensor" in name):
            rows.append((own, f"| `{name}` | {calls / steps:.1f} | {own / steps * 1e3:.2f} |"))
    rows.sort(reverse=True)
    return [text for _, text in rows[:15]]


def _operator_rows(profile: Any, steps: int, cuda: bool) -> list[str]:
    events = sorted(
        profile.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    rows = []
    for e in events[:20]:
        shapes = ", ".join(str(list(s)) for s in e.input_shapes if s) or "-"
        device_ms = f" | {getattr(e, 'self_device_time_total', 0.0) / steps / 1e3:.2f}" if cuda else ""
        rows.append(
            f"| `{e.key}` | {shapes} | {e.count / steps:.1f} | {e.self_cpu_time_total / steps / 1e3:.2f}"
            f"{device_ms} |"
        )
    return rows


def profile_lightning(
    base: MultiEncoderNet,
    batch: Mapping[str, Tensor],
    device: torch.device,
    variant_key: str,
    steps: int,
    warmup: int = 3,
) -> str:
    """Markdown report of one variant: its unprofiled step time, then the function and operator tables."""
    variant = LIGHTNING_VARIANTS[variant_key]
    module, callbacks = _lightning_modules(copy.deepcopy(base), variant)
    windows = _Windows(device, warmup, steps)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, loader = make_trainer(device, batch, warmup + 3 * steps + 1, [*callbacks, windows.callback])
        trainer.fit(module, train_dataloaders=loader)
    step_ms = [(b - a) * 1e3 for a, b in zip(windows.stamps, windows.stamps[1:], strict=False)]
    stats = pstats.Stats(windows.cprofile)
    device_column = (" | own CUDA ms/step", "|---:") if device.type == "cuda" else ("", "")
    return "\n".join(
        [
            f"### {variant.label}: median step {statistics.median(step_ms):.2f} ms over {len(step_ms)} "
            "unprofiled steps",
            "",
            "| function (cProfile) | calls/step | cumulative ms/step | own ms/step |",
            "|---|---:|---:|---:|",
            *_function_rows(stats, steps),
            "",
            "| tensor built-in (cProfile) | calls/step | own ms/step |",
            "|---|---:|---:|",
            *_builtin_rows(stats, steps),
            "",
            f"| operator (torch.profiler) | input shapes | calls/step | own CPU ms/step{device_column[0]} |",
            f"|---|---|---:|---:{device_column[1]}|",
            *_operator_rows(windows.torch_profile, steps, device.type == "cuda"),
        ]
    )
