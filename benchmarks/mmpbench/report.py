"""Markdown tables and the machine description of the report (pure formatting, no measurement)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .check import CheckResult
from .lightning_path import plain_method_of
from .memory import MemoryPoint, MiB
from .methods import METHODS
from .timing import PHASE_METHODS, PHASES, Timing, paired_ratios


@dataclass
class MainResult:
    """Everything the main (two-or-more-encoder) measurement produced."""

    timings: dict[str, Timing]
    peaks: dict[str, int | None]
    memory_method: str
    encoder_grad_bytes: int
    check: CheckResult
    authors_conflict_rate: float


def machine_description(device: torch.device) -> dict[str, str]:
    """Versions, device and thread count for the report."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": _cpu_model(),
        "cpu cores (os.cpu_count)": str(os.cpu_count()),
    }
    # glibc's malloc returns big blocks to the OS on free; every step then page-faults fresh memory, which
    # costs most where a retained graph keeps the old blocks busy (see benchmarks/README.md).
    tuning = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")]
    info["malloc env"] = " ".join(tuning) if tuning else "default"
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = "cpu"
    return info


def load_average() -> str:
    """1-minute load average (other work on a shared machine shows up here), or ``n/a``."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MiB:.1f}"


def _ratio_cells(t: Timing, base: Timing) -> str:
    paired, q1, q3 = paired_ratios(t, base)
    return f"{t.median / base.median:.2f}x | {paired:.2f}x [{q1:.2f}-{q3:.2f}]"


def format_main_table(result: MainResult) -> str:
    """Markdown table: method | median ms | IQR ms | ratio of medians | per-round ratio | peak MiB."""
    uniform = result.timings["uniform"]
    lines = [
        "| method | median ms | IQR ms | ratio to uniform (medians) | per-round ratio, median [IQR] "
        "| peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in METHODS:
        t = result.timings[name]
        lines.append(
            f"| {name} | {t.median:.2f} | {t.iqr:.2f} | {_ratio_cells(t, uniform)} "
            f"| {_mib(result.peaks.get(name))} |"
        )
    return "\n".join(lines)


def format_target(result: MainResult, target: float | None) -> str:
    """The step-time target next to both ratio estimates, and how often the authors' rule saw a conflict."""
    uniform, ours = result.timings["uniform"], result.timings["mmpareto"]
    of_medians = ours.median / uniform.median
    per_round = paired_ratios(ours, uniform)[0]
    conflicts = f"authors' decisions with cos <= 0 during timing: {result.authors_conflict_rate:.0%}"
    if target is None:
        return (
            f"no step-time target for this regime (--target sets one): mmpareto / uniform, ratio of medians "
            f"{of_medians:.2f}x, median per-round ratio {per_round:.2f}x; {conflicts}"
        )

    def verdict(ratio: float) -> str:
        return "met" if ratio <= target else "NOT met"

    return (
        f"target: mmpareto <= {target}x uniform: ratio of medians {of_medians:.2f}x ({verdict(of_medians)}), "
        f"median per-round ratio {per_round:.2f}x ({verdict(per_round)}); {conflicts}"
    )


def format_memory_table(result: MainResult) -> str:
    """Markdown table of the peaks alone: method | peak MiB | over uniform, in encoder-gradient copies."""
    g = result.encoder_grad_bytes
    uniform = result.peaks.get("uniform")
    lines = [
        "| method | peak MiB | over uniform, MiB | over uniform, encoder-gradient copies |",
        "|---|---:|---:|---:|",
    ]
    for name in METHODS:
        peak = result.peaks.get(name)
        if peak is None or uniform is None:
            lines.append(f"| {name} | {_mib(peak)} | n/a | n/a |")
        else:
            lines.append(
                f"| {name} | {_mib(peak)} | {(peak - uniform) / MiB:.1f} | {(peak - uniform) / g:.2f} |"
            )
    return "\n".join(lines)


