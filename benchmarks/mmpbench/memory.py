"""Peak memory of one training step of each method (CUDA allocator statistics, or PyTorch's MemTracker)."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .methods import METHOD_CLASSES, METHODS, Method
from .models import ModelSpec, MultiEncoderNet, build_network_and_batch

MiB = 2**20


def grad_bytes(net: MultiEncoderNet) -> int:
    """Bytes of one copy of every encoder's gradient."""
    return sum(p.numel() * p.element_size() for ps in net.encoder_params().values() for p in ps)


def peak_memory_bytes(factory: Callable[[], Method], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes of one training step of a freshly built method, and how it was measured.

    Counts the method's whole footprint (parameters, gradients, optimizer state, any state the method
    keeps between steps, activations and temporaries), not the input batch. CUDA: the caching
    allocator's ``max_memory_allocated`` over two steps after two warm-up steps, minus what was
    allocated before the method was built. CPU: PyTorch's ``MemTracker`` (tensor storages created or
    registered, freed when their storage dies) over one step after one warm-up step.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        method = factory()
        for _ in range(2):
            method.step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            method.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method.close()
        del method
        gc.collect()
        torch.cuda.empty_cache()
        return peak, "torch.cuda.max_memory_allocated"
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as err:  # private API: report rather than fail
        return None, f"MemTracker unavailable ({err})"
    method = factory()
    method.step()
    try:
        tracker = MemTracker()
        tracker.track_external(method.net, method.optimizer, *method.persistent_tensors())
        with tracker:
            method.step()
        peak = int(tracker.get_tracker_snapshot("peak")[device]["Total"])
    except Exception as err:  # the tracker is a private API; a failure must not end the run
        return None, f"MemTracker failed ({type(err).__name__}: {err})"
    finally:
        method.close()
    return peak, "torch MemTracker (tensor storages)"


def peak_memory_of_methods(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], device: torch.device
) -> tuple[dict[str, int | None], str]:
    """Peak bytes of every method's step, each built fresh from a copy of ``base``, and how measured."""
    peaks: dict[str, int | None] = {}
    memory_method = "not measured"
    for name in METHODS:
        peaks[name], memory_method = peak_memory_bytes(
            lambda name=name: METHOD_CLASSES[name](copy.deepcopy(base), batch), device
        )
    return peaks, memory_method


@dataclass
class MemoryPoint:
    """Peak memory of every method at one batch size."""

    batch_size: int
    peaks: dict[str, int | None]
    encoder_grad_bytes: int


def run_memory_sweep(
    spec: ModelSpec, n_encoders: int, batch_sizes: Sequence[int], device: torch.device, seed: int
) -> tuple[list[MemoryPoint], str]:
    """Peak memory of every method at each batch size (the same network, freshly built per method)."""
    points: list[MemoryPoint] = []
    memory_method = "not measured"
    for size in batch_sizes:
        base, batch = build_network_and_batch(spec, n_encoders, size, device, seed)
        peaks, memory_method = peak_memory_of_methods(base, batch, device)
        points.append(MemoryPoint(size, peaks, grad_bytes(base)))
        gc.collect()
    return points, memory_method
