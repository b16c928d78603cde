"""CUDA kernels launched by one call, counted by the CUDA profiler (``torch.profiler`` with CUDA activity).

On a GPU a short step is bound by launches, so the number of kernels the rule and the step launch is the
quantity to bring down. Counted, after warm-up (the first step allocates, checks the graph once and lets
cuDNN pick its kernels), from the profiler's trace: ``kernel`` events (every kernel, whoever launched it:
ATen, cuBLAS, cuDNN), ``gpu_memcpy`` and ``gpu_memset`` events, and the runtime's synchronising calls
(``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``: a host read such as
``.item()`` is a copy followed by one of them), less the one device synchronisation that closes the
profiled region.

Rows: one whole step of each plain method (``uniform``, ``mmpareto``, ``authors``) and one call of
``MMParetoEngine.integrate()`` (the rule and the write into ``.grad``) inside an otherwise ordinary
MMPareto step.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .methods import METHOD_CLASSES, METHODS, EngineStep
from .models import MultiEncoderNet

_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass(frozen=True)
class KernelCount:
    """What one profiled call put on the device."""

    kernels: int
    memcpys: int
    memsets: int
    syncs: int
    top: tuple[tuple[str, int], ...] = ()


def summarize_trace(events: Iterable[Mapping[str, Any]], own_syncs: int = 0, top: int = 10) -> KernelCount:
    """Count the device events of a Kineto (chrome) trace; ``own_syncs`` of the synchronisations are ours."""
    categories: Counter[str] = Counter()
    names: Counter[str] = Counter()
    syncs = 0
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = str(e.get("cat", "")).lower()
        categories[cat] += 1
        name = str(e.get("name", ""))
        if cat == "kernel":
            names[name] += 1
        elif cat in ("cuda_runtime", "cuda_driver") and any(name.startswith(s) for s in _SYNCS):
            syncs += 1
    return KernelCount(
        kernels=categories["kernel"],
        memcpys=categories["gpu_memcpy"],
        memsets=categories["gpu_memset"],
        syncs=max(0, syncs - own_syncs),
        top=tuple(names.most_common(top)),
    )


def count_kernels(fn: Callable[[], Any], device: torch.device) -> KernelCount:
    """Profile one call of ``fn`` (CPU and CUDA activity) and count what it put on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    own_syncs = 0
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
        own_syncs = 1
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # every kernel of the call has run before the trace closes
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return summarize_trace(events, own_syncs=own_syncs)


def count_step_kernels(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], device: torch.device, warmup: int = 3
) -> dict[str, KernelCount]:
    """Kernels of one step of each plain method and of one ``engine.integrate()`` call, after warm-up."""
    out: dict[str, KernelCount] = {}
    for name in METHODS:
        method = METHOD_CLASSES[name](copy.deepcopy(base), batch)
        for _ in range(warmup):
            method.step()
        out[f"{name} step"] = count_kernels(method.step, device)
        method.close()
    ours = EngineStep(copy.deepcopy(base), batch)
    for _ in range(warmup):
        ours.step()
    ours.optimizer.zero_grad(set_to_none=True)
    with ours.engine.capture():
        losses = ours.net.losses(batch)
    ours.engine.backward(losses)
    out["engine.integrate() (in the mmpareto step)"] = count_kernels(ours.engine.integrate, device)
    ours.optimizer.step()
    ours.close()
    return out


def format_kernel_table(counts: Mapping[str, KernelCount]) -> str:
    """Markdown table of the counts, the difference of the two steps, and the most launched kernels."""
    lines = [
        "| one call, after warm-up | CUDA kernels | memcpy | memset | host synchronisations |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in counts.items():
        lines.append(f"| {name} | {c.kernels} | {c.memcpys} | {c.memsets} | {c.syncs} |")
    uniform, ours = counts.get("uniform step"), counts.get("mmpareto step")
    if uniform is not None and ours is not None:
        lines += [
            "",
            f"mmpareto step - uniform step: {ours.kernels - uniform.kernels} kernels "
            f"({ours.kernels / max(1, uniform.kernels):.2f}x)",
        ]
    rule = next((c for name, c in counts.items() if name.startswith("engine.integrate")), None)
    if rule is not None and rule.top:
        lines += ["", "most launched kernels of `engine.integrate()`:", ""]
        lines += ["| kernel | launches |", "|---|---:|"]
        lines += [f"| `{name[:100].replace('|', '/')}` | {n} |" for name, n in rule.top]
    return "\n".join(lines)
