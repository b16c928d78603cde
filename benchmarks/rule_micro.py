"""Micro-benchmark of the rule alone: the current rule against an earlier revision, in one process.

Run ``python benchmarks/rule_micro.py --threads 1`` (``--help`` for the flags). For every model the
encoders' gradients are laid out as the engine lays them out (one flat buffer per objective, the rule
called once per encoder with ``out`` aliasing the unimodal gradient), filled with conflicting random
gradients (``g_u = -0.5 g_m + noise``, so the full conflict path runs), and timed:

* ``new``: :func:`mmpareto_lightning.integrate_gradients` as installed;
* ``old``: ``mmpareto_lightning/rule.py`` of ``--baseline`` (a git revision), loaded from git;
* ``add``: the yardstick ``torch.add(g_m, g_u, out=h)`` over the same bytes, i.e. one read pass of the
  two gradients plus one write pass.

Methods are interleaved round by round (a noisy shared machine slows them alike) and the medians are
reported (and the new rule's minimum), with the number of ATen operators one step dispatches from
Python (counted with a ``TorchDispatchMode``, views included) and, on CUDA, the kernels it launches
(``torch.profiler``). The unimodal buffer is restored outside the timed region before every call.
``--multi-tensor`` runs the accelerator path on CPU, to count its operators without a GPU;
``--breakdown`` also times the new rule's phases (Gram matrices, decisions, write) against one flat
dot product of the two gradients (a read pass) and the ``add`` yardstick.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as a script, this folder is on sys.path: the step-time benchmark's package is importable.
from mmpbench.models import resnet18_encoder, wide_mlp_encoder
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmpareto_lightning import RuleConfig, integrate_gradients
from mmpareto_lightning.rule import passes

REPO = Path(__file__).resolve().parent.parent


def tiny_cnn(in_channels: int) -> nn.Module:
    """The small CNN of benchmarks/step_time.py at width 16 (about 14k parameters)."""
    width, feature = 16, 32
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.Conv2d(2 * width, feature, 3, padding=1, bias=False),
        nn.BatchNorm2d(feature),
    )


# The step-time benchmark's encoders (the same parameter shapes in both benchmarks).
MODELS: dict[str, Callable[[], list[nn.Module]]] = {
    "tiny-cnn": lambda: [tiny_cnn(1), tiny_cnn(3)],
    "wide-mlp": lambda: [wide_mlp_encoder(256), wide_mlp_encoder(384)],
    "resnet18": lambda: [resnet18_encoder(1), resnet18_encoder(3)],
}


def load_rule(revision: str, file: str | None = None):
    """``mmpareto_lightning/rule.py`` as of ``revision`` (or from ``file``), as a separate module."""
    if file is not None:
        source = Path(file).read_text()
    else:
        source = subprocess.run(
            ["git", "show", f"{revision}:mmpareto_lightning/rule.py"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    path = Path(tempfile.mkdtemp()) / "rule_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("rule_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["rule_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def encoder_grads(module: nn.Module, seed: int, device: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    segments = [p.numel() for p in module.parameters()]
    gen = torch.Generator().manual_seed(seed)
    n = sum(segments)
    g_m = torch.randn(n, generator=gen)
    g_u = -0.5 * g_m + torch.randn(n, generator=gen)
    return segments, g_m.to(device), g_u.to(device)


def count_kernels(fn: Callable[[], None]) -> int:
    """CUDA kernels (and copies) one call launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(model: str, rounds: int, baseline, device: str) -> dict[str, tuple[float, float, int, int]]:
    """name -> (median ms, min ms, dispatched operators, CUDA kernels or 0) per step (both encoders)."""
    encoders = [encoder_grads(m, seed, device) for seed, m in enumerate(MODELS[model]())]
    config = RuleConfig()
    saved = [g_u.clone() for _, _, g_u in encoders]
    out = [torch.empty_like(g_u) for _, _, g_u in encoders]
    cuda = device == "cuda"

    def restore() -> None:
        for (_, _, g_u), s in zip(encoders, saved, strict=True):
            g_u.copy_(s)
        if cuda:
            torch.cuda.synchronize()

    def new() -> None:
        for segments, g_m, g_u in encoders:
            integrate_gradients([g_m, g_u], config, segments=segments, out=g_u)

    def old() -> None:
        for segments, g_m, g_u in encoders:
            baseline.integrate_gradients([g_m, g_u], baseline.RuleConfig(), segments=segments, out=g_u)

    def add() -> None:
        for (_, g_m, g_u), o in zip(encoders, out, strict=True):
            torch.add(g_m, g_u, out=o)

    # Never time a wrong computation: both rules must agree.
    new()
    h_new = [g_u.clone() for _, _, g_u in encoders]
    restore()
    old()
    for (_, _, g_u), h in zip(encoders, h_new, strict=True):
        torch.testing.assert_close(g_u, h, rtol=1e-4, atol=1e-5 * float(h.abs().max()))
    methods = {"old": old, "new": new, "add": add}
    ops, kernels = {}, {}
    for name, fn in methods.items():
        restore()
        counter = CountOps()
        with counter:
            fn()
        ops[name] = counter.count
        restore()
        kernels[name] = count_kernels(fn) if cuda else 0
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            restore()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {
        name: (statistics.median(times[name]) * 1e3, min(times[name]) * 1e3, ops[name], kernels[name])
        for name in methods
    }


