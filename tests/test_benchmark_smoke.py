"""Smoke tests of the step-time benchmark (``benchmarks/mmpbench``) on a tiny budget.

No wall-clock thresholds: the machines that run the tests are shared, so only the shape of the report
and the correctness pre-check are asserted.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mmpareto_lightning import RuleConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "step_time.py"
TINY_CNN = ["--device", "cpu", "--iters", "2", "--warmup", "1", "--batch-size", "4", "--image-size", "8",
            "--width", "4"]  # fmt: skip
TINY_MLP = ["--device", "cpu", "--model", "wide-mlp", "--mlp-width", "16", "--mlp-features", "8", "--iters",
            "2", "--warmup", "1"]  # fmt: skip
TINY_BERT = ["--device", "cpu", "--model", "bert", "--bert-layers", "1", "--bert-hidden", "16",
             "--bert-vocab", "50", "--seq-len", "8", "--batch-size", "2", "--iters", "2",
             "--warmup", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # ``benchmarks`` is a folder of scripts, not an installed package: its ``mmpbench`` package is
    # imported from there, as the entry script does.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("mmpbench")
    finally:
        sys.path.remove(str(BENCHMARKS))


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


def _assert_ratio_cells(cells: list[str]) -> None:
    """``<ratio of medians>x`` and ``<median>x [<q1>-<q3>]`` with q1 <= median <= q3."""
    assert re.fullmatch(r"\d+\.\d\dx", cells[0])
    paired = re.fullmatch(r"(\d+\.\d\d)x \[(\d+\.\d\d)-(\d+\.\d\d)\]", cells[1])
    assert paired is not None
    low, mid, high = float(paired[2]), float(paired[1]), float(paired[3])
    assert 0 < low <= mid <= high


def _assert_phase_table(bench: ModuleType, report: str) -> None:
    phases = _rows(report, "| phase |")
    names = bench.timing.PHASES
    assert set(phases) == {*names, "sum of the medians"}
    for phase in names:
        uniform_ms, ours_ms, authors_ms = phases[phase]
        assert float(ours_ms) > 0 and float(authors_ms) > 0
        # The uniform step has no extra backward and no rule.
        assert (uniform_ms == "-") == (phase in (names[1], names[3]))
    shown = [float(phases[p][0]) for p in names if phases[p][0] != "-"]
    # The sum row adds the unrounded medians; each cell, the sum's included, is rounded to 0.01 for the
    # table (half a unit, 0.005, each); the float64 sums are exact to far below that.
    assert abs(float(phases["sum of the medians"][0]) - sum(shown)) <= 0.005 * (len(shown) + 1) + 1e-9


def test_report_has_every_table_and_passing_check(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    # The operator counts have their own test (below): here they would add a Trainer per row.
    report = bench.main(
        [*TINY_CNN, "--encoders", "2", "3", "--scaling-iters", "1", "--breakdown", "--no-op-counts",
         "--markdown", str(out)]
    )  # fmt: skip
    assert out.read_text(encoding="utf-8") == report
    assert "correctness pre-check PASSED" in report

    main = _rows(report, "| method | median ms")
    assert set(main) == {"uniform", "mmpareto", "authors"}
    for cells in main.values():
        median, iqr = float(cells[0]), float(cells[1])
        assert math.isfinite(median) and median > 0 and iqr >= 0
        _assert_ratio_cells(cells[2:4])
        assert cells[4] == "n/a" or float(cells[4]) > 0  # n/a only if torch's private MemTracker is missing
    assert main["uniform"][2] == "1.00x" and main["uniform"][3] == "1.00x [1.00-1.00]"
    assert re.search(
        r"target: mmpareto <= 1\.7x uniform: ratio of medians \d+\.\d\dx \((met|NOT met)\)", report
    )

    lightning = _rows(report, "| method (through Lightning Trainer)")
    variants = bench.lightning_path.LIGHTNING_VARIANTS
    expected = {variants[k].label for k in bench.lightning_path.DEFAULT_LIGHTNING_VARIANTS}
    assert set(lightning) == expected
    assert {"lightning uniform", "lightning mmpareto", "lightning authors"} <= expected
    for cells in lightning.values():
        assert float(cells[0]) > 0
        _assert_ratio_cells(cells[2:4])
        assert math.isfinite(float(cells[4]))  # overhead against the plain step the row drives
    assert lightning["lightning uniform"][3] == "1.00x [1.00-1.00]"

    _assert_phase_table(bench, report)

    scaling = _rows(report, "| encoders |")
    assert set(scaling) == {"2", "3"}
    for cells in scaling.values():
        assert all(float(c) > 0 for c in cells[:3])
        assert all(re.fullmatch(r"\d+\.\d\dx", c) for c in cells[3:])


def test_wide_mlp_through_the_entry_script(tmp_path: Path) -> None:
    # The thin script must find its package when run from anywhere, and the parameter-heavy model must
    # go through every table: plain step, Lightning, breakdown, memory.
    out = tmp_path / "mlp.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY_MLP, "--threads", "1", "--clock", "cpu", "--encoders",
         "--breakdown", "--no-op-counts", "--lightning-variants", "uniform", "mmpareto", "authors",
         "--markdown", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert "model: wide-mlp x 2 encoders (audio 256, visual 384), batch 8" in report
    assert "cpu clock" in report
    assert "correctness pre-check PASSED" in report
    assert "target: mmpareto <= 2.0x uniform" in report
    assert set(_rows(report, "| method | median ms")) == {"uniform", "mmpareto", "authors"}
    lightning = _rows(report, "| method (through Lightning Trainer)")
    assert set(lightning) == {"lightning uniform", "lightning mmpareto", "lightning authors"}
    assert "| phase |" in report and "## Scaling" not in report


def test_profile_tables(bench: ModuleType) -> None:
    report = bench.main([*TINY_CNN, "--profile", "mmpareto", "--lightning-iters", "2"])
    assert "correctness pre-check PASSED" in report and "## Step time" not in report
    assert re.search(r"### lightning mmpareto: median step \d+\.\d\d ms over 2 unprofiled steps", report)
    functions = _rows(report, "| function (cProfile)")
    assert any("mmpareto_lightning/lightning/callback.py" in name for name in functions)
    assert _rows(report, "| tensor built-in (cProfile)") and _rows(report, "| operator (torch.profiler)")


def test_wide_mlp_has_the_issue_sizes(bench: ModuleType) -> None:
    net = bench.models.ModelSpec("wide-mlp").build(2)
    sizes = {n: sum(p.numel() for p in ps) for n, ps in net.encoder_params().items()}
    # audio 256 -> 2048 -> 2048 -> 512, visual 384 -> 2048 -> 2048 -> 512 (weights and biases).
    assert sizes == {"audio": 5_771_776, "visual": 6_033_920}
    assert bench.models.default_batch_size("wide-mlp") == 8
    assert bench.models.default_batch_size("small-cnn") == 64


def test_paired_ratios_are_per_round(bench: ModuleType) -> None:
    # Round-by-round ratios: a slow phase that hits both methods in the same round cancels out.
    timing = bench.timing
    base = timing.Timing("uniform", [10.0, 20.0, 10.0, 40.0, 10.0])
    ours = timing.Timing("mmpareto", [15.0, 30.0, 16.0, 60.0, 14.0])
    median, q1, q3 = timing.paired_ratios(ours, base)
    # Known decimals: 15 / 10, 30 / 20, 60 / 40 are exactly 1.5 (a correctly rounded division whose
    # quotient is a double), and the quartiles interpolate between two of those equal values,
    # (1.5 (4 - d) + 1.5 d) / 4 with an integer d: exact too.
    assert (median, q1, q3) == (1.5, 1.5, 1.5)
    # The ratio of medians mixes rounds: 16 / 10, correctly rounded, is the double nearest 1.6.
    assert ours.median / base.median == 1.6
    with pytest.raises(ValueError):
        timing.paired_ratios(timing.Timing("short", [1.0]), base)


def test_lightning_variants_are_interleaved_and_failures_surface(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    lp = bench.lightning_path
    spec = bench.models.ModelSpec("small-cnn", image_size=8, width=4)
    base, batch = bench.models.build_network_and_batch(spec, 2, 4, torch.device("cpu"), 0)
    timings = lp.time_lightning(base, batch, torch.device("cpu"), iters=3, warmup=1, variants=["uniform"])
    assert list(timings) == ["lightning uniform"] and len(timings["lightning uniform"].times_ms) == 3

    # A Trainer that fails mid-run (here at its first training step) ends the measurement with its
    # error instead of leaving the other threads waiting for their turn.
    broken = lp.LightningVariant("broken", "callback", "mmpareto", {"multimodal_key": "no-such-loss"})
    monkeypatch.setitem(lp.LIGHTNING_VARIANTS, "broken", broken)
    with pytest.raises(RuntimeError, match="failed"):
        lp.time_lightning(base, batch, torch.device("cpu"), iters=2, warmup=1, variants=["uniform", "broken"])


def test_memory_sweep_reports_every_batch_size(bench: ModuleType) -> None:
    spec = bench.models.ModelSpec("small-cnn", image_size=8, width=4)
    points, how = bench.memory.run_memory_sweep(spec, 2, [2, 4], torch.device("cpu"), seed=0)
    assert [p.batch_size for p in points] == [2, 4]
    table = bench.report.format_memory_sweep(points, how)
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
    spec = bench.models.ModelSpec("wide-mlp", mlp_width=8, mlp_features=4)
    torch.manual_seed(0)
    base = spec.build(2)
    batch = bench.models.make_batch(spec, list(base.encoders), 4, torch.device("cpu"), 0)
    assert bench.check.check_correctness(base, batch).passed

    class WrongEngine(bench.methods.EngineStep):  # type: ignore[name-defined,misc]
        def __init__(self, net: torch.nn.Module, b: dict[str, torch.Tensor]) -> None:
            super().__init__(net, b, RuleConfig(strategy="uniform"))  # not the authors' rule

    monkeypatch.setattr(bench.methods, "EngineStep", WrongEngine)
    check = bench.check.check_correctness(base, batch)
    assert not check.passed
    assert all(e > 1e-3 for e in check.engine_error.values())
    with pytest.raises(AssertionError, match="pre-check failed"):
        bench.runs.run_main(spec, 2, 4, torch.device("cpu"), iters=1, warmup=0, seed=0, memory=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs every CUDA check")
def test_gpu_checks_script_stops_clearly_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_checks.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert out.returncode == 1
    assert "no CUDA device: nothing to check" in out.stderr


def _op_totals(report: str) -> dict[str, int]:
    return {name: int(cells[0]) for name, cells in _rows(report, "| step | ATen ops per step").items()}


def test_host_bound_regime_in_rounds_with_operator_counts(bench: ModuleType) -> None:
    # The host-bound regime's protocol: the Trainers run one after the other in this thread, in
    # alternated rounds (here 2 rounds of 2 steps), and the operators of one step are counted.
    report = bench.main(
        ["--device", "cpu", "--model", "resnet18-tiny", "--threads", "1", "--iters", "2", "--warmup", "1",
         "--lightning-iters", "4", "--lightning-rounds", "2", "--lightning-variants", "uniform", "mmpareto",
         "authors", "--encoders", "--no-memory"]
    )  # fmt: skip
    assert "model: resnet18-tiny x 2 encoders (audio 1x16x16, visual 3x16x16), batch 2" in report
    assert "correctness pre-check PASSED" in report
    assert "no step-time target for this regime" in report
    assert "## Through Lightning (2 rounds of 2 steps per row: one Trainer.fit per row and round" in report
    lightning = _rows(report, "| method (through Lightning Trainer)")
    assert set(lightning) == {"lightning uniform", "lightning mmpareto", "lightning authors"}
    for cells in lightning.values():
        _assert_ratio_cells(cells[2:4])

    ops = _op_totals(report)
    assert set(ops) == {
        "uniform (plain PyTorch)", "mmpareto (plain PyTorch)", "authors (plain PyTorch)",
        "lightning uniform", "lightning mmpareto", "lightning authors",
    }  # fmt: skip
    # Both MMPareto procedures run more than the one backward of the uniform step; through the Trainer
    # a step dispatches at least what the plain step of the same method does (the automatic loop only
    # adds its bookkeeping).
    assert ops["mmpareto (plain PyTorch)"] > ops["uniform (plain PyTorch)"]
    assert ops["authors (plain PyTorch)"] > ops["uniform (plain PyTorch)"]
    assert ops["lightning mmpareto"] > ops["lightning uniform"] >= ops["uniform (plain PyTorch)"]
    difference = _rows(report, "| operator |")
    # A second backward through the encoders: the convolutions' backward runs twice as often.
    assert difference
    conv = difference.get("`aten::convolution_backward`")
    assert conv is not None and int(conv[1]) == 2 * int(conv[0]) > 0


def test_operator_counts_are_exact_and_deterministic(bench: ModuleType) -> None:
    opcount = bench.opcount
    counts = opcount.count_ops(lambda: torch.ones(3).add_(1).sum())
    assert counts == Counter({"aten::ones": 1, "aten::add_": 1, "aten::sum": 1})

    spec = bench.models.ModelSpec("resnet18-tiny")
    base, batch = bench.models.build_network_and_batch(spec, 2, 2, torch.device("cpu"), 0)
    first = opcount.count_plain_ops(base, batch)
    assert opcount.count_plain_ops(base, batch) == first
    through = opcount.count_lightning_ops(base, batch, torch.device("cpu"), ["uniform", "mmpareto"])
    again = opcount.count_lightning_ops(base, batch, torch.device("cpu"), ["uniform", "mmpareto"])
    assert through == again and set(through) == {"lightning uniform", "lightning mmpareto"}
    # The uniform step: one forward and one backward per convolution (20 per encoder), whatever the
    # harness.
    for counted in (first["uniform"], through["lightning uniform"]):
        assert counted["aten::convolution"] == 40 and counted["aten::convolution_backward"] == 40
    # The counting mode is gone from the stack after the fit.
    assert opcount.count_ops(lambda: None) == Counter()


def test_bert_regime_with_tiny_encoders(bench: ModuleType) -> None:
    pytest.importorskip("transformers")
    report = bench.main(
        [*TINY_BERT, "--threads", "1", "--lightning-variants", "uniform", "mmpareto", "authors",
         "--no-op-counts", "--no-memory", "--breakdown"]
    )  # fmt: skip
    assert "model: bert x 2 encoders (text1, text2: BERT 1 layers, hidden 16, vocabulary 50" in report
    # BERT's dropout is on (BertConfig's 0.1): the check reseeds before every forward.
    assert "correctness pre-check PASSED" in report
    assert "target: mmpareto <= 1.8x uniform" in report
    assert set(_rows(report, "| method | median ms")) == {"uniform", "mmpareto", "authors"}
    lightning = _rows(report, "| method (through Lightning Trainer)")
    assert set(lightning) == {"lightning uniform", "lightning mmpareto", "lightning authors"}
    _assert_phase_table(bench, report)


def test_bert_default_is_bert_base(bench: ModuleType) -> None:
    transformers = pytest.importorskip("transformers")
    assert bench.models.bert_config().to_dict() == transformers.BertConfig().to_dict()
    tiny = bench.models.bert_config(layers=1, hidden=128, vocab=50, seq_len=600)
    assert (tiny.num_hidden_layers, tiny.num_attention_heads, tiny.intermediate_size) == (1, 2, 512)
    assert tiny.max_position_embeddings == 600
    spec = bench.models.ModelSpec("bert", bert_layers=1, bert_hidden=16, bert_vocab=50, seq_len=8)
    batch = bench.models.make_batch(spec, spec.names(2), 3, torch.device("cpu"), 0)
    assert batch["text1"].shape == (3, 2, 8) and batch["text1"].dtype == torch.int64
    assert bool((batch["text1"][:, 1] == 1).all()) and int(batch["text1"][:, 0].max()) < 50
    assert bench.models.default_batch_size("bert") == 8


def test_host_bound_encoder_is_resnet18_narrowed(bench: ModuleType) -> None:
    from torchvision.models import resnet18

    narrow = bench.models.NarrowResNet18(3)
    reference = resnet18(num_classes=32)
    ours = dict(narrow.named_parameters())
    theirs = dict(reference.named_parameters())
    assert list(ours) == list(theirs) and len(ours) == 62  # the same tensors, in the same order
    for name, p in ours.items():
        q = theirs[name]
        assert p.dim() == q.dim()
        # Every width divided by 16: output channels always, input channels except the stem's image.
        assert p.shape[0] == (32 if name.startswith("fc") else q.shape[0] // 16)
        if p.dim() == 4 and name != "conv1.weight":
            assert p.shape[1] == q.shape[1] // 16
    assert narrow(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert bench.models.default_batch_size("resnet18-tiny") == 2


def test_rounds_schedule_and_round_ratios(bench: ModuleType) -> None:
    timing = bench.timing
    # Two rounds of three steps: the ratio of each round compares the rounds' medians.
    base = timing.Timing("uniform", [10.0, 11.0, 50.0, 20.0, 21.0, 90.0], round_size=3)
    ours = timing.Timing("mmpareto", [15.0, 99.0, 16.5, 30.0, 31.5, 33.0], round_size=3)
    median, q1, q3 = timing.paired_ratios(ours, base)
    assert (median, q1, q3) == (1.5, 1.5, 1.5)  # 16.5 / 11 and 31.5 / 21: exactly 1.5 each
    with pytest.raises(ValueError, match="same rounds"):
        timing.paired_ratios(ours, timing.Timing("uniform", base.times_ms))

    lp = bench.lightning_path
    spec = bench.models.ModelSpec("small-cnn", image_size=8, width=4)
    base_net, batch = bench.models.build_network_and_batch(spec, 2, 4, torch.device("cpu"), 0)
    timings = lp.time_lightning(
        base_net, batch, torch.device("cpu"), iters=3, warmup=1, variants=["uniform", "mmpareto"],
        schedule="rounds", rounds=2,
    )  # fmt: skip
    assert list(timings) == ["lightning uniform", "lightning mmpareto"]
    for t in timings.values():
        assert t.round_size == 2 and len(t.times_ms) == 4 and all(v > 0 for v in t.times_ms)
    # Several CPU threads: one Trainer at a time in one thread (the OpenMP teams of per-Trainer threads
    # would compete); one thread, or CUDA: step by step.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lp.default_schedule(torch.device("cpu")) == "rounds"
        assert lp.default_schedule(torch.device("cuda")) == "steps"
        torch.set_num_threads(1)
        assert lp.default_schedule(torch.device("cpu")) == "steps"
    finally:
        torch.set_num_threads(threads)


def test_kernel_counts_from_a_trace(bench: ModuleType) -> None:
    kernels = bench.kernels
    events = [
        {"ph": "X", "cat": "kernel", "name": "void multi_tensor_apply_kernel<A>"},
        {"ph": "X", "cat": "kernel", "name": "void multi_tensor_apply_kernel<A>"},
        {"ph": "X", "cat": "kernel", "name": "ampere_sgemm"},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)"},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel"},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add_"},
        {"ph": "s", "cat": "ac2g", "name": "flow"},
    ]
    count = kernels.summarize_trace(events, own_syncs=1)
    assert (count.kernels, count.memcpys, count.memsets, count.syncs) == (3, 1, 1, 1)
    assert count.top[0] == ("void multi_tensor_apply_kernel<A>", 2)
    table = kernels.format_kernel_table({"uniform step": count, "mmpareto step": count})
    assert "| uniform step | 3 | 1 | 1 | 1 |" in table and "mmpareto step - uniform step: 0 kernels" in table
    # The profiler's own path (trace export and parsing) on a CPU: no device work to count.
    on_cpu = kernels.count_kernels(lambda: torch.ones(4).sum(), torch.device("cpu"))
    assert (on_cpu.kernels, on_cpu.memcpys, on_cpu.syncs) == (0, 0, 0)


def test_gpu_checks_commands_are_valid(bench: ModuleType) -> None:
    # The GPU script runs where no test can: every benchmark command in it must at least parse, and the
    # pytest command must name test files with a ``gpu`` mark.
    plan = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_checks.sh"), "OUT"],
        capture_output=True,
        text=True,
        env={**os.environ, "GPU_CHECKS_PLAN": "1"},
        check=True,
    )
    commands = [shlex.split(line) for line in plan.stdout.splitlines() if line.strip()]
    benches = [c for c in commands if "benchmarks/step_time.py" in c]
    assert len(benches) == 3
    models = []
    for command in benches:
        args = bench.cli.parse_args(command[command.index("benchmarks/step_time.py") + 1 :])
        assert args.device == "cuda" and args.markdown.startswith("OUT/")
        assert {"uniform", "mmpareto", "authors"} <= set(args.lightning_variants)
        assert args.encoders == [] and args.memory_batch_sizes is None and not args.no_memory
        models.append(args.model)
    assert models == ["resnet18", "bert", "wide-mlp"]
    tests = next(c for c in commands if "pytest" in c)
    files = [c for c in tests if c.startswith("tests/")]
    assert "tests/test_gpu.py" in files
    root = BENCHMARKS.parent
    assert all("mark.gpu" in (root / f).read_text(encoding="utf-8") for f in files)


def test_rule_alone_script_runs_on_cpu(tmp_path: Path) -> None:
    # The README's rule-alone figures come from this script (on CUDA); on CPU it runs and reports.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "rule_alone.py"
    result = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--models", "resnet18", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = r"resnet18: 2 encoders x 60 tensors, 11176512 entries each; one call: median \d"
    assert re.search(expected, result.stdout)
