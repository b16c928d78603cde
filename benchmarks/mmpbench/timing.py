"""Interleaved wall-clock timing, per-round ratios, and the per-phase breakdown of the plain steps."""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .methods import AuthorsStep, EngineStep, UniformStep
from .models import MultiEncoderNet


@dataclass
class Timing:
    """Per-step wall-clock times of one method, in milliseconds.

    Attributes:
        name: the method or row.
        times_ms: the timed steps, in the order they ran.
        round_size: ``None`` when the methods were interleaved step by step (the i-th steps of two
            methods ran milliseconds apart); otherwise the steps ran in consecutive blocks of this many,
            one block per round and method (the through-Lightning ``rounds`` schedule).
    """

    name: str
    times_ms: list[float]
    round_size: int | None = None

    def rounds(self) -> list[list[float]]:
        """The steps of each round (each step its own round when interleaved step by step)."""
        k = self.round_size or 1
        return [self.times_ms[i : i + k] for i in range(0, len(self.times_ms), k)]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr(self) -> float:
        if len(self.times_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q3 - q1


def paired_ratios(timing: Timing, base: Timing) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``timing / base``.

    The interleaved timers run one step of every method per round, so the i-th times of two methods were
    taken within milliseconds of each other: their ratio cancels the machine's slow drifts (other jobs on
    shared cores), which the ratio of the two medians does not. Timings taken in rounds of several
    steps (``round_size``) compare the medians of each round.
    """
    if timing.round_size != base.round_size:
        raise ValueError(f"{timing.name!r} and {base.name!r} were not timed in the same rounds.")
    mine, theirs = timing.rounds(), base.rounds()
    ratios = [statistics.median(t) / statistics.median(b) for t, b in zip(mine, theirs, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


# What a step's time is: wall-clock by default; "cpu" is this process's CPU time (all its threads), which a
# shared machine's other jobs do not inflate by preempting it. With one thread (``--threads 1``) it is the
# work done; with more, idle OpenMP threads spin and their spinning is counted too. Not for CUDA, whose
# work runs on the device.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: list[Callable[[], float]] = [time.perf_counter]


def use_clock(name: str) -> None:
    """Select the clock of every timer in the benchmark (``"wall"`` or ``"cpu"``)."""
    _clock[0] = CLOCKS[name]


def now() -> float:
    """The selected clock, in seconds."""
    return _clock[0]()


def sync(device: torch.device) -> None:
    """Wait for the device, so that a host clock brackets the device's work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: Mapping[str, Callable[[], None]], iters: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """Run every step ``warmup + iters`` times, one of each per round, rotating the order every round.

    Interleaving spreads slow phases of a shared machine over all methods; rotating the order removes
    any bias from always running right after the same method (cache state, allocator state).
    """
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    for r in range(warmup + iters):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = now()
            steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append((now() - start) * 1e3)
    return {n: Timing(n, t) for n, t in times.items()}


# Phases of a training step, in the order they run (the authors' rule runs in two parts, around the
# ordinary backward: its decision before, its rescale after; the table adds them up).
PHASES = (
    "forward",
    "extra backward(s)",
    "ordinary backward",
    "rule",
    "optimizer step",
)
PHASE_METHODS = ("uniform", "mmpareto", "authors")


def time_phases(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], iters: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median time of each phase of the uniform, MMPareto and authors' steps (interleaved, per round).

    * ``extra backward(s)``: ours, the head-level cotangents and the one extra encoder backward; the
      authors', one ``backward(retain_graph=True)`` per loss with the per-tensor clones and ``zero_grad``.
    * ``ordinary backward``: the backward of the summed loss (the authors' fourth backward).
    * ``rule``: ours, the rule and the gradient bookkeeping; the authors', the cosine decision and the
      min-norm solver with their host synchronisations plus the per-tensor rescale.

    The device is synchronised at every phase boundary, so on CUDA the phases add up to a little more
    than the step time of the main table.
    """
    uniform, ours = UniformStep(copy.deepcopy(base), batch), EngineStep(copy.deepcopy(base), batch)
    authors = AuthorsStep(copy.deepcopy(base), batch)
    times: dict[str, dict[str, list[float]]] = {m: {} for m in PHASE_METHODS}

    def stamp() -> float:
        sync(device)
        return now()

    def run_uniform() -> dict[str, float]:
        uniform.optimizer.zero_grad(set_to_none=True)
        t0 = stamp()
        losses = uniform.net.losses(batch)
        t1 = stamp()
        sum(losses.values()).backward()  # type: ignore[union-attr]
        t2 = stamp()
        uniform.optimizer.step()
        t3 = stamp()
        return {PHASES[0]: t1 - t0, PHASES[2]: t2 - t1, PHASES[4]: t3 - t2}

    def run_ours() -> dict[str, float]:
        marks: dict[str, float] = {}

        def backward(loss: Tensor) -> None:
            # The engine's ordinary backward of the summed loss: the stamps split the engine's work.
            marks["start"] = stamp()
            loss.backward()
            marks["end"] = stamp()

        ours.optimizer.zero_grad(set_to_none=True)
        t0 = stamp()
        with ours.engine.capture():
            losses = ours.net.losses(batch)
        t1 = stamp()
        ours.engine.backward(losses, backward_fn=backward)
        ours.engine.integrate()
        t2 = stamp()
        ours.optimizer.step()
        t3 = stamp()
        return {
            PHASES[0]: t1 - t0,
            PHASES[1]: marks["start"] - t1,
            PHASES[2]: marks["end"] - marks["start"],
            PHASES[3]: t2 - marks["end"],
            PHASES[4]: t3 - t2,
        }

    def run_authors() -> dict[str, float]:
        marks = {"start": stamp()}
        authors.step(mark=lambda phase_end: marks.__setitem__(phase_end, stamp()))
        end = stamp()
        # zero_grad runs before the forward inside the step, so "forward" includes it (a few pointer
        # resets: the gradients were set to None by the previous step's last zero_grad).
        return {
            PHASES[0]: marks["forward"] - marks["start"],
            PHASES[1]: marks["extra backward"] - marks["forward"],
            PHASES[2]: marks["ordinary backward"] - marks["decision"],
            PHASES[3]: (marks["decision"] - marks["extra backward"])
            + (marks["rescale"] - marks["ordinary backward"]),
            PHASES[4]: end - marks["rescale"],
        }

    runs = {"uniform": run_uniform, "mmpareto": run_ours, "authors": run_authors}
    gc.collect()
    for r in range(warmup + iters):
        shift = r % len(PHASE_METHODS)
        for name in PHASE_METHODS[shift:] + PHASE_METHODS[:shift]:
            phases = runs[name]()
            if r >= warmup:
                for phase, seconds in phases.items():
                    times[name].setdefault(phase, []).append(seconds * 1e3)
    ours.close()
    return {
        name: {ph: statistics.median(v) for ph, v in by_phase.items()} for name, by_phase in times.items()
    }
