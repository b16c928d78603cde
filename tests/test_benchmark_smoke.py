"""Smoke test of ``benchmarks/step_time.py`` on a tiny budget (no wall-clock thresholds: shared CI)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mmpareto_lightning import RuleConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # Loaded from its path: ``benchmarks`` is a folder of scripts, not an installed package. Registered
    # in sys.modules first because dataclasses resolve their module while the file executes.
    spec = importlib.util.spec_from_file_location("mmpareto_step_time", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _rows(report: str, header_start: str) -> dict[str, list[str]]:
    """First column -> other cells of the Markdown table whose header starts with ``header_start``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_report_has_three_methods_and_passing_check(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    report = bench.main(
        [
            "--device", "cpu", "--iters", "2", "--warmup", "1", "--batch-size", "4", "--image-size", "8",
            "--width", "4", "--encoders", "2", "3", "--scaling-iters", "1", "--lightning-rounds", "1",
            "--breakdown", "--markdown", str(out),
        ]
    )  # fmt: skip
    assert out.read_text(encoding="utf-8") == report
    assert "correctness pre-check PASSED" in report

    main = _rows(report, "| method | median ms")
    assert set(main) == {"uniform", "mmpareto", "authors"}
    for cells in main.values():
        median, iqr = float(cells[0]), float(cells[1])
        assert math.isfinite(median) and median > 0 and iqr >= 0
        assert re.fullmatch(r"\d+\.\d\dx", cells[2])
        paired = re.fullmatch(r"(\d+\.\d\d)x \[(\d+\.\d\d)-(\d+\.\d\d)\]", cells[3])
        assert paired is not None
        low, mid, high = float(paired[2]), float(paired[1]), float(paired[3])
        assert 0 < low <= mid <= high
        assert cells[4] == "n/a" or float(cells[4]) > 0  # n/a only if torch's private MemTracker is missing
    assert main["uniform"][2] == "1.00x" and main["uniform"][3] == "1.00x [1.00-1.00]"
    assert re.search(
        r"target: mmpareto <= 1\.7x uniform: ratio of medians \d+\.\d\dx \((met|NOT met)\)", report
    )

    lightning = _rows(report, "| method (through Lightning Trainer)")
    assert set(lightning) == {"lightning uniform", "lightning mmpareto"}
    assert all(float(c[0]) > 0 for c in lightning.values())

    phases = _rows(report, "| phase |")
    assert set(phases) == {*bench.PHASES, "sum of the medians"}
    for phase in bench.PHASES:
        uniform_ms, ours_ms = phases[phase]
        assert float(ours_ms) > 0
        assert (uniform_ms == "-") == (phase in (bench.PHASES[1], bench.PHASES[3]))
    uniform_sum = sum(float(phases[p][0]) for p in bench.PHASES if phases[p][0] != "-")
    assert float(phases["sum of the medians"][0]) == pytest.approx(uniform_sum, abs=0.02)

    scaling = _rows(report, "| encoders |")
    assert set(scaling) == {"2", "3"}
    for cells in scaling.values():
        assert all(float(c) > 0 for c in cells[:3])
        assert all(re.fullmatch(r"\d+\.\d\dx", c) for c in cells[3:])


def test_paired_ratios_are_per_round(bench: ModuleType) -> None:
    # Round-by-round ratios: a slow phase that hits both methods in the same round cancels out.
    base = bench.Timing("uniform", [10.0, 20.0, 10.0, 40.0, 10.0])
    ours = bench.Timing("mmpareto", [15.0, 30.0, 16.0, 60.0, 14.0])
    median, q1, q3 = bench.paired_ratios(ours, base)
    assert median == pytest.approx(1.5)
    assert (q1, q3) == (pytest.approx(1.5), pytest.approx(1.5))
    assert ours.median / base.median == pytest.approx(1.6)  # the ratio of medians mixes rounds
    with pytest.raises(ValueError):
        bench.paired_ratios(bench.Timing("short", [1.0]), base)


def test_memory_sweep_reports_every_batch_size(bench: ModuleType) -> None:
    spec = bench.ModelSpec("small-cnn", image_size=8, width=4)
    points, how = bench.run_memory_sweep(spec, 2, [2, 4], torch.device("cpu"), seed=0)
    assert [p.batch_size for p in points] == [2, 4]
    table = bench.format_memory_sweep(points, how)
    rows = _rows(table, "| batch |")
    assert set(rows) == {"2", "4"}
    if "MemTracker" in how and "unavailable" not in how and "failed" not in how:
        for point in points:
            assert all(v is not None and v > 0 for v in point.peaks.values())
        # Activations grow with the batch, and every method's step holds them.
        assert points[1].peaks["uniform"] > points[0].peaks["uniform"]
        for cells in rows.values():
            assert float(cells[1]) > 0 and cells[3] in ("yes", "no") and float(cells[4]) >= 0


def test_precheck_catches_a_wrong_engine(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = bench.ModelSpec("small-cnn", image_size=8, width=4)
    torch.manual_seed(0)
    base = spec.build(2)
    batch = bench.make_batch(spec, list(base.encoders), 4, torch.device("cpu"), 0)
    assert bench.check_correctness(base, batch).passed

    class WrongEngine(bench.EngineStep):  # type: ignore[name-defined,misc]
        def __init__(self, net: torch.nn.Module, b: dict[str, torch.Tensor]) -> None:
            super().__init__(net, b, RuleConfig(strategy="uniform"))  # not the authors' rule

    monkeypatch.setattr(bench, "EngineStep", WrongEngine)
    check = bench.check_correctness(base, batch)
    assert not check.passed
    assert all(e > 1e-3 for e in check.engine_error.values())
    with pytest.raises(AssertionError, match="pre-check failed"):
        bench.run_main(
            spec, 2, 4, torch.device("cpu"), iters=1, warmup=0, seed=0, lightning=False, memory=False
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs every CUDA check")
def test_gpu_checks_script_stops_clearly_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        ["bash", str(SCRIPT.parent / "gpu_checks.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=SCRIPT.parents[1],
    )
    assert out.returncode == 1
    assert "no CUDA device: nothing to check" in out.stderr
