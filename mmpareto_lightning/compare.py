"""``mmpareto-lightning compare``: train one model/data setting with several strategies and seeds.

For each strategy (one joint loss, uniform, conventional Pareto, MMPareto) and each seed, the config is
instantiated through the same LightningCLI as ``mmpareto-lightning fit``, only the
:class:`~mmpareto_lightning.MMParetoCallback` ``strategy`` and the seed change; the model is trained,
then tested (final weights, no checkpoint selection). The outputs, under ``--output-dir``:

- ``results.md`` / ``results.csv``: mean ± std over seeds of top-1 accuracy and macro-F1 of the fusion
  head, the accuracy of each unimodal head and each encoder's conflict rate (share of training steps
  with cos β ≤ 0 between its multimodal and unimodal gradients);
- ``runs.csv``: the same numbers per run;
- ``training_dynamics.png``: cos β and the conflict rate per encoder over training steps;
- ``runs/<strategy>/seed_<k>/metrics.csv``: each run's CSVLogger output (step-level logging).

Defaults reproduce the CG-Digits comparison of the README (3 seeds, about 10 minutes on 2 CPU cores):

    mmpareto-lightning compare --output-dir compare_out
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Also the hint of the `mmpareto-lightning` command (cli.py): this module imports only the standard
# library at load time, so `compare --help` stays fast.
_INSTALL_HINT = 'pip install "mmpareto-lightning[examples]"'

__all__ = [
    "STRATEGY_LABELS",
    "CompareResult",
    "RunResult",
    "default_config_path",
    "main",
    "run_compare",
]


STRATEGY_LABELS: dict[str, str] = {
    "multimodal_only": "one joint loss",
    "uniform": "uniform",
    "pareto": "conventional Pareto",
    "mmpareto": "MMPareto",
}
"""Strategies compared by default, in table order, with their display names."""

_CALLBACK_NAME = "MMParetoCallback"


@dataclass
class RunResult:
    """Outcome of one (strategy, seed) run.

    Args:
        strategy: The callback strategy.
        seed: The seed passed to ``seed_everything``.
        metrics: Test metrics without the ``test/`` prefix (``acc``, ``macro_f1``, ``acc_<modality>``),
            as fractions.
        conflict_rate: Encoder -> share of training steps with a gradient conflict.
        steps: Encoder -> ``(global steps, cos β values, conflict indicators)`` logged every step.
        log_dir: Directory of the run's CSVLogger.
        seconds: Wall time of fit + test.
    """

    strategy: str
    seed: int
    metrics: dict[str, float]
    conflict_rate: dict[str, float]
    steps: dict[str, tuple[list[int], list[float], list[float]]] = field(repr=False)
    log_dir: Path
    seconds: float


@dataclass
class CompareResult:
    """All runs of a comparison and the files written.

    Args:
        runs: One entry per (strategy, seed).
        table: The Markdown table (also in ``results.md``).
        files: Name -> path of ``results.md``, ``results.csv``, ``runs.csv``, ``training_dynamics.png``.
        seconds: Wall time of the whole comparison.
    """

    runs: list[RunResult]
    table: str
    files: dict[str, Path]
    seconds: float


def default_config_path() -> Path:
    """The shipped CG-Digits config (``mmpareto_examples/configs/cg_digits.yaml``)."""
    try:
        from mmpareto_examples import CONFIG_DIR
    except ImportError as err:
        raise ImportError(
            "the default comparison uses the bundled examples (package mmpareto_examples); install the "
            f"project ({_INSTALL_HINT}) or pass --config"
        ) from err
    return CONFIG_DIR / "cg_digits.yaml"


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    # A config written for `fit` may nest everything under the sub-command name.
    if set(config) == {"fit"}:
        config = config["fit"]
    return config


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key!r}: {part!r} is not a mapping in the config")
    node[parts[-1]] = value


def _parse_assignment(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _is_mmpareto_callback(entry: Any) -> bool:
    return isinstance(entry, dict) and str(entry.get("class_path", "")).split(".")[-1] == _CALLBACK_NAME


def _is_checkpoint_callback(entry: Any) -> bool:
    return isinstance(entry, dict) and str(entry.get("class_path", "")).split(".")[-1] == "ModelCheckpoint"


def make_run_config(
    base: Mapping[str, Any],
    strategy: str,
    seed: int,
    log_root: Path,
    callback_args: Mapping[str, Any] | None = None,
    trainer_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The LightningCLI config of one run: ``base`` with the strategy, seed, logger and limits set.

    Args:
        base: Parsed YAML config (``trainer``/``model``/``data`` sections, as for ``fit``).
        strategy: MMParetoCallback strategy of the run.
        seed: Seed for ``seed_everything``.
        log_root: CSVLogger directory; the run logs to ``log_root/<strategy>/seed_<seed>``.
        callback_args: Extra ``init_args`` for the MMParetoCallback (e.g. ``rescale``, ``gamma``).
        trainer_args: Trainer arguments overriding the config (e.g. ``max_epochs``).

    Returns:
        A new config dictionary.
    """
    config = copy.deepcopy(dict(base))
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {}) or {}
    config["trainer"] = trainer
    callbacks = [cb for cb in (trainer.get("callbacks") or []) if not _is_checkpoint_callback(cb)]
    if isinstance(trainer.get("callbacks"), dict):
        callbacks = [trainer["callbacks"]]
    entry = next((cb for cb in callbacks if _is_mmpareto_callback(cb)), None)
    if entry is None:
        entry = {"class_path": "mmpareto_lightning.MMParetoCallback", "init_args": {}}
        callbacks.append(entry)
    init_args = dict(entry.get("init_args") or {})
    init_args.update(callback_args or {})
    init_args["strategy"] = strategy
    # Per-step values are what the dynamics figure and the conflict rate are computed from.
    init_args["log_on_step"] = True
    entry["init_args"] = init_args
    trainer["callbacks"] = callbacks
    trainer.update(
        {
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(log_root), "name": strategy, "version": f"seed_{seed}"},
            },
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            # Every run validates each epoch anyway; the pre-training sanity pass would only cost time.
            "num_sanity_val_steps": 0,
            "default_root_dir": str(log_root),
        }
    )
    trainer.update(trainer_args or {})
    return config


