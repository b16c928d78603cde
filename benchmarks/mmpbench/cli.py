"""Command line: parse the flags, run the measurements in order, print and return the Markdown report."""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from collections.abc import Callable, Sequence

import torch

from . import __doc__ as package_doc
from .check import format_check
from .kernels import count_step_kernels, format_kernel_table
from .lightning_path import (
    DEFAULT_LIGHTNING_VARIANTS,
    LIGHTNING_VARIANTS,
    SCHEDULES,
    default_schedule,
    time_lightning,
)
from .memory import run_memory_sweep
from .models import MODELS, ModelSpec, build_network_and_batch, default_batch_size
from .opcount import count_lightning_ops, count_plain_ops, format_op_difference, format_op_table
from .profiling import profile_lightning
from .report import (
    format_lightning_table,
    format_main_table,
    format_memory_note,
    format_memory_sweep,
    format_memory_table,
    format_phase_table,
    format_scaling_table,
    format_target,
    load_average,
    machine_description,
)
from .runs import run_main, run_scaling
from .timing import time_phases, use_clock

# Step-time targets of the plain step (mmpareto / uniform), per regime and device (issues 9 and 14); the
# host-bound regime has none (its yardsticks are the through-Lightning rows and the operator counts).
CPU_TARGETS: dict[str, float | None] = {
    "small-cnn": 1.7,
    "wide-mlp": 2.0,
    "resnet18": 1.7,
    "resnet18-tiny": None,
    "bert": 1.8,
}
CUDA_TARGETS: dict[str, float | None] = {
    "small-cnn": 1.7,
    "wide-mlp": 2.0,
    "resnet18": 1.7,  # CREMA-D shapes, batch 64
    "resnet18-tiny": None,
    "bert": 1.8,
}
# Peak memory of our step over the uniform step's (2x ResNet-18, CREMA-D shapes, batch 64).
MEMORY_TARGETS = {"resnet18": 1.17}
# The host-bound regime's through-Lightning protocol: 3 rounds of 40 steps per row.
HOST_BOUND_LIGHTNING_ITERS = 120


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/step_time.py",
        description=(package_doc or "").split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="default: resnet18 at CREMA-D shapes on CUDA, small-cnn on CPU;\n"
        "resnet18-tiny: the host-bound regime (ResNet-18 layout, widths / 16, 16x16 inputs, batch 2);\n"
        "bert: the fine-tuning regime (2x BertModel(BertConfig()), sequence 128, batch 8)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed steps per method (default: CUDA 50 resnet18 and bert, 200 others;\n"
        "CPU 150, 20 resnet18 and bert)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds first (default: 10 CUDA; CPU 5, 2 resnet18 and bert)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default: 8 wide-mlp and bert, 2 resnet18-tiny, 64 others",
    )
    p.add_argument("--main-encoders", type=int, default=2, help="encoders of the main table")
    p.add_argument(
        "--encoders",
        type=int,
        nargs="*",
        default=None,
        help="encoder counts of the scaling table; none: skip it\n"
        "(default: 2 3 4; none for bert, and for resnet18 on CPU)",
    )
    p.add_argument("--scaling-iters", type=int, default=None, help="timed steps per method and count")
    p.add_argument("--image-size", type=int, default=16, help="small-cnn and resnet18-tiny input side")
    p.add_argument("--width", type=int, default=16, help="small-cnn first convolution width")
    p.add_argument("--mlp-width", type=int, default=2048, help="wide-mlp hidden width")
    p.add_argument("--mlp-features", type=int, default=512, help="wide-mlp output features")
    p.add_argument("--bert-layers", type=int, default=12, help="bert: transformer layers")
    p.add_argument(
        "--bert-hidden",
        type=int,
        default=768,
        help="bert: hidden size (heads: hidden / 64 if it divides, else 1; intermediate 4 x hidden)",
    )
    p.add_argument("--bert-vocab", type=int, default=30522, help="bert: vocabulary size")
    p.add_argument("--seq-len", type=int, default=128, help="bert: tokens per input")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="step-time target of mmpareto / uniform (default: the regime's; none for resnet18-tiny)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time, or the process's CPU time (CPU only; steadier on a shared machine,\n"
        "meaningful with --threads 1: idle OpenMP threads spin and count)",
    )
    p.add_argument("--no-lightning", action="store_true", help="skip the Trainer-driven measurement")
    p.add_argument(
        "--lightning-iters",
        type=int,
        default=None,
        help=f"timed Trainer steps per row (default: --iters; {HOST_BOUND_LIGHTNING_ITERS} resnet18-tiny)",
    )
    p.add_argument(
        "--lightning-variants",
        nargs="+",
        choices=list(LIGHTNING_VARIANTS),
        default=list(DEFAULT_LIGHTNING_VARIANTS),
        help="rows of the through-Lightning table (default: every one)",
    )
    p.add_argument(
        "--lightning-schedule",
        choices=("auto", *SCHEDULES),
        default="auto",
        help="steps: one thread per Trainer, interleaved step by step; rounds: one Trainer.fit per row\n"
        "and round in this thread, rows alternated (auto: rounds on a CPU with several threads and for\n"
        "resnet18-tiny, steps otherwise)",
    )
    p.add_argument(
        "--lightning-rounds",
        type=int,
        default=3,
        help="rounds of the rounds schedule; --lightning-iters is split over them (default 3)",
    )
    p.add_argument("--no-op-counts", action="store_true", help="skip the ATen operators-per-step table")
    p.add_argument(
        "--op-counts-only",
        action="store_true",
        help="only the pre-check and the operator counts (and the kernel counts on CUDA): no timing",
    )
    p.add_argument(
        "--no-kernel-counts",
        action="store_true",
        help="CUDA: skip the kernels-per-call table (torch.profiler with CUDA activity)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument(
        "--memory-only", action="store_true", help="only the pre-check and the peak-memory pass (no timing)"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each phase of the three steps (forward, backwards, rule, optimizer step)",
    )
    p.add_argument(
        "--memory-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="also measure the peak memory of every method at each of these batch sizes",
    )
    p.add_argument(
        "--profile",
        nargs="*",
        choices=list(LIGHTNING_VARIANTS),
        default=None,
        metavar="VARIANT",
        help="instead of the timing tables: profile these through-Lightning variants (cProfile functions,\n"
        "torch.profiler operators; none named: uniform mmpareto), --lightning-iters steps per window\n"
        "(default 10)",
    )
    p.add_argument("--markdown", type=str, default=None, help="also write the tables to this file")
    return p.parse_args(argv)


