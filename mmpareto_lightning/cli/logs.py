"""Read a finished run's logs: CSVLogger's ``metrics.csv`` or TensorBoard event files.

Both become the same thing, ``key -> {step: value}``, and :func:`encoder_dynamics` turns the callback's
``mmpareto/<encoder>/*_step`` keys into per-encoder series for plotting and summaries. Only the standard
library is needed, plus ``tensorboard`` when event files are read.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TENSORBOARD_HINT",
    "EncoderDynamics",
    "NonFiniteWarning",
    "Scalars",
    "drop_non_finite",
    "encoder_dynamics",
    "find_runs",
    "read_metrics_csv",
    "read_run_config",
    "read_scalars",
    "read_tensorboard",
    "skipped_text",
    "warn_non_finite",
]

TENSORBOARD_HINT = 'pip install "mmpareto-lightning[tensorboard]"'

Scalars = dict[str, dict[int, float]]
"""Logged scalars: metric key -> step -> value."""

_CSV = "metrics.csv"
_EVENTS = "events.out.tfevents."


def _has_events(directory: Path) -> bool:
    return any(p.name.startswith(_EVENTS) for p in directory.iterdir() if p.is_file())


def _log_mtime(directory: Path) -> float:
    files = [p for p in directory.iterdir() if p.is_file() and (p.name == _CSV or p.name.startswith(_EVENTS))]
    return max(p.stat().st_mtime for p in files)


def find_runs(path: str | Path) -> list[Path]:
    """Directories at or below ``path`` holding a ``metrics.csv`` or TensorBoard event files, newest first.

    Args:
        path: A run's log directory (e.g. ``runs/cg_digits/lightning_logs/version_0``) or any folder above
            it (e.g. ``runs/cg_digits``).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no logs.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if _CSV in filenames or any(f.startswith(_EVENTS) for f in filenames):
            found.append(Path(dirpath))
    if not found:
        raise FileNotFoundError(
            f"no {_CSV} (CSVLogger) or {_EVENTS}* (TensorBoardLogger) file at or below {root}"
        )
    return sorted(found, key=_log_mtime, reverse=True)


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(path: str | Path) -> Scalars:
    """Every logged value of a CSVLogger ``metrics.csv`` (rows without a value for a key are skipped)."""
    scalars: Scalars = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step_value = _number(row.get("step"))
            if step_value is None:
                continue
            step = int(step_value)
            for key, text in row.items():
                value = _number(text)
                if key in ("step", None) or value is None:
                    continue
                scalars.setdefault(key, {})[step] = value
    return scalars


def read_tensorboard(directory: str | Path) -> Scalars:
    """Every scalar in the TensorBoard event files of ``directory`` (needs the ``tensorboard`` package).

    Raises:
        ImportError: tensorboard is not installed; the message says how to install it.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError(
            f"{directory} holds TensorBoard event files; reading them needs tensorboard: {TENSORBOARD_HINT} "
            "(or log with lightning.pytorch.loggers.CSVLogger, whose metrics.csv needs nothing)"
        ) from err
    # size_guidance 0 keeps every event (the default keeps a sample of 10,000 scalars per tag).
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars: Scalars = {}
    for tag in accumulator.Tags().get("scalars", []):
        scalars[tag] = {int(e.step): float(e.value) for e in accumulator.Scalars(tag)}
    return scalars


def read_scalars(run_dir: str | Path) -> Scalars:
    """The scalars of one run directory: ``metrics.csv`` if present, else its TensorBoard event files."""
    directory = Path(run_dir)
    if (directory / _CSV).is_file():
        return read_metrics_csv(directory / _CSV)
    if directory.is_dir() and _has_events(directory):
        return read_tensorboard(directory)
    raise FileNotFoundError(f"{directory} holds neither {_CSV} nor TensorBoard event files")


class NonFiniteWarning(UserWarning):
    """A log held non-finite values (NaN, inf, -inf); they were left out of the tables and figures."""


def drop_non_finite(scalars: Mapping[str, Mapping[int, float]]) -> tuple[Scalars, dict[str, int]]:
    """``scalars`` without its non-finite values, and key -> how many values were left out.

    A diverging run can log inf or NaN (a loss, or a rule statistic on a step whose gradients were not
    finite); means, rolling means and axis limits over them are meaningless or fail, so every reader
    of a log drops them here and says so (:func:`warn_non_finite`).
    """
    clean: Scalars = {}
    skipped: dict[str, int] = {}
    for key, series in scalars.items():
        kept = {step: v for step, v in series.items() if math.isfinite(v)}
        if len(kept) != len(series):
            skipped[key] = len(series) - len(kept)
        clean[key] = kept
    return clean, skipped


def skipped_text(skipped: Mapping[str, int]) -> str:
    """``key (n values), ...`` for messages."""
    return ", ".join(f"{key} ({n} value{'s' if n != 1 else ''})" for key, n in sorted(skipped.items()))


def warn_non_finite(skipped: Mapping[str, int], where: str, stacklevel: int = 2) -> None:
    """Warn, naming every key and how many of its values were non-finite and left out."""
    if skipped:
        warnings.warn(
            f"{where}: left out non-finite values (NaN, inf, -inf) of {skipped_text(skipped)}.",
            NonFiniteWarning,
            stacklevel=stacklevel + 1,
        )


def read_run_config(run_dir: str | Path, section: str = "mmpareto") -> dict[str, Any] | None:
    """The ``section`` of the ``config.yaml`` that LightningCLI saved in ``run_dir``, if there is one."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        config = yaml.safe_load(path.read_text()) or {}
    except Exception:  # a title decoration only: an unreadable config must not stop the plot
        return None
    value = config.get(section) if isinstance(config, dict) else None
    return value if isinstance(value, dict) else None