def _float(value: str) -> float | None:
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def read_step_metrics(metrics_csv: Path) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per-encoder step series of cos β and the conflict indicator from a CSVLogger ``metrics.csv``.

    Args:
        metrics_csv: The file.

    Returns:
        Encoder -> ``(steps, cos_beta, conflicts)``; a step's conflict indicator is the logged
        ``conflicts_step`` (0 or 1 per optimizer step).
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []
    encoders = sorted(
        c[len("mmpareto/") : -len("/cos_beta_step")]
        for c in columns
        if c.startswith("mmpareto/") and c.endswith("/cos_beta_step")
    )
    series: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for enc in encoders:
        steps: list[int] = []
        cos: list[float] = []
        conflicts: list[float] = []
        for row in rows:
            c = _float(row.get(f"mmpareto/{enc}/cos_beta_step", ""))
            k = _float(row.get(f"mmpareto/{enc}/conflicts_step", ""))
            if c is None or k is None:
                continue
            steps.append(int(float(row["step"])))
            cos.append(c)
            conflicts.append(k)
        series[enc] = (steps, cos, conflicts)
    return series


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-run banners and the data-loader advice during many short runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def run_one(config: dict[str, Any]) -> tuple[dict[str, float], Path]:
    """Fit and test one config through the ``mmpareto-lightning`` LightningCLI.

    Args:
        config: A full config as returned by :func:`make_run_config`.

    Returns:
        Test metrics (``test/`` prefix removed) and the logger's directory.
    """
    import torch

    from mmpareto_lightning.cli import build_cli

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        cli = build_cli(config, run=False, save_config_callback=None)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        # Trainer(deterministic=True) flips a process-wide switch that later code must not inherit.
        torch.use_deterministic_algorithms(deterministic)
    metrics = {k.removeprefix("test/"): float(v) for k, v in (results[0] if results else {}).items()}
    return metrics, Path(cli.trainer.logger.log_dir)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _columns(runs: Sequence[RunResult]) -> tuple[list[str], list[str]]:
    # Keep the model's modality order (the order its metrics were logged in), not alphabetical.
    modalities = list(
        dict.fromkeys(k.removeprefix("acc_") for r in runs for k in r.metrics if k.startswith("acc_"))
    )
    found = list(dict.fromkeys(e for r in runs for e in r.conflict_rate))
    encoders = [m for m in modalities if m in found] + [e for e in found if e not in modalities]
    return modalities, encoders