class _Report:
    """Report lines, printed as soon as they are measured and kept for the Markdown file.

    The file is rewritten after every section, so a run stopped by a time limit keeps what it measured.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.lines: list[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def emit(self, *lines: str) -> None:
        print("\n".join(lines), flush=True)
        self.lines.extend(lines)
        if self.path:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(self.text)

    def section(self, title: str, table: str) -> None:
        self.emit("", f"## {title}", "", table)


def _guarded(report: _Report, title: str, measure: Callable[[], str]) -> Exception | None:
    """Run one section; a failure is reported and returned, so the other sections still run.

    A GPU is lent for a few minutes at a time: one broken section must not cost the rest of the run.
    """
    try:
        table = measure()
    except Exception as err:
        traceback.print_exc()
        report.section(title, f"FAILED: {type(err).__name__}: {err}")
        return err
    finally:
        gc.collect()
    report.section(title, table)
    return None


def _lightning_title(schedule: str, steps: int, rounds: int) -> str:
    if schedule == "rounds":
        rounds = max(1, min(rounds, steps))
        return (
            f"Through Lightning ({rounds} rounds of {-(-steps // rounds)} steps per row: one Trainer.fit per "
            "row and round in one thread, rows alternated)"
        )
    return f"Through Lightning ({steps} steps per row, interleaved step by step)"


def _op_count_table(
    spec: ModelSpec, args: argparse.Namespace, batch_size: int, device: torch.device, variants: Sequence[str]
) -> str:
    base, batch = build_network_and_batch(spec, args.main_encoders, batch_size, device, args.seed)
    plain = count_plain_ops(base, batch, seed=args.seed)
    lightning = count_lightning_ops(base, batch, device, variants, seed=args.seed)
    return "\n".join(
        [
            format_op_table(plain, lightning),
            "",
            "operators MMPareto's steps dispatch beyond the uniform steps (most first):",
            "",
            format_op_difference(plain, lightning),
        ]
    )


def _kernel_table(spec: ModelSpec, args: argparse.Namespace, batch_size: int, device: torch.device) -> str:
    base, batch = build_network_and_batch(spec, args.main_encoders, batch_size, device, args.seed)
    return format_kernel_table(count_step_kernels(base, batch, device))


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark, print the report and return it (Markdown)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda requested, but CUDA is not available.")
    on_gpu = device.type == "cuda"
    if args.clock == "cpu" and on_gpu:
        raise SystemExit("--clock cpu measures host CPU time only; use the wall clock on CUDA.")
    use_clock(args.clock)
    kind = args.model or ("resnet18" if on_gpu else "small-cnn")
    heavy = kind == "bert" or (kind == "resnet18" and not on_gpu)
    heavy_on_cpu = heavy and not on_gpu
    spec = ModelSpec(
        kind,
        args.image_size,
        args.width,
        args.mlp_width,
        args.mlp_features,
        args.bert_layers,
        args.bert_hidden,
        args.bert_vocab,
        args.seq_len,
    )
    batch_size = args.batch_size or default_batch_size(kind)
    # Enough steps for stable medians at each regime's step time: ResNet-18 and BERT steps take ~0.5 s
    # or more on a CPU, the small CNN's and the MLPs' a few milliseconds on a GPU.
    iters = args.iters or (
        (50 if kind in ("resnet18", "bert") else 200) if on_gpu else (20 if heavy else 150)
    )
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2 if heavy_on_cpu else 5)
    scaling_iters = args.scaling_iters or max(5, iters // 2)
    encoders = args.encoders if args.encoders is not None else ([] if heavy else [2, 3, 4])
    host_bound = kind == "resnet18-tiny"
    lightning_iters = args.lightning_iters or (HOST_BOUND_LIGHTNING_ITERS if host_bound else iters)
    schedule = args.lightning_schedule
    if schedule == "auto":
        schedule = "rounds" if host_bound else default_schedule(device)
    target = args.target if args.target is not None else (CUDA_TARGETS if on_gpu else CPU_TARGETS).get(kind)
    memory_target = MEMORY_TARGETS.get(kind)
    variants = [] if args.no_lightning else list(args.lightning_variants)

    info = machine_description(device)
    info["load average at start"] = load_average()
    report = _Report(args.markdown)
    if args.memory_only:
        what = "memory only: peak of a training step per method, after warm-up"
    elif args.op_counts_only:
        what = "operator counts only (one steady-state step per method and row)"
    elif args.profile is not None:
        what = f"profiles of {args.lightning_iters or 10} steps per window"
    else:
        what = f"{warmup} warm-up + {iters} timed steps per method, interleaved"
    if args.memory_batch_sizes:
        what += f"; the memory sweep uses batch sizes {' '.join(map(str, args.memory_batch_sizes))}"
    report.emit(
        "# MMPareto step-time benchmark",
        "",
        f"command: `python benchmarks/step_time.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        f"model: {kind} x {args.main_encoders} encoders ({spec.describe(args.main_encoders)}), "
        f"batch {batch_size}, fp32, SGD momentum 0.9; {args.clock} clock; {what}",
    )

    only_counts = args.op_counts_only
    result = run_main(
        spec,
        args.main_encoders,
        batch_size,
        device,
        iters,
        warmup,
        args.seed,
        # A batch-size sweep measures the memory itself; the main pass would repeat one of its points.
        memory=not args.no_memory
        and not args.memory_batch_sizes
        and args.profile is None
        and not only_counts,
        timing=not args.memory_only and args.profile is None and not only_counts,
    )
    report.emit("", format_check(result.check))
    failures: list[Exception] = []

    def guarded(title: str, measure: Callable[[], str]) -> None:
        err = _guarded(report, title, measure)
        if err is not None:
            failures.append(err)

    if args.profile is not None:
        base, batch = build_network_and_batch(spec, args.main_encoders, batch_size, device, args.seed)
        for key in args.profile or ["uniform", "mmpareto"]:
            profile = profile_lightning(base, batch, device, key, args.lightning_iters or 10)
            report.section(f"Profile through Lightning ({kind}, batch {batch_size})", profile)
        return report.text
    counts_title = f"ATen operators dispatched per training step ({device.type}, one steady-state step)"
    kernels_title = f"CUDA kernels per call ({kind}, batch {batch_size}; torch.profiler, after warm-up)"
    if args.memory_only:
        if result.peaks:
            report.section(
                "Peak memory",
                format_memory_table(result) + "\n\n" + format_memory_note(result, memory_target),
            )
    elif only_counts:
        guarded(counts_title, lambda: _op_count_table(spec, args, batch_size, device, variants))
        if on_gpu and not args.no_kernel_counts:
            guarded(kernels_title, lambda: _kernel_table(spec, args, batch_size, device))
    else:
        table = "\n".join(
            [
                format_main_table(result),
                "",
                format_target(result, target),
                format_memory_note(result, memory_target),
            ]
        )
        report.section("Step time (plain PyTorch)", table)
        if not args.no_op_counts:
            guarded(counts_title, lambda: _op_count_table(spec, args, batch_size, device, variants))
        if on_gpu and not args.no_kernel_counts:
            guarded(kernels_title, lambda: _kernel_table(spec, args, batch_size, device))
        if variants:

            def lightning_table() -> str:
                base, batch = build_network_and_batch(spec, args.main_encoders, batch_size, device, args.seed)
                timings = time_lightning(
                    base,
                    batch,
                    device,
                    lightning_iters,
                    max(2, warmup),
                    variants,
                    schedule=schedule,
                    rounds=args.lightning_rounds,
                )
                return format_lightning_table(timings, result.timings)

            guarded(_lightning_title(schedule, lightning_iters, args.lightning_rounds), lightning_table)
        if args.breakdown:
            base, batch = build_network_and_batch(spec, args.main_encoders, batch_size, device, args.seed)
            phases = time_phases(base, batch, iters, warmup, device)
            del base, batch
            report.section(
                f"Where the time goes (medians of {iters} steps per method)", format_phase_table(phases)
            )
        if encoders:
            scaling = run_scaling(
                spec, encoders, batch_size, device, scaling_iters, max(2, warmup // 2), args.seed
            )
            report.section(
                f"Scaling with the number of encoders ({kind}, {scaling_iters} timed steps per method)",
                format_scaling_table(scaling),
            )
    if args.memory_batch_sizes:
        points, memory_method = run_memory_sweep(
            spec, args.main_encoders, args.memory_batch_sizes, device, args.seed
        )
        report.section(f"Peak memory by batch size ({kind})", format_memory_sweep(points, memory_method))
    if not args.memory_only:
        report.emit(
            f"\nload average at the end: {load_average()} (load above the thread count means shared cores)"
        )
    if failures:
        raise failures[0]
    return report.text