@dataclass
class EncoderDynamics:
    """What the rule did on one encoder, at the steps where the run wrote its logs.

    Every list is aligned with ``steps``; a value missing at a step is NaN.

    Args:
        steps: Logging steps (the Trainer's ``log_every_n_steps``).
        cos_beta: cos β between the multimodal and unimodal gradients.
        conflicts: 1 where the step had a gradient conflict, else 0.
        alphas: Objective (``multimodal``, ``unimodal``, further loss names) -> its weight alpha.
        rescale: Magnitude enlargement ``||h|| / (gamma ||h'||)`` (1 without conflict).
        stationary: 1 where the step was Pareto-stationary, else 0.
        stationary_total: Cumulative count of Pareto-stationary steps (exact even between logging
            steps); empty when not logged.
    """

    steps: list[int]
    cos_beta: list[float]
    conflicts: list[float]
    alphas: dict[str, list[float]] = field(default_factory=dict)
    rescale: list[float] = field(default_factory=list)
    stationary: list[float] = field(default_factory=list)
    stationary_total: list[float] = field(default_factory=list)

    def conflict_rate(self) -> float:
        """Share of the logged steps with a conflict (every step when ``log_every_n_steps=1``)."""
        values = [v for v in self.conflicts if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    def stationary_events(self) -> list[int]:
        """Logging steps by which a new Pareto-stationary step had occurred.

        From ``stationary_total`` where logged (it also counts the steps between logging steps), else
        from the ``stationary`` indicator.
        """
        if self.stationary_total:
            events, previous = [], 0.0
            for step, total in zip(self.steps, self.stationary_total, strict=True):
                if math.isfinite(total):
                    if total > previous:
                        events.append(step)
                    previous = total
            return events
        return [s for s, v in zip(self.steps, self.stationary, strict=True) if v == 1.0]

    def cumulative_stationary(self) -> list[float]:
        """Cumulative Pareto-stationary steps at each logging step."""
        if self.stationary_total:
            out, last = [], 0.0
            for total in self.stationary_total:
                last = total if math.isfinite(total) else last
                out.append(last)
            return out
        out, running = [], 0.0
        for v in self.stationary:
            running += v if math.isfinite(v) else 0.0
            out.append(running)
        return out


def _aligned(series: Mapping[int, float] | None, steps: list[int]) -> list[float]:
    if not series:
        return []
    return [series.get(s, math.nan) for s in steps]


def encoder_dynamics(scalars: Scalars, prefix: str = "mmpareto") -> dict[str, EncoderDynamics]:
    """Per-encoder series of the callback's step-level keys (``<prefix>/<encoder>/*_step``).

    Args:
        scalars: As returned by :func:`read_scalars`.
        prefix: The callback's logging namespace.

    Returns:
        Encoder name -> its dynamics, in name order; empty if the run logged no step-level MMPareto keys
        (``log_on_step=False``, or not an MMPareto run).
    """
    suffix = "/cos_beta_step"
    encoders = sorted(
        k[len(prefix) + 1 : -len(suffix)]
        for k in scalars
        if k.startswith(prefix + "/") and k.endswith(suffix)
    )
    out: dict[str, EncoderDynamics] = {}
    for enc in encoders:
        base = f"{prefix}/{enc}/"
        steps = sorted(scalars[base + "cos_beta_step"])
        alpha_keys = sorted(
            k
            for k in scalars
            if k.startswith(base + "alpha_") and k.endswith("_step") and "/" not in k[len(base) :]
        )
        # Multimodal and unimodal first (the rule's objective order), further objectives after them.
        order = {"alpha_multimodal_step": 0, "alpha_unimodal_step": 1}
        alpha_keys.sort(key=lambda k: (order.get(k[len(base) :], 2), k))
        out[enc] = EncoderDynamics(
            steps=steps,
            cos_beta=_aligned(scalars[base + "cos_beta_step"], steps),
            conflicts=_aligned(scalars.get(base + "conflicts_step"), steps),
            alphas={
                k[len(base) + len("alpha_") : -len("_step")]: _aligned(scalars[k], steps) for k in alpha_keys
            },
            rescale=_aligned(scalars.get(base + "rescale_step"), steps),
            stationary=_aligned(scalars.get(base + "stationary_step"), steps),
            stationary_total=_aligned(scalars.get(base + "stationary_total"), steps),
        )
    return out
