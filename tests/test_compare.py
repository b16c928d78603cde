"""``mmpareto-lightning compare``: the runs, the tables and the statistics on tiny budgets."""

from __future__ import annotations

import csv
import math
import statistics
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from _bounds import U64, assert_within, gamma
from _user_project import console_script, run_in, write_user_project
from mmpareto_examples import CONFIG_DIR

from mmpareto_lightning import MMParetoCallback
from mmpareto_lightning.cli import build_cli, main
from mmpareto_lightning.cli.compare import STRATEGY_LABELS, make_run_config, run_compare, strategy_args
from mmpareto_lightning.cli.summary import (
    Column,
    markdown_differences,
    markdown_summary,
    paired_difference,
    t_quantile_975,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--max-epochs", "1", "--limit-train-batches", "4", "--limit-val-batches", "1"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.slow
def test_compare_defaults_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", "--output-dir", str(out), "--seeds", "0", "1", *TINY, "--limit-test-batches", "2"])
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    labels = ["one joint loss", "uniform", "uniform \u00d71.5", "conventional Pareto", "MMPareto"]
    for label in labels:
        assert f"| {label} |" in md and f"| {label} |" in printed
    for label in labels[:-1]:  # MMPareto minus each other strategy, with a t interval over 2 seeds
        assert f"| MMPareto \u2212 {label} | " in md
    assert "Acc gray head (%)" in md and "Conflict rate color (%)" in md and "Acc (pp)" in md
    assert "seeds: 0, 1" in md and "Machine:" in md and "Wall time:" in md and "| n/a" not in md

    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {(r["strategy"], r["seed"]) for r in runs} == {(s, k) for s in STRATEGY_LABELS for k in ("0", "1")}
    with open(out / "results.csv") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(STRATEGY_LABELS)
    for strategy, row in rows.items():
        accs = [float(r["test/acc"]) for r in runs if r["strategy"] == strategy]
        # The CSVs hold each float's repr, which reads back to the same double; fmean (a correctly
        # rounded fsum, then one division) and stdev (exact rational arithmetic) do not depend on the
        # order of their inputs: the same numbers give the same bits.
        assert float(row["test/acc_mean"]) == statistics.fmean(accs)
        assert float(row["test/acc_std"]) == statistics.stdev(accs)
        for enc in ("gray", "color"):
            assert 0.0 <= float(row[f"conflict_rate/{enc}_mean"]) <= 1.0
    with open(out / "differences.csv") as f:
        diffs = {r["strategy"]: r for r in csv.DictReader(f)}
    for strategy in ("uniform", "uniform_gamma"):
        per_seed = {
            k: {r["strategy"]: float(r["test/acc"]) for r in runs if r["seed"] == k} for k in ("0", "1")
        }
        expected = statistics.fmean(v["mmpareto"] - v[strategy] for v in per_seed.values())
        assert float(diffs[strategy]["test/acc_diff"]) == expected  # the same subtractions, then fmean
        assert diffs[strategy]["test/acc_n"] == "2"
    width, height = _png_size(out / "training_dynamics.png")
    assert width > 600 and height > 600


def test_the_step_size_control_is_uniform_with_mmparetos_gamma(tmp_path):
    base = yaml.safe_load((CONFIG_DIR / "cg_digits.yaml").read_text())
    args = strategy_args(base)
    assert args["uniform_gamma"] == {"strategy": "uniform", "gamma": 1.5}
    assert strategy_args(base, {"rescale": "per_encoder"})["uniform_gamma"]["gamma"] == 1.0
    assert strategy_args(base, {"gamma": 2.0})["uniform_gamma"]["gamma"] == 2.0
    # The run's config really builds a uniform callback scaled by 1.5 (the rule's effective gamma).
    config = make_run_config(base, args["uniform_gamma"], 3, tmp_path, "uniform_gamma")
    cli = build_cli(config, run=False, save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, MMParetoCallback)]
    assert cb.rule.strategy == "uniform" and cb.rule.effective_gamma == 1.5
    assert cb.log_on_step is True


def test_the_control_is_left_out_by_default_when_mmpareto_has_gamma_one():
    from mmpareto_lightning.cli.compare import _plan

    default = _plan(None, None, [0], None, False, None, None, None)
    assert default.strategies == list(STRATEGY_LABELS)
    assert default.labels["uniform_gamma"] == "uniform \u00d71.5"
    paper = _plan(None, None, [0], None, False, None, {"rescale": "per_encoder"}, None)
    assert "uniform_gamma" not in paper.strategies and "left out" in paper.notes[0]
    asked = _plan(None, ["uniform_gamma"], [0], None, False, None, {"rescale": "per_encoder"}, None)
    assert asked.strategies == ["uniform_gamma"] and asked.labels["uniform_gamma"] == "uniform \u00d71"


