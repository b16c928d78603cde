"""The report of ``mmpareto-lightning compare``: from finished runs to tables, CSVs and the figure.

:func:`write_report` turns the runs into ``results.md`` (the summary table and the paired differences of
MMPareto minus each other strategy), ``results.csv``, ``differences.csv``, ``runs.csv`` and
``training_dynamics.png``. The statistics are :mod:`mmpareto_lightning.cli.summary`'s, the figure
:mod:`mmpareto_lightning.cli.plotting`'s (the one ``mmpareto-lightning plot`` draws).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpareto_lightning.cli.logs import EncoderDynamics, skipped_text, warn_non_finite
from mmpareto_lightning.cli.plotting import plot_dynamics
from mmpareto_lightning.cli.summary import (
    Column,
    difference_rows,
    empty_columns,
    markdown_differences,
    markdown_summary,
    summary_rows,
)

__all__ = [
    "CompareResult",
    "CompareWarning",
    "RunResult",
    "default_metrics",
    "encoders",
    "machine",
    "metric_columns",
    "warn_missing",
    "write_report",
]

REFERENCE = "mmpareto"
"""The strategy the paired differences are taken against."""


class CompareWarning(UserWarning):
    """A comparison whose table would mislead: a metric no run logged."""


@dataclass
class RunResult:
    """Outcome of one (strategy, seed) run.

    Args:
        strategy: Key of :data:`STRATEGY_LABELS`.
        seed: The seed passed to ``seed_everything``.
        metrics: Every metric the test loop returned (full keys, e.g. ``test/acc``).
        dynamics: Encoder -> what the rule did at each training step.
        log_dir: Directory of the run's CSVLogger.
        seconds: Wall time of fit + test.
        skipped: Key -> how many of its logged values were non-finite and left out (training log and
            test metrics).
    """

    strategy: str
    seed: int
    metrics: dict[str, float]
    dynamics: dict[str, EncoderDynamics] = field(repr=False)
    log_dir: Path
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def conflict_rate(self) -> dict[str, float]:
        """Encoder -> share of training steps with a gradient conflict."""
        return {enc: d.conflict_rate() for enc, d in self.dynamics.items()}


@dataclass
class CompareResult:
    """All runs of a comparison and the files written.

    Args:
        runs: One entry per (strategy, seed).
        table: The Markdown summary table (also in ``results.md``).
        differences: The Markdown table of paired differences (empty without MMPareto runs).
        files: Name -> path of ``results.md``, ``results.csv``, ``differences.csv``, ``runs.csv``,
            ``training_dynamics.png``.
        seconds: Wall time of the whole comparison.
    """

    runs: list[RunResult]
    table: str
    differences: str
    files: dict[str, Path]
    seconds: float


def default_metrics(runs: Sequence[RunResult]) -> list[str]:
    """``test/acc``, ``test/macro_f1`` and ``test/acc_<encoder>`` (the example models' test metrics)."""
    return ["test/acc", "test/macro_f1", *[f"test/acc_{e}" for e in encoders(runs)]]


def encoders(runs: Sequence[RunResult]) -> list[str]:
    # The model's order: that of its logged per-encoder test metrics, then any other encoder by name.
    found = list(dict.fromkeys(e for r in runs for e in r.dynamics))
    logged = [k.removeprefix("test/acc_") for r in runs for k in r.metrics if k.startswith("test/acc_")]
    ordered = [e for e in dict.fromkeys(logged) if e in found]
    return ordered + [e for e in found if e not in ordered]


def metric_columns(runs: Sequence[RunResult], metrics: Sequence[str], raw: bool = False) -> list[Column]:
    """The table's metric columns and how each is shown.

    A metric is shown in percent when every logged value lies in [0, 1] and its key does not name a loss
    (the default keys also when nothing was logged; ``raw=True``: every metric as logged).
    """
    names = {"test/acc": "Acc", "test/macro_f1": "Macro-F1"}
    names.update({f"test/acc_{e}": f"Acc {e} head" for e in encoders(runs)})
    columns = []
    for key in metrics:
        values = [r.metrics[key] for r in runs if key in r.metrics and math.isfinite(r.metrics[key])]
        if key in names:  # the example models' accuracies and F1: fractions, logged or not
            fraction = all(0.0 <= v <= 1.0 for v in values)
        else:
            fraction = bool(values) and all(0.0 <= v <= 1.0 for v in values) and "loss" not in key.lower()
        columns.append(Column(key, names.get(key, key), percent=fraction and not raw))
    return columns


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cores} CPU cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def warn_missing(runs: Sequence[RunResult], metrics: Sequence[str], warned: set[str]) -> None:
    missing = [m for m in metrics if m not in warned and not any(m in r.metrics for r in runs)]
    if missing:
        warned.update(missing)
        logged = sorted({k for r in runs for k in r.metrics}) or ["(none)"]
        warnings.warn(
            f"no run logged {', '.join(missing)}: those columns will read n/a. The test loop logged: "
            f"{', '.join(logged)}. Choose columns with --metrics KEY [KEY ...].",
            CompareWarning,
            stacklevel=3,
        )