def format_memory_note(result: MainResult, target: float | None = None) -> str:
    """The bound ``uniform + 2 x encoder gradient bytes``, and the peaks' ratios to uniform (``target``)."""
    g = result.encoder_grad_bytes
    lines = [f"encoder gradient bytes (one copy, all encoders): {g / MiB:.1f} MiB"]
    uniform = result.peaks.get("uniform")
    if uniform is None:
        lines.append(f"peak memory: {result.memory_method}")
        return "\n".join(lines)
    ratios = {n: p / uniform for n in ("mmpareto", "authors") if (p := result.peaks.get(n)) is not None}
    if ratios:
        line = "peak / uniform peak: " + ", ".join(f"{n} {r:.3f}x" for n, r in ratios.items())
        if target is not None and "mmpareto" in ratios:
            verdict = "met" if ratios["mmpareto"] <= target else "NOT met"
            line += f" (target: mmpareto <= {target}x uniform, {verdict})"
        lines.append(line)
    bound = uniform + 2 * g
    lines.append(
        f"bound uniform + 2 x encoder gradients = {bound / MiB:.1f} MiB (peaks by {result.memory_method})"
    )
    for name in ("mmpareto", "authors"):
        peak = result.peaks.get(name)
        if peak is not None:
            extra = (peak - uniform) / g if g else float("nan")
            verdict = "within" if peak <= bound else "ABOVE"
            lines.append(f"{name}: uniform + {extra:.2f} x encoder gradients ({verdict} bound)")
    return "\n".join(lines)


def format_memory_sweep(points: Sequence[MemoryPoint], memory_method: str) -> str:
    """Markdown table: per batch size, each method's peak over uniform in encoder-gradient copies.

    The bound ``uniform + 2 copies`` is checked for ``mmpareto``; the last column divides its excess
    beyond two copies by the batch size.
    """
    lines = [
        "| batch | uniform peak MiB | mmpareto over uniform, copies | authors over uniform, copies "
        "| mmpareto within uniform + 2 copies | mmpareto excess beyond 2 copies, MiB per sample |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for point in points:
        g, uniform = point.encoder_grad_bytes, point.peaks.get("uniform")
        ours, authors = point.peaks.get("mmpareto"), point.peaks.get("authors")
        if uniform is None or ours is None or authors is None or not g:
            lines.append(f"| {point.batch_size} | {_mib(uniform)} | n/a | n/a | n/a | n/a |")
            continue
        beyond = max(0, ours - uniform - 2 * g) / MiB / point.batch_size
        within = "yes" if ours <= uniform + 2 * g else "no"
        lines.append(
            f"| {point.batch_size} | {_mib(uniform)} | {(ours - uniform) / g:.2f} "
            f"| {(authors - uniform) / g:.2f} | {within} | {beyond:.2f} |"
        )
    first = points[0].encoder_grad_bytes if points else 0
    lines += [
        "",
        f"encoder gradient bytes (one copy, all encoders): {first / MiB:.1f} MiB; peaks by {memory_method}",
    ]
    return "\n".join(lines)


def format_lightning_table(timings: Mapping[str, Timing], plain: Mapping[str, Timing]) -> str:
    """Markdown table of the Trainer-driven steps, relative to the Lightning uniform step (per round).

    The last column subtracts the plain-PyTorch step the row drives (``uniform`` or ``mmpareto``) from
    the main table, timed earlier in the same process.
    """
    base = timings.get("lightning uniform")
    lines = [
        "| method (through Lightning Trainer) | median ms | IQR ms | ratio to Lightning uniform (medians) "
        "| per-round ratio, median [IQR] | overhead vs plain step ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        plain_name = plain_method_of(name)
        overhead = t.median - plain[plain_name].median if plain_name in plain else float("nan")
        ratios = _ratio_cells(t, base) if base is not None else "n/a | n/a"
        lines.append(f"| {name} | {t.median:.2f} | {t.iqr:.2f} | {ratios} | {overhead:+.2f} |")
    return "\n".join(lines)


def format_phase_table(phases: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: phase | uniform ms | mmpareto ms | authors ms, and the sums."""
    lines = ["| phase | uniform ms | mmpareto ms | authors ms |", "|---|---:|---:|---:|"]
    for phase in PHASES:
        cells = [f"{phases[m][phase]:.2f}" if phase in phases[m] else "-" for m in PHASE_METHODS]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    sums = [sum(phases[m].values()) for m in PHASE_METHODS]
    ratios = [f"{s:.2f} ({s / sums[0]:.2f}x)" for s in sums[1:]]
    lines.append(f"| sum of the medians | {sums[0]:.2f} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def format_scaling_table(scaling: Mapping[int, Mapping[str, Timing]]) -> str:
    """Markdown table: per encoder count, the medians and both ratios to uniform."""
    lines = [
        "| encoders | uniform ms | mmpareto ms | authors ms | mmpareto / uniform | authors / uniform "
        "| mmpareto / uniform, per round |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, t in scaling.items():
        u, m, a = t["uniform"].median, t["mmpareto"].median, t["authors"].median
        paired = paired_ratios(t["mmpareto"], t["uniform"])[0]
        lines.append(f"| {k} | {u:.2f} | {m:.2f} | {a:.2f} | {m / u:.2f}x | {a / u:.2f}x | {paired:.2f}x |")
    return "\n".join(lines)