def test_make_run_config_sets_strategy_seed_and_logger(tmp_path):
    base = yaml.safe_load((CONFIG_DIR / "cremad.yaml").read_text())
    cfg = make_run_config(
        base, {"strategy": "pareto"}, 7, tmp_path, "pareto", {"rescale": "per_encoder"}, {"max_epochs": 2}
    )
    assert cfg["seed_everything"] == 7
    assert cfg["trainer"]["callbacks"] == []  # checkpointing dropped: test metrics of the final weights
    assert cfg["mmpareto"]["strategy"] == "pareto" and cfg["mmpareto"]["rescale"] == "per_encoder"
    assert cfg["mmpareto"]["log_on_step"] is True
    assert cfg["trainer"]["max_epochs"] == 2 and cfg["trainer"]["log_every_n_steps"] == 1
    assert cfg["trainer"]["logger"]["init_args"] == {
        "save_dir": str(tmp_path),
        "name": "pareto",
        "version": "seed_7",
    }
    assert base["mmpareto"]["strategy"] == "mmpareto"  # base untouched
    bare = make_run_config({"trainer": {}}, {"strategy": "uniform"}, 0, tmp_path, "uniform")
    assert bare["mmpareto"]["strategy"] == "uniform"


def test_a_config_listing_the_callback_fails_before_any_run(tmp_path):
    base = yaml.safe_load((CONFIG_DIR / "cg_digits.yaml").read_text())
    base["trainer"]["callbacks"] = [{"class_path": "mmpareto_lightning.MMParetoCallback"}]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(ValueError, match="mmpareto:"):
        run_compare(config=path, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()


def test_run_compare_validates_strategies(tmp_path):
    with pytest.raises(ValueError, match="unknown strategies"):
        run_compare(strategies=["mmpareto", "pcgrad"], output_dir=tmp_path)


@pytest.mark.slow
def test_compare_on_a_users_model_with_its_own_metrics_and_one_seed(tmp_path):
    """Item 4 via the console script: --metrics, the warning on an empty column, no spread for one seed."""
    script = console_script()
    write_user_project(tmp_path)
    common = ["compare", "--config", "my.yaml", "--seeds", "0", *TINY, "--no-progress"]
    common += ["--strategies", "uniform", "uniform_gamma", "mmpareto", "--set", "trainer.max_epochs=1"]
    out = run_in(tmp_path, script, *common, "--metrics", "test_accuracy", "test/acc", "--output-dir", "cmp")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no run logged test/acc" in out.stderr and "test_accuracy" in out.stderr  # what it did log
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| Strategy | test_accuracy (%) | Acc (%) | Conflict rate a (%) | Conflict rate b (%) |" in md
    assert "Empty columns (no run logged them): test/acc." in md
    # The footnote names the columns chosen, not the example models' defaults.
    assert "Columns: the test metrics named by --metrics" in md and "Macro-F1: fusion head" not in md
    tables = [line for line in md.splitlines() if line.startswith("|")]
    assert not any("\u00b1" in t or "[" in t for t in tables)  # one seed: no spread, no interval
    assert "| MMPareto \u2212 uniform \u00d71.5 | " in md
    row = next(line for line in md.splitlines() if line.startswith("| uniform |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "n/a" and float(cells[1]) >= 0.0


def test_t_quantiles():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(2) == 4.3027 and t_quantile_975(30) == 2.0423
    # Not round-off: the table holds the quantiles rounded to four decimals (within 5e-5), and beyond 30
    # degrees of freedom the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5) stops after the df**-3
    # term, so it errs by the omitted terms, led by g4 / df**4; twice that term bounds them for df > 30
    # (at df = 31 the error is 1.02 |g4| / df**4). At 10 000 the quantile is 1.9602 to four decimals.
    assert abs(t_quantile_975(10_000) - 1.9602) <= 5e-5
    z = 1.959963984540054

    def omitted(df: int) -> float:
        return 2 * abs(79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)

    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 30, 31, 45, 120, 1000):
        bound = 5e-5 if df <= 30 else omitted(df)
        # scipy's own quantile is accurate to ~1e-12 (1e-9 here covers it and the float64 arithmetic).
        assert abs(t_quantile_975(df) - float(scipy_stats.t.ppf(0.975, df))) <= bound + 1e-9, df


def _exact_difference(reference: dict, other: dict) -> tuple[Fraction, Decimal]:
    """The exact mean and 95% half-width of ``reference - other`` over their common seeds, computed on
    the doubles given (Fractions, and 40-digit decimals for the square roots)."""
    diffs = [Fraction(reference[s]) - Fraction(other[s]) for s in sorted(set(reference) & set(other))]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    with localcontext() as ctx:
        ctx.prec = 40
        sd = (Decimal(variance.numerator) / Decimal(variance.denominator)).sqrt()
        half = Decimal(t_quantile_975(n - 1)) * sd / Decimal(n).sqrt()
    return mean, half


def test_paired_difference_interval():
    reference, other = {0: 0.8, 1: 0.9, 2: 0.7}, {0: 0.7, 1: 0.7, 2: 0.7, 3: 0.1}  # seed 3 unpaired
    d = paired_difference(reference, other)
    # Known decimals, a few float64 operations: the exact values of the formula on the given doubles
    # against the function's float64 ones, within a few ulps: the differences are exact (Sterbenz), the
    # mean rounds twice (a correctly rounded fsum, one division), the half-width at most five times
    # (stdev's rational variance to float and its square root, the t factor, sqrt(n), the quotient), the
    # interval's ends once more.
    mean, half = _exact_difference(reference, other)
    mean_bound, half_bound = gamma(2, U64) * float(mean), gamma(5, U64) * float(half)
    assert d.n == 3
    assert_within(d.mean, float(mean), mean_bound, "mean")
    exact_mean = Decimal(mean.numerator) / mean.denominator
    for got, end in ((d.low, float(exact_mean - half)), (d.high, float(exact_mean + half))):
        assert_within(got, end, mean_bound + half_bound + U64 * abs(end), "interval end")
    assert not d.beyond_noise
    assert paired_difference({0: 0.9, 1: 0.8}, {0: 0.5, 1: 0.45}).beyond_noise
    one = paired_difference({0: 0.9}, {0: 0.5})
    assert (one.n, one.low, one.high) == (1, None, None) and one.mean == 0.9 - 0.5  # one subtraction
    assert paired_difference({0: 0.9}, {1: 0.5}) is None


def test_markdown_tables():
    results = {
        "uniform": {0: {"acc": 0.8, "loss": 1.5}, 1: {"acc": 0.9, "loss": 1.25}},
        "mmpareto": {0: {"acc": 0.9, "loss": 1.0}, 1: {"acc": 0.95, "loss": 1.0}},
        "pareto": {0: {"acc": 0.7}},
    }
    labels = {"uniform": "uniform", "mmpareto": "MMPareto", "pareto": "Pareto"}
    columns = [Column("acc", "Acc"), Column("loss", "Loss", percent=False)]
    lines = markdown_summary(results, labels, columns).splitlines()
    assert lines[0] == "| Strategy | Acc (%) | Loss |"
    assert lines[2] == "| uniform | 85.00 ± 7.07 | 1.3750 ± 0.1768 |"
    assert lines[4] == "| Pareto | 70.00 | n/a |"  # one seed: no spread; never logged: n/a
    diff = markdown_differences(results, "mmpareto", labels, columns).splitlines()
    assert diff[0] == "| Difference | Acc (pp) | Loss |"
    # Per seed +10 and +5 points: mean +7.5, t(1) = 12.7062, sd 3.536 -> +-31.77.
    assert diff[2] == "| MMPareto \u2212 uniform | +7.50 [-24.27, +39.27] | -0.3750 [-1.9633, +1.2133] |"
    assert diff[3] == "| MMPareto \u2212 Pareto | +20.00 | n/a |"


def test_the_report_skips_non_finite_values_and_says_so(tmp_path):
    from test_plot import NON_FINITE_COUNTS, NON_FINITE_CSV

    from mmpareto_lightning.cli.logs import (
        NonFiniteWarning,
        drop_non_finite,
        encoder_dynamics,
        read_metrics_csv,
    )
    from mmpareto_lightning.cli.report import RunResult, write_report

    (tmp_path / "metrics.csv").write_text(NON_FINITE_CSV)
    runs = []
    for strategy, seed, loss in [("uniform", 0, 1.0), ("mmpareto", 0, math.inf), ("mmpareto", 1, 0.5)]:
        scalars, skipped = drop_non_finite(read_metrics_csv(tmp_path / "metrics.csv"))
        metrics = {"test/acc": 0.5 + 0.1 * seed, "test/loss": loss}
        runs.append(RunResult(strategy, seed, metrics, encoder_dynamics(scalars), tmp_path, 1.0, skipped))
    # Without the log's cleaning too: the report itself must survive any value.
    raw = encoder_dynamics(read_metrics_csv(tmp_path / "metrics.csv"))
    runs.append(RunResult("uniform", 1, {"test/acc": math.nan, "test/loss": -math.inf}, raw, tmp_path, 1.0))
    labels = {"uniform": "uniform", "mmpareto": "MMPareto"}
    (tmp_path / "out").mkdir()
    with pytest.warns(NonFiniteWarning) as record:
        result = write_report(
            runs, ["uniform", "mmpareto"], labels, [0, 1], tmp_path / "out", 4.0, ["test/acc", "test/loss"]
        )
    messages = [str(w.message) for w in record]
    assert any("mmpareto seed 0, test metrics" in m and "test/loss (1 value)" in m for m in messages)
    report = result.files["results.md"].read_text()
    assert result.files["training_dynamics.png"].read_bytes()[:8] == PNG_MAGIC
    note = next(line for line in report.splitlines() if "Non-finite values" in line)
    assert "MMPareto seed 0: " in note and "test/loss (1 value)" in note
    assert "uniform seed 1: test/acc (1 value), test/loss (1 value)" in note
    for key, count in NON_FINITE_COUNTS.items():
        assert f"{key} ({count} value" in note
    assert "inf" not in result.table and "nan" not in result.table