def summarize(runs: Sequence[RunResult], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and std over seeds per strategy.

    Args:
        runs: All runs.
        strategies: Strategies in table order.

    Returns:
        One row per strategy: ``strategy``, ``label``, ``seeds`` and ``<metric>_mean`` / ``<metric>_std``
        for ``acc``, ``macro_f1``, ``acc_<modality>`` and ``conflict_rate_<encoder>`` (fractions).
    """
    modalities, encoders = _columns(runs)
    rows = []
    for strategy in strategies:
        group = [r for r in runs if r.strategy == strategy]
        if not group:
            continue
        row: dict[str, Any] = {
            "strategy": strategy,
            "label": STRATEGY_LABELS.get(strategy, strategy),
            "seeds": " ".join(str(r.seed) for r in group),
        }
        keys = ["acc", "macro_f1", *[f"acc_{m}" for m in modalities]]
        for key in keys:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r.metrics.get(key, math.nan) for r in group])
        for enc in encoders:
            mean, std = _mean_std([r.conflict_rate.get(enc, math.nan) for r in group])
            row[f"conflict_rate_{enc}_mean"], row[f"conflict_rate_{enc}_std"] = mean, std
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], runs: Sequence[RunResult]) -> str:
    """Render the summary as a Markdown table (percentages, mean ± std over seeds).

    Args:
        rows: Output of :func:`summarize`.
        runs: The runs (to name the modality and encoder columns).

    Returns:
        The table, without a trailing newline.
    """
    modalities, encoders = _columns(runs)
    header = ["Strategy", "Acc (%)", "Macro-F1 (%)"]
    header += [f"Acc {m} head (%)" for m in modalities]
    header += [f"Conflict rate {e} (% steps)" for e in encoders]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["label"],
            _fmt(row["acc_mean"], row["acc_std"]),
            _fmt(row["macro_f1_mean"], row["macro_f1_std"]),
        ]
        cells += [_fmt(row[f"acc_{m}_mean"], row[f"acc_{m}_std"]) for m in modalities]
        cells += [_fmt(row[f"conflict_rate_{e}_mean"], row[f"conflict_rate_{e}_std"]) for e in encoders]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def _rolling_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _average_over_seeds(series: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for steps, values in series:
        for s, v in zip(steps, values, strict=True):
            by_step.setdefault(s, []).append(v)
    steps_sorted = sorted(by_step)
    return steps_sorted, [statistics.fmean(by_step[s]) for s in steps_sorted]


def plot_dynamics(runs: Sequence[RunResult], strategies: Sequence[str], path: Path, window: int = 0) -> Path:
    """Plot cos β and the rolling conflict rate per encoder over training steps, one line per strategy.

    Args:
        runs: The runs (curves are averaged over seeds step by step).
        strategies: Strategies in legend order.
        path: Output PNG.
        window: Rolling window in steps (0: about 1/20 of the run, at least 5).

    Returns:
        ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"the training-dynamics figure needs matplotlib: {_INSTALL_HINT}") from err

    _, encoders = _columns(runs)
    encoders = encoders or ["(none)"]
    fig, axes = plt.subplots(2, len(encoders), figsize=(4.8 * len(encoders), 6.4), squeeze=False, sharex=True)
    longest = max((len(s[0]) for r in runs for s in r.steps.values()), default=0)
    win = window or max(5, longest // 20)
    for strategy in strategies:
        group = [r for r in runs if r.strategy == strategy]
        label = STRATEGY_LABELS.get(strategy, strategy)
        for col, enc in enumerate(encoders):
            cos_series = [(r.steps[enc][0], r.steps[enc][1]) for r in group if enc in r.steps]
            conf_series = [(r.steps[enc][0], r.steps[enc][2]) for r in group if enc in r.steps]
            if not cos_series:
                continue
            steps, cos = _average_over_seeds(cos_series)
            _, conflicts = _average_over_seeds(conf_series)
            axes[0][col].plot(steps, _rolling_mean(cos, win), label=label, linewidth=1.4)
            axes[1][col].plot(
                steps, [100 * v for v in _rolling_mean(conflicts, win)], label=label, linewidth=1.4
            )
    for col, enc in enumerate(encoders):
        axes[0][col].set_title(f"{enc} encoder: cos β (rolling mean, {win} steps)")
        axes[0][col].axhline(0.0, color="black", linewidth=0.6)
        axes[0][col].set_ylabel("cos β")
        axes[1][col].set_title(f"{enc} encoder: conflict rate (rolling, {win} steps)")
        axes[1][col].set_ylabel("% of steps with cos β ≤ 0")
        axes[1][col].set_xlabel("training step")
        axes[1][col].set_ylim(-2, 102)
    axes[0][0].legend(fontsize=8)
    n_seeds = len({r.seed for r in runs})
    fig.suptitle(
        "Multimodal vs unimodal gradient per encoder "
        f"(mean over {n_seeds} seed(s) per strategy, {len(runs)} runs)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _machine() -> str:
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


def run_compare(
    config: str | Path | None = None,
    strategies: Sequence[str] = tuple(STRATEGY_LABELS),
    seeds: Sequence[int] = (0, 1, 2),
    output_dir: str | Path = "compare_out",
    max_epochs: int | None = None,
    limit_train_batches: float | None = None,
    limit_val_batches: float | None = None,
    limit_test_batches: float | None = None,
    accelerator: str | None = None,
    callback_args: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
    command: str | None = None,
) -> CompareResult:
    """Train every strategy with every seed, then write the table, the CSVs and the figure.

    Args:
        config: LightningCLI YAML (default: the shipped CG-Digits config).
        strategies: MMParetoCallback strategies to compare, in table order.
        seeds: Seeds; each strategy runs once per seed.
        output_dir: Where results and run logs go.
        max_epochs: Override ``trainer.max_epochs``.
        limit_train_batches: Override ``trainer.limit_train_batches``.
        limit_val_batches: Override ``trainer.limit_val_batches``.
        limit_test_batches: Override ``trainer.limit_test_batches``.
        accelerator: Override ``trainer.accelerator``.
        callback_args: Extra MMParetoCallback ``init_args`` for every run (``rescale``, ``gamma``, ...).
        overrides: Dotted config keys to set, e.g. ``{"model.init_args.lr": 0.02}``.
        num_threads: torch intra-op threads during the runs (``None``: leave torch's setting). One thread
            is fastest for the small CG-Digits models and does not collapse when another process shares
            the cores (two-thread OpenMP regions then spin against each other).
        progress: Show a progress bar over the runs.
        command: The command line to record in ``results.md``.

    Returns:
        The runs, the Markdown table and the paths of the written files.
    """
    unknown = [s for s in strategies if s not in STRATEGY_LABELS]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGY_LABELS)}")
    if not strategies or not seeds:
        raise ValueError("need at least one strategy and one seed")
    config_path = Path(config) if config is not None else default_config_path()
    base = _load_yaml(config_path)
    for key, value in (overrides or {}).items():
        _set_dotted(base, key, value)
    trainer_args: dict[str, Any] = {}
    for key, value in (
        ("max_epochs", max_epochs),
        ("limit_train_batches", limit_train_batches),
        ("limit_val_batches", limit_val_batches),
        ("limit_test_batches", limit_test_batches),
        ("accelerator", accelerator),
    ):
        if value is not None:
            trainer_args[key] = value
    trainer_args.setdefault("deterministic", True)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_root = out / "runs"
    jobs = [(strategy, seed) for strategy in strategies for seed in seeds]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety; the comparison itself does not need tqdm
        tqdm = None  # type: ignore[assignment]
    bar = tqdm(total=len(jobs), desc="compare", unit="run", disable=not progress) if tqdm else None

    import torch

    threads_before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    runs: list[RunResult] = []
    start = time.perf_counter()
    try:
        with _quiet_lightning():
            for strategy, seed in jobs:
                if bar is not None:
                    bar.set_postfix_str(f"{STRATEGY_LABELS[strategy]}, seed {seed}")
                t0 = time.perf_counter()
                run_config = make_run_config(base, strategy, seed, log_root, callback_args, trainer_args)
                metrics, log_dir = run_one(run_config)
                steps = read_step_metrics(log_dir / "metrics.csv")
                rates = {enc: (statistics.fmean(s[2]) if s[2] else math.nan) for enc, s in steps.items()}
                run_seconds = time.perf_counter() - t0
                runs.append(RunResult(strategy, seed, metrics, rates, steps, log_dir, run_seconds))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - start

    rows = summarize(runs, strategies)
    table = markdown_table(rows, runs)
    files = {
        "results.md": out / "results.md",
        "results.csv": out / "results.csv",
        "runs.csv": out / "runs.csv",
        "training_dynamics.png": out / "training_dynamics.png",
    }
    _write_csv(files["results.csv"], rows)
    run_rows = []
    for r in runs:
        row: dict[str, Any] = {"strategy": r.strategy, "seed": r.seed, "seconds": round(r.seconds, 2)}
        row.update(r.metrics)
        row.update({f"conflict_rate_{e}": v for e, v in r.conflict_rate.items()})
        row["log_dir"] = str(r.log_dir)
        run_rows.append(row)
    _write_csv(files["runs.csv"], run_rows)
    plot_dynamics(runs, strategies, files["training_dynamics.png"])
    epochs = base.get("trainer", {}).get("max_epochs") if max_epochs is None else max_epochs
    notes = [
        f"Config: `{config_path}`; seeds: {', '.join(map(str, seeds))}; max_epochs: {epochs}; "
        "test metrics of the final weights (no checkpoint selection).",
        f"Machine: {_machine()}; torch threads: {num_threads or threads_before}.",
        f"Wall time: {seconds / 60:.1f} min for {len(runs)} runs.",
    ]
    if command:
        notes.insert(0, f"Command: `{command}`")
    body = [
        "# mmpareto-lightning compare",
        "",
        table,
        "",
        "Acc and Macro-F1: fusion head; Acc <modality> head: that unimodal head; conflict rate: share of "
        "training steps with cos β ≤ 0 between the encoder's multimodal and unimodal gradients. "
        "Mean ± std over seeds.",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    files["results.md"].write_text("\n".join(body))
    return CompareResult(runs=runs, table=table, files=files, seconds=seconds)


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and value > 1 else value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mmpareto-lightning compare``."""
    parser = argparse.ArgumentParser(
        prog="mmpareto-lightning compare",
        description=(
            "Train the same model and data with one joint loss, uniform, conventional Pareto and MMPareto "
            "over several seeds; write results.md, results.csv, runs.csv and training_dynamics.png."
        ),
    )
    parser.add_argument("--config", type=Path, default=None, help="LightningCLI YAML (default: CG-Digits)")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGY_LABELS),
        choices=list(STRATEGY_LABELS),
        metavar="S",
        help=f"strategies to compare (default: all of {', '.join(STRATEGY_LABELS)})",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--output-dir", type=Path, default=Path("compare_out"), help="default: compare_out")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--limit-train-batches", type=_number, default=None, help="int (batches) or fraction")
    parser.add_argument("--limit-val-batches", type=_number, default=None, help="int (batches) or fraction")
    parser.add_argument("--limit-test-batches", type=_number, default=None, help="int (batches) or fraction")
    parser.add_argument("--accelerator", default=None, help="override trainer.accelerator (cpu, gpu, auto)")
    parser.add_argument(
        "--callback-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="MMParetoCallback init arg for every run, e.g. rescale=per_encoder (repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="set a dotted config key, e.g. model.init_args.lr=0.02 (repeatable)",
    )
    parser.add_argument(
        "--num-threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> CompareResult:
    """Entry point of ``mmpareto-lightning compare``: run, print the table, report the files.

    Args:
        argv: Arguments after ``compare`` (default: ``sys.argv[1:]``).

    Returns:
        The comparison result.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from mmpareto_lightning.cli import _require_jsonargparse

    _require_jsonargparse("`mmpareto-lightning compare`")
    command = "mmpareto-lightning compare" + ("" if not argv else " " + shlex.join(argv))
    result = run_compare(
        config=args.config,
        strategies=args.strategies,
        seeds=args.seeds,
        output_dir=args.output_dir,
        max_epochs=args.max_epochs,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        limit_test_batches=args.limit_test_batches,
        accelerator=args.accelerator,
        callback_args=dict(_parse_assignment(a) for a in args.callback_arg),
        overrides=dict(_parse_assignment(a) for a in args.overrides),
        num_threads=args.num_threads or None,
        progress=not args.no_progress,
        command=command,
    )
    print(result.table)
    print(f"\n{len(result.runs)} runs in {result.seconds / 60:.1f} min; wrote:")
    for path in result.files.values():
        print(f"  {path}")
    return result


if __name__ == "__main__":
    main()