def breakdown(model: str, rounds: int, device: str) -> dict[str, float]:
    """Median ms per step of the new rule's phases, and of one flat dot product (a read pass of both
    gradients) and the ``add`` yardstick, interleaved."""
    from mmpareto_lightning.rule import integrate as rule

    encoders = [encoder_grads(m, seed, device) for seed, m in enumerate(MODELS[model]())]
    config = RuleConfig()
    lists = [[list(g.split(segments)) for g in (g_m, g_u)] for segments, g_m, g_u in encoders]
    saved = [g_u.clone() for _, _, g_u in encoders]
    out = [torch.empty_like(g_u) for _, _, g_u in encoders]
    grams = [passes.tensor_grams(lst) for lst in lists]
    coefficients = [rule._decide(g, config, torch.finfo(torch.float32).eps)[0].float() for g in grams]
    phases: dict[str, Callable[[], object]] = {
        "gram (read)": lambda: [passes.tensor_grams(lst, passes.Pieces()) for lst in lists],
        "decisions": lambda: [rule._decide(g, config, torch.finfo(torch.float32).eps) for g in grams],
        "write": lambda: [
            passes.weighted_sum(lst, c, lst[1], passes.Pieces())
            for lst, c in zip(lists, coefficients, strict=True)
        ],
        "whole rule": lambda: [
            integrate_gradients([g_m, g_u], config, segments=segments, out=g_u)
            for segments, g_m, g_u in encoders
        ],
        "dot(g_m, g_u)": lambda: [torch.dot(g_m, g_u) for _, g_m, g_u in encoders],
        "add": lambda: [torch.add(g_m, g_u, out=o) for (_, g_m, g_u), o in zip(encoders, out, strict=True)],
    }
    times: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, fn in phases.items():
            for (_, _, g_u), s in zip(encoders, saved, strict=True):
                g_u.copy_(s)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--baseline", default="4d7b7ad", help="git revision of the old rule")
    parser.add_argument("--baseline-file", help="the old rule.py as a file (instead of --baseline)")
    parser.add_argument(
        "--multi-tensor",
        action="store_true",
        help="use the accelerator path (multi-tensor kernels) on CPU too: for counting its operators",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--breakdown", action="store_true", help="also time the new rule's phases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.multi_tensor:
        passes._multi_tensor = lambda device: True
    baseline = load_rule(args.baseline, args.baseline_file)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, {args.rounds} rounds; per step (both encoders)")
    print(
        "| model | params/encoder | old ms | new ms | add ms | old/new | new/add | new min ms | "
        "old ops | new ops | old kernels | new kernels |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        params = [sum(p.numel() for p in m.parameters()) for m in MODELS[model]()]
        r = run(model, args.rounds, baseline, args.device)
        (o, _, oo, ok), (n, nmin, no, nk), (a, _, _, _) = r["old"], r["new"], r["add"]
        print(
            f"| {model} x2 | {'/'.join(f'{p:,}' for p in params)} | {o:.2f} | {n:.2f} | {a:.2f} | "
            f"{o / n:.2f} | {n / a:.2f} | {nmin:.2f} | {oo} | {no} | {ok} | {nk} |"
        )
        sys.stdout.flush()
    if args.breakdown:
        print("\nPhases of the new rule, median ms per step (both encoders):\n")
        results = {model: breakdown(model, args.rounds, args.device) for model in args.models}
        names = list(next(iter(results.values())))
        print("| model | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for model, r in results.items():
            print(f"| {model} x2 | " + " | ".join(f"{r[name]:.2f}" for name in names) + " |")


if __name__ == "__main__":
    main()
