"""CUDA-only checks (16-bit AMP with a real GradScaler). Skipped where no GPU is present (CI)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _models import MultiModalNet, make_loader, trainer_kwargs
from test_distributed_precision import InfOnce, ParameterSnapshots, ScaledRecordingNet
from test_end_to_end import _assert_moved_by, _expected_deltas

from mmpareto_lightning import MMParetoCallback, MMParetoEngine, RuleConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_16_mixed_on_cuda_matches_direct_gradients() -> None:
    torch.manual_seed(3)
    model = ScaledRecordingNet(n=2, lr=1.0)
    trainer = pl.Trainer(
        max_steps=1,
        precision="16-mixed",
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(accelerator="cuda"),
    )
    before = copy.deepcopy(model).cuda()
    trainer.fit(model, make_loader(2))
    model.cpu(), before.cpu()
    model.recorded = {k: [g.cpu() for g in v] for k, v in model.recorded.items()}
    _assert_moved_by(model, before, _expected_deltas(model, "mmpareto", "per_tensor"))


def test_16_mixed_on_cuda_skips_an_infinite_step() -> None:
    record = ParameterSnapshots()
    trainer = pl.Trainer(
        max_steps=3,
        precision="16-mixed",
        callbacks=[MMParetoCallback(), record],
        **trainer_kwargs(accelerator="cuda"),
    )
    trainer.fit(InfOnce(n=2), make_loader(2, size=48))
    snapshots = record.snapshots
    for name, value in snapshots[0].items():
        assert torch.equal(snapshots[1][name], value), name
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16


@pytest.mark.parametrize(("n", "extra_loss"), [(2, False), (3, True)])  # (3, True): the simplex solver
def test_engine_step_on_cuda_never_waits_for_the_device(n: int, extra_loss: bool) -> None:
    # CUDA's sync debug mode raises on any operation that makes the host wait for the GPU.
    model = MultiModalNet(n=n, extra_loss=extra_loss).cuda()
    engine = MMParetoEngine(model.mmpareto_encoders(), RuleConfig())
    batches = [tuple(t.cuda() for t in b) for b in make_loader(n, size=48)]
    for i, batch in enumerate(batches):
        # The first step allocates the buffers and checks the graph once; the steady state must not wait.
        torch.cuda.set_sync_debug_mode("error" if i > 0 else "default")
        try:
            with engine.capture():
                losses = model.losses(batch)
            engine.backward(losses)
            stats = engine.integrate()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert set(stats) == set(model.names)
    assert all(s.cos_beta.is_cuda for s in stats.values())


def test_benchmark_script_runs_on_cuda(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    out = subprocess.run(
        [
            sys.executable, str(script), "--device", "cuda", "--model", "small-cnn", "--iters", "3",
            "--warmup", "1", "--batch-size", "8", "--encoders", "2", "--scaling-iters", "2",
            "--lightning-rounds", "1", "--breakdown", "--memory-batch-sizes", "4",
            "--markdown", str(tmp_path / "cuda.md"),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "cuda.md").read_text(encoding="utf-8")
    assert "correctness pre-check PASSED" in report
    assert "torch.cuda.max_memory_allocated" in report
    assert "## Where the time goes" in report and "## Peak memory by batch size" in report