def write_report(
    runs: Sequence[RunResult],
    strategies: Sequence[str],
    labels: Mapping[str, str],
    seeds: Sequence[int],
    out: Path,
    seconds: float,
    metrics: Sequence[str] | None = None,
    raw: bool = False,
    notes: Sequence[str] = (),
    warned: set[str] | None = None,
) -> CompareResult:
    """Write the tables, the CSVs and the figure of a comparison.

    Args:
        runs: The finished runs.
        strategies: Strategy keys in table order.
        labels: Strategy key -> display name.
        seeds: The seeds (for the notes and the figure's title).
        out: Output directory.
        seconds: Wall time of the runs.
        metrics: Test metric keys for the columns (default: :func:`default_metrics`).
        raw: Show every metric as logged (no percent).
        notes: Lines for the end of ``results.md`` (command, config, machine, ...).
        warned: Metric keys already warned about (they are not warned about again).
    """
    runs = [_finite_metrics(r) for r in runs]
    keys = list(metrics or default_metrics(runs))
    warn_missing(runs, keys, set() if warned is None else warned)
    columns = metric_columns(runs, keys, raw)
    columns += [Column(f"conflict_rate/{e}", f"Conflict rate {e}") for e in encoders(runs)]
    results: dict[str, dict[int, dict[str, float]]] = {s: {} for s in strategies}
    run_rows = []
    for r in runs:
        row = {**r.metrics, **{f"conflict_rate/{e}": v for e, v in r.conflict_rate.items()}}
        results[r.strategy][r.seed] = row
        run_rows.append({"strategy": r.strategy, "seed": r.seed, "seconds": round(r.seconds, 2), **row})
        run_rows[-1]["log_dir"] = str(r.log_dir)
    metric_cols = [c for c in columns if not c.key.startswith("conflict_rate/")]
    table = markdown_summary(results, labels, columns)
    differences = ""
    if REFERENCE in results and len(results) > 1:
        differences = markdown_differences(results, REFERENCE, labels, metric_cols)
    files = {name: out / name for name in ("results.md", "results.csv", "differences.csv", "runs.csv")}
    files["training_dynamics.png"] = out / "training_dynamics.png"
    _write_csv(files["results.csv"], summary_rows(results, labels, columns))
    _write_csv(files["differences.csv"], difference_rows(results, REFERENCE, labels, metric_cols))
    _write_csv(files["runs.csv"], run_rows)
    plot_dynamics(
        {labels[s]: [r.dynamics for r in runs if r.strategy == s] for s in strategies},
        files["training_dynamics.png"],
        title=f"Training dynamics per encoder (mean over {len(seeds)} seed(s) per strategy)",
        encoders=encoders(runs),
    )
    empty = [c.key for c in empty_columns(results, columns)]
    lines = [
        "# mmpareto-lightning compare",
        "",
        table,
        "",
        (
            "One seed: each value is that run's, with no spread"
            if len(seeds) == 1
            else "Mean ± sample std over seeds"
        )
        + (
            ". Acc and Macro-F1: fusion head; Acc <encoder> head: that unimodal head"
            if not metrics
            else ". Columns: the test metrics named by --metrics"
        )
        + "; conflict rate: share of training steps with a gradient conflict on the encoder (cos β ≤ 0). "
        "n/a: not logged.",
    ]
    if differences:
        lines += [
            "",
            f"## Paired differences: {labels[REFERENCE]} minus each strategy",
            "",
            differences,
            "",
            "Mean over seeds of the per-seed difference (same seed: same initialisation and data order); "
            "[95 % Student t interval over the seeds], **bold** when it excludes 0; with one seed there is "
            "no interval. (pp): percentage points.",
        ]
    notes = [*notes, *([f"Empty columns (no run logged them): {', '.join(empty)}."] if empty else [])]
    skipped = [f"{labels[r.strategy]} seed {r.seed}: {skipped_text(r.skipped)}" for r in runs if r.skipped]
    if skipped:
        notes.append(
            "Non-finite values (NaN, inf, -inf) were left out of the tables and the figure: "
            + "; ".join(skipped)
            + "."
        )
    lines += ["", *[f"- {n}" for n in notes], ""]
    files["results.md"].write_text("\n".join(lines))
    return CompareResult(runs=list(runs), table=table, differences=differences, files=files, seconds=seconds)


def _finite_metrics(run: RunResult) -> RunResult:
    """``run`` without non-finite test metrics (counted in ``skipped``, with a warning)."""
    bad = {k: 1 for k, v in run.metrics.items() if not math.isfinite(v)}
    if not bad:
        return run
    warn_non_finite(bad, f"{run.strategy} seed {run.seed}, test metrics", stacklevel=3)
    metrics = {k: v for k, v in run.metrics.items() if k not in bad}
    skipped = dict(run.skipped)
    for key in bad:
        skipped[key] = skipped.get(key, 0) + 1
    return dataclasses.replace(run, metrics=metrics, skipped=skipped)
