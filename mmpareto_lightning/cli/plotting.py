"""The training-dynamics figure, shared by ``mmpareto-lightning plot`` and ``mmpareto-lightning compare``.

One column per encoder and five panels per column: cos β between the multimodal and unimodal
gradients (with the zero line: below it the two conflict), the rolling conflict rate, the weights alpha,
the rescale factor and the cumulative Pareto-stationary steps. Each curve is one labelled group of runs
(a single run for ``plot``, one strategy's seeds for ``compare``), averaged over its runs step by step.

matplotlib is optional (extras ``examples`` and ``dev``); it is imported only when a figure is drawn,
with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmpareto_lightning.cli.logs import EncoderDynamics

__all__ = ["MATPLOTLIB_HINT", "average_over_runs", "plot_dynamics", "rolling_mean"]

MATPLOTLIB_HINT = 'pip install matplotlib (or "mmpareto-lightning[examples]")'

Runs = Sequence[Mapping[str, EncoderDynamics]]
"""The runs of one curve: each maps encoder name -> its dynamics."""


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start); non-finite values (NaN for a
    step without a value, inf) are left out."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else math.nan)
    return out


def average_over_runs(
    series: Sequence[tuple[Sequence[int], Sequence[float]]],
) -> tuple[list[int], list[float]]:
    """Mean over runs at every step any run logged (non-finite values and runs without the step are left
    out)."""
    by_step: dict[int, list[float]] = {}
    for steps, values in series:
        for s, v in zip(steps, values, strict=True):
            if math.isfinite(v):
                by_step.setdefault(s, []).append(v)
    ordered = sorted(by_step)
    return ordered, [statistics.fmean(by_step[s]) for s in ordered]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            f"drawing the training-dynamics figure needs matplotlib: {MATPLOTLIB_HINT}"
        ) from err
    return plt


def _peak(line: Any) -> float:
    return max((float(y) for y in line.get_ydata() if math.isfinite(y)), default=0.0)


def _curve(runs: Runs, enc: str, get: Any) -> tuple[list[int], list[float]]:
    series = [(r[enc].steps, get(r[enc])) for r in runs if enc in r]
    return average_over_runs([(s, v) for s, v in series if len(v) == len(s) and v])


def plot_dynamics(
    curves: Mapping[str, Runs],
    path: str | Path,
    title: str | None = None,
    window: int = 0,
    dpi: int = 110,
    encoders: Sequence[str] | None = None,
) -> Path:
    """Draw the training-dynamics figure and save it as a PNG.

    Args:
        curves: Curve label -> its runs. With one label the figure shows that run in detail (every
            objective's alpha, the raw cos β behind its rolling mean, each stationary step marked); with
            several, one line per label (alpha of the multimodal objective).
        path: Output file (``.png``).
        title: Figure title.
        window: Rolling window in logged steps (0: about 1/20 of the longest run, at least 3).
        dpi: Resolution.
        encoders: Column order (default: every encoder in the logs, by name).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    found = sorted({enc for runs in curves.values() for r in runs for enc in r})
    encoders = [e for e in encoders or found if e in found]
    if not encoders:
        raise ValueError(
            "no step-level MMPareto metrics (mmpareto/<encoder>/cos_beta_step) in these logs: was the "
            "run trained with MMParetoCallback(log_on_step=True) and a logger?"
        )
    longest = max(len(d.steps) for runs in curves.values() for r in runs for d in r.values())
    win = window or max(3, longest // 20)
    detailed = len(curves) == 1
    rows = 5
    fig, axes = plt.subplots(
        rows, len(encoders), figsize=(5.2 * len(encoders), 2.1 * rows + 0.8), squeeze=False, sharex=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for col, enc in enumerate(encoders):
            ax = [axes[r][col] for r in range(rows)]
            steps, cos = _curve(runs, enc, lambda d: d.cos_beta)
            if not steps:
                continue
            main_label = "rolling mean" if detailed else label
            if detailed:
                ax[0].plot(steps, cos, color=color, alpha=0.3, linewidth=0.8, label="per logged step")
            ax[0].plot(steps, rolling_mean(cos, win), color=color, linewidth=1.5, label=main_label)
            c_steps, conflicts = _curve(runs, enc, lambda d: d.conflicts)
            if c_steps:
                ax[1].plot(c_steps, [100 * v for v in rolling_mean(conflicts, win)], color=color, label=label)
            names = sorted({n for r in runs if enc in r for n in r[enc].alphas})
            names.sort(key=lambda n: {"multimodal": 0, "unimodal": 1}.get(n, 2))
            for j, name in enumerate(names if detailed else names[:1]):
                a_steps, alpha = _curve(runs, enc, lambda d, n=name: d.alphas.get(n, []))
                if a_steps:
                    a_color = colors[j % len(colors)] if detailed else color
                    a_label = rf"$\alpha$ {name}" if detailed else label
                    # Without conflict every alpha is 1/K: the line styles keep overlapping curves visible.
                    style = ("-", "--", ":", "-.")[j % 4] if detailed else "-"
                    ax[2].plot(a_steps, alpha, color=a_color, linestyle=style, linewidth=1.2, label=a_label)
            r_steps, rescale = _curve(runs, enc, lambda d: d.rescale)
            if r_steps:
                ax[3].plot(r_steps, rescale, color=color, linewidth=1.0, label=label)
            s_steps, total = _curve(runs, enc, lambda d: d.cumulative_stationary())
            if s_steps:
                ax[4].step(s_steps, total, where="post", color=color, label=label)
            if detailed:
                for run in runs:
                    for event in run[enc].stationary_events() if enc in run else []:
                        ax[4].axvline(event, color="tab:red", alpha=0.25, linewidth=0.8)
    for col, enc in enumerate(encoders):
        ax = [axes[r][col] for r in range(rows)]
        ax[0].axhline(0.0, color="black", linewidth=0.8)
        ax[0].set_title(f"{enc} encoder: cos β(g_multimodal, g_unimodal)", fontsize=10)
        ax[0].set_ylabel(f"cos β\n(rolling {win})")
        ax[1].set_title("conflict rate (cos β ≤ 0)", fontsize=10)
        ax[1].set_ylabel(f"% of logged steps\n(rolling {win})")
        ax[1].set_ylim(-3, 103)
        ax[2].set_title(r"weights $\alpha$ (sum 1; 1/K each without conflict)", fontsize=10)
        ax[2].set_ylabel(r"$\alpha$" if detailed else r"$\alpha$ multimodal")
        ax[2].set_ylim(-0.03, 1.03)
        ax[3].set_title(r"rescale $\|h\| / (\gamma \|h'\|)$ (1 without conflict)", fontsize=10)
        ax[3].set_ylabel("factor")
        peak = max((_peak(line) for line in ax[3].lines), default=1.0)
        if peak > 20:  # a few near-opposite steps can enlarge h' a hundredfold
            ax[3].set_yscale("log")
        else:
            ax[3].set_ylim(0.9, max(1.1, 1.05 * peak))
        ax[4].set_title("Pareto-stationary steps (cumulative)", fontsize=10)
        ax[4].set_ylabel("count")
        ax[4].set_xlabel("training step")
        ax[4].xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
        events = max((_peak(line) for line in ax[4].lines), default=0.0)
        ax[4].set_ylim(-0.05 * max(events, 1), 1.1 * max(events, 1))
        if events == 0:
            ax[4].text(0.5, 0.6, "none", transform=ax[4].transAxes, ha="center", color="gray")
        for a in ax:
            a.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    if detailed:
        axes[2][0].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
