"""``mmpareto-lightning compare``: the table, the CSVs and the figure on a tiny budget, plus its helpers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mmpareto_examples import CONFIG_DIR

from mmpareto_lightning.cli import main
from mmpareto_lightning.compare import (
    STRATEGY_LABELS,
    RunResult,
    make_run_config,
    markdown_table,
    plot_dynamics,
    read_step_metrics,
    run_compare,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.slow
def test_compare_tiny_budget_writes_table_csv_and_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(
        [
            "compare",
            "--output-dir",
            str(out),
            "--seeds",
            "0",
            "1",
            "--max-epochs",
            "1",
            "--limit-train-batches",
            "4",
            "--limit-val-batches",
            "1",
            "--limit-test-batches",
            "2",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    for label in STRATEGY_LABELS.values():
        assert f"| {label} |" in md and f"| {label} |" in printed
    assert "Acc gray head (%)" in md and "Conflict rate color (% steps)" in md
    assert "seeds: 0, 1" in md and "Machine:" in md and "Wall time:" in md

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == list(STRATEGY_LABELS)
    for r in rows:
        assert r["seeds"] == "0 1"
        for key in ("acc_mean", "macro_f1_mean", "acc_gray_mean", "acc_color_mean"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert float(r["acc_std"]) >= 0.0
        for enc in ("gray", "color"):
            assert 0.0 <= float(r[f"conflict_rate_{enc}_mean"]) <= 1.0

    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    assert {(r["strategy"], r["seed"]) for r in runs} == {(s, k) for s in STRATEGY_LABELS for k in ("0", "1")}
    for r in runs:
        steps = read_step_metrics(Path(r["log_dir"]) / "metrics.csv")
        assert set(steps) == {"gray", "color"}
        assert steps["gray"][0] == [0, 1, 2, 3]  # every optimizer step logged
        assert all(-1.0 <= c <= 1.0 for c in steps["gray"][1])
        assert set(steps["color"][2]) <= {0.0, 1.0}
        rate = sum(steps["color"][2]) / 4
        assert float(r["conflict_rate_color"]) == pytest.approx(rate)
    # Each strategy's mean in results.csv is the mean of its runs.
    for r in rows:
        accs = [float(x["acc"]) for x in runs if x["strategy"] == r["strategy"]]
        assert float(r["acc_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-6)

    width, height = _png_size(out / "training_dynamics.png")
    assert width > 600 and height > 400
    assert (out / "training_dynamics.png").stat().st_size > 20_000


def test_run_compare_validates_strategies(tmp_path):
    with pytest.raises(ValueError, match="unknown strategies"):
        run_compare(strategies=["mmpareto", "pcgrad"], output_dir=tmp_path)


def test_make_run_config_sets_strategy_seed_and_logger(tmp_path):
    import yaml

    base = yaml.safe_load((CONFIG_DIR / "cremad.yaml").read_text())
    cfg = make_run_config(base, "pareto", 7, tmp_path, {"rescale": "per_encoder"}, {"max_epochs": 2})
    assert cfg["seed_everything"] == 7
    callbacks = cfg["trainer"]["callbacks"]
    assert [c["class_path"].split(".")[-1] for c in callbacks] == [
        "MMParetoCallback"
    ]  # checkpointing dropped
    args = callbacks[0]["init_args"]
    assert args["strategy"] == "pareto" and args["rescale"] == "per_encoder" and args["log_on_step"] is True
    assert cfg["trainer"]["max_epochs"] == 2 and cfg["trainer"]["log_every_n_steps"] == 1
    assert cfg["trainer"]["logger"]["init_args"] == {
        "save_dir": str(tmp_path),
        "name": "pareto",
        "version": "seed_7",
    }
    assert base["trainer"]["callbacks"][0]["init_args"]["strategy"] == "mmpareto"  # base untouched
    # A config without the callback gets one.
    bare = make_run_config({"trainer": {}}, "uniform", 0, tmp_path)
    assert bare["trainer"]["callbacks"][0]["init_args"]["strategy"] == "uniform"


def test_read_step_metrics_skips_epoch_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,mmpareto/a/conflicts_step,mmpareto/a/cos_beta_step,mmpareto/a/cos_beta_epoch,step,val/acc\n"
        "0,0.0,0.5,,0,\n"
        "0,1.0,-0.25,,1,\n"
        "0,,,0.125,1,\n"
        "0,,,,1,0.9\n"
        "1,1.0,-0.5,,2,\n"
    )
    assert read_step_metrics(path) == {"a": ([0, 1, 2], [0.5, -0.25, -0.5], [0.0, 1.0, 1.0])}


def _run(strategy: str, seed: int, acc: float, rate: float) -> RunResult:
    steps = {"gray": ([0, 1, 2, 3], [0.5, -0.1, 0.2, 0.3], [0.0, 1.0, 0.0, 0.0])}
    metrics = {"acc": acc, "macro_f1": acc - 0.01, "acc_gray": 0.5, "acc_color": 0.25}
    return RunResult(strategy, seed, metrics, {"gray": rate}, steps, Path("."), 1.0)


def test_summary_and_markdown_mean_and_std():
    runs = [_run("uniform", 0, 0.8, 0.25), _run("uniform", 1, 0.9, 0.25), _run("mmpareto", 0, 0.7, 0.5)]
    rows = summarize(runs, ["multimodal_only", "uniform", "mmpareto"])
    assert [r["strategy"] for r in rows] == ["uniform", "mmpareto"]  # strategies without runs are left out
    assert rows[0]["acc_mean"] == pytest.approx(0.85)
    assert rows[0]["acc_std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.8, 0.9
    assert rows[1]["acc_std"] == 0.0
    table = markdown_table(rows, runs).splitlines()
    assert table[0].startswith("| Strategy | Acc (%) | Macro-F1 (%) | Acc gray head (%) | Acc color head (%)")
    assert (
        table[2] == "| uniform | 85.00 ± 7.07 | 84.00 ± 7.07 | 50.00 ± 0.00 | 25.00 ± 0.00 | 25.00 ± 0.00 |"
    )
    assert table[3].startswith("| MMPareto | 70.00 ± 0.00 |")


def test_plot_dynamics_writes_a_png(tmp_path):
    runs = [_run("uniform", 0, 0.8, 0.25), _run("mmpareto", 0, 0.7, 0.5)]
    path = plot_dynamics(runs, ["uniform", "mmpareto"], tmp_path / "fig.png")
    width, height = _png_size(path)
    assert width > 400 and height > 400
