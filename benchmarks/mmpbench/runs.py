"""The measurements behind the main table and the scaling table (pre-check, timing, peak memory)."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from .check import AUTHORS_TOLERANCE, CHECK_TOLERANCE, check_correctness
from .memory import grad_bytes, peak_memory_of_methods
from .methods import AuthorsStep, build_methods
from .models import ModelSpec, build_network_and_batch
from .report import MainResult
from .timing import Timing, time_interleaved


def run_main(
    spec: ModelSpec,
    n_encoders: int,
    batch_size: int,
    device: torch.device,
    iters: int,
    warmup: int,
    seed: int,
    memory: bool = True,
    timing: bool = True,
) -> MainResult:
    """Correctness pre-check, interleaved timing of the plain steps and peak memory.

    With ``timing=False`` only the pre-check and the memory pass run (e.g. ResNet-18 shapes on a CPU).
    """
    base, batch = build_network_and_batch(spec, n_encoders, batch_size, device, seed)
    check = check_correctness(base, batch)
    if not check.passed:
        raise AssertionError(
            f"Correctness pre-check failed (tolerance {CHECK_TOLERANCE} for the engine, "
            f"{AUTHORS_TOLERANCE} for the authors' re-creation): engine {check.engine_error}, "
            f"authors {check.authors_error}. "
            "Refusing to time a wrong computation."
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    timings: dict[str, Timing] = {}
    conflict_rate = float("nan")
    if timing:
        methods = build_methods(base, batch)
        timings = time_interleaved({n: m.step for n, m in methods.items()}, iters, warmup, device)
        authors = methods["authors"]
        assert isinstance(authors, AuthorsStep)
        conflict_rate = authors.conflicts / max(1, authors.decisions)
        for m in methods.values():
            m.close()
        del methods

    peaks: dict[str, int | None] = {}
    memory_method = "not measured"
    if memory:
        peaks, memory_method = peak_memory_of_methods(base, batch, device)
    return MainResult(timings, peaks, memory_method, grad_bytes(base), check, conflict_rate)


def run_scaling(
    spec: ModelSpec,
    counts: Sequence[int],
    batch_size: int,
    device: torch.device,
    iters: int,
    warmup: int,
    seed: int,
) -> dict[int, dict[str, Timing]]:
    """Interleaved timing of the three methods for each encoder count."""
    out: dict[int, dict[str, Timing]] = {}
    for k in counts:
        base, batch = build_network_and_batch(spec, k, batch_size, device, seed)
        methods = build_methods(base, batch)
        out[k] = time_interleaved({n: m.step for n, m in methods.items()}, iters, warmup, device)
        for m in methods.values():
            m.close()
        del methods, base, batch
        gc.collect()
    return out
