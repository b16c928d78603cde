"""Summary statistics of a comparison: mean ± std per strategy, paired differences, Markdown tables.

Pure standard library. The 95 % interval of a paired difference is Student's t interval over the seeds
both strategies ran: ``mean ± t(0.975, n-1) · sd / √n``, with the t quantile from a table for 1 to 30
degrees of freedom (four decimals, as printed in statistics tables) and the Cornish-Fisher expansion
beyond (error below 1e-5). With one seed there is no spread and no interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Column",
    "PairedDifference",
    "Results",
    "difference_rows",
    "empty_columns",
    "markdown_differences",
    "markdown_summary",
    "paired_difference",
    "summary_rows",
    "t_quantile_975",
]

Results = Mapping[str, Mapping[int, Mapping[str, float]]]
"""Strategy (variant) -> seed -> column key -> value (absent or not finite: left out)."""

_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t distribution with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Column:
    """One column of the tables.

    Args:
        key: Key in :data:`Results` (e.g. ``test/acc`` or ``conflict_rate/gray``).
        label: Header text, without the unit.
        percent: Values are fractions: show them x100 with ``%`` (differences in percentage points).
    """

    key: str
    label: str
    percent: bool = True

    def header(self, difference: bool = False) -> str:
        unit = (" (pp)" if difference else " (%)") if self.percent else ""
        return self.label + unit

    def scaled(self, value: float) -> float:
        return 100 * value if self.percent else value

    @property
    def digits(self) -> int:
        return 2 if self.percent else 4


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``reference - other`` over the seeds both ran, with its 95 % t interval (``n >= 2``)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def _values(per_seed: Mapping[int, Mapping[str, float]], key: str) -> dict[int, float]:
    return {seed: v for seed, row in per_seed.items() if (v := row.get(key)) is not None and math.isfinite(v)}


def paired_difference(reference: Mapping[int, float], other: Mapping[int, float]) -> PairedDifference | None:
    """``reference - other`` paired by seed; ``None`` when no seed has both."""
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return None
    diffs = [reference[s] - other[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(mean, None, None, 1)
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs))


def empty_columns(results: Results, columns: Sequence[Column]) -> list[Column]:
    """Columns without a single value in any run."""
    return [c for c in columns if not any(_values(per_seed, c.key) for per_seed in results.values())]


def summary_rows(results: Results, labels: Mapping[str, str], columns: Sequence[Column]) -> list[dict]:
    """One row per strategy: ``<key>_mean`` and ``<key>_std`` (std empty below two seeds), as fractions."""
    rows = []
    for variant, per_seed in results.items():
        row: dict = {"strategy": variant, "label": labels.get(variant, variant)}
        row["seeds"] = " ".join(str(s) for s in sorted(per_seed))
        for c in columns:
            values = list(_values(per_seed, c.key).values())
            row[f"{c.key}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{c.key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        rows.append(row)
    return rows


def _cell(values: Sequence[float], column: Column) -> str:
    if not values:
        return "n/a"
    mean = f"{column.scaled(statistics.fmean(values)):.{column.digits}f}"
    if len(values) < 2:
        return mean
    return f"{mean} ± {column.scaled(statistics.stdev(values)):.{column.digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_summary(results: Results, labels: Mapping[str, str], columns: Sequence[Column]) -> str:
    """Mean ± sample std over seeds per strategy (the mean alone with one seed; ``n/a``: not logged)."""
    body = [
        [labels.get(v, v)] + [_cell(list(_values(per_seed, c.key).values()), c) for c in columns]
        for v, per_seed in results.items()
    ]
    return _table(["Strategy", *(c.header() for c in columns)], body)


def difference_rows(
    results: Results, reference: str, labels: Mapping[str, str], columns: Sequence[Column]
) -> list[dict]:
    """One row per other strategy: mean, low, high and n of ``reference - strategy`` per column."""
    rows = []
    ref = results.get(reference, {})
    for variant, per_seed in results.items():
        if variant == reference:
            continue
        row: dict = {"reference": reference, "strategy": variant, "label": labels.get(variant, variant)}
        for c in columns:
            d = paired_difference(_values(ref, c.key), _values(per_seed, c.key))
            row[f"{c.key}_diff"] = d.mean if d else math.nan
            row[f"{c.key}_low"] = d.low if d and d.low is not None else math.nan
            row[f"{c.key}_high"] = d.high if d and d.high is not None else math.nan
            row[f"{c.key}_n"] = d.n if d else 0
        rows.append(row)
    return rows


def _diff_cell(d: PairedDifference | None, column: Column) -> str:
    if d is None:
        return "n/a"
    k = column.digits
    text = f"{column.scaled(d.mean):+.{k}f}"
    if d.low is None or d.high is None:
        return text
    text += f" [{column.scaled(d.low):+.{k}f}, {column.scaled(d.high):+.{k}f}]"
    return f"**{text}**" if d.beyond_noise else text


def markdown_differences(
    results: Results, reference: str, labels: Mapping[str, str], columns: Sequence[Column]
) -> str:
    """Paired differences ``reference - strategy``: mean [95 % t interval], bold when it excludes 0."""
    ref = results.get(reference, {})
    body = []
    for variant, per_seed in results.items():
        if variant == reference:
            continue
        cells = [
            _diff_cell(paired_difference(_values(ref, c.key), _values(per_seed, c.key)), c) for c in columns
        ]
        body.append([f"{labels.get(reference, reference)} \u2212 {labels.get(variant, variant)}", *cells])
    return _table(["Difference", *(c.header(difference=True) for c in columns)], body)
