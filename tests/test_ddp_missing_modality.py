"""DDP with a modality missing on a rank: exact against a single-process replay of the ranks, the same
metrics on every rank, and a clear refusal where DDP itself cannot run it.

The fits run as scripts (``_ddp_missing_modality.py``) in their own process group, killed if they outlive
the timeout: before the fix, the fit hung in the epoch-end metric sync or aborted inside gloo.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _bounds import U32, assert_within, gamma, mean_bound
from _data_parallel import check_recorded_fit
from _ddp_missing_modality import (
    BATCHES,
    EPOCHS,
    LR,
    MOMENTUM,
    initial_model,
    rank_losses,
)

from mmpareto_lightning.distributed import HostExchange
from mmpareto_lightning.lightning.metrics import MMParetoMetrics
from mmpareto_lightning.rule import RuleStats

HERE = Path(__file__).parent
WORLD = 2
TIMEOUT_S = 150
_LAUNCHER_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "GROUP_RANK",
)  # fmt: skip


def _run(strategy: str, directory: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    # Lightning's launchers leave their variables in os.environ after an in-process DDP fit earlier in
    # the session (ddp_spawn: MASTER_PORT, possibly still taken: EADDRINUSE; a one-device DDP: also
    # LOCAL_RANK, with which this launcher believes it is a child and never starts rank 1: a hang).
    for name in _LAUNCHER_VARIABLES:
        env.pop(name, None)
    with subprocess.Popen(
        [sys.executable, str(HERE / "_ddp_missing_modality.py"), strategy, str(directory), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # the launcher's other rank joins this group: one kill ends both
    ) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the DDP fit hung for {TIMEOUT_S} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _epoch_loss_means(replayed, recorded) -> list[dict[str, tuple[float, float]]]:
    """Per epoch: ``loss_<name>`` and ``loss`` -> (expected epoch mean, bound), from the float32 losses each
    rank computed on each micro-batch (the replay's, which are the ranks' numbers: the same operations
    from the same state). A step's ``loss`` is the float32 sum of its losses (``gamma(L - 1)`` of their
    magnitudes); :func:`_bounds.mean_bound` covers the ranks' float32 running sums and the epoch mean."""
    per_epoch: list[dict[str, tuple[list[float], list[float]]]] = [{} for _ in range(EPOCHS)]
    for step, ranks in zip(replayed, zip(*recorded, strict=True), strict=True):
        for seen, record in zip(step.losses, ranks, strict=True):
            for values, entry in zip(seen, record["window"], strict=True):
                epoch = per_epoch[entry["epoch"]]
                for name, value in values.items():
                    epoch.setdefault(f"loss_{name}", ([], []))[0].append(value)
                    epoch[f"loss_{name}"][1].append(0.0)
                total = epoch.setdefault("loss", ([], []))
                total[0].append(math.fsum(values.values()))
                total[1].append(gamma(len(values) - 1) * sum(abs(v) for v in values.values()))
    return [{k: mean_bound(v, b) for k, (v, b) in epoch.items()} for epoch in per_epoch]


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_modality_missing_on_a_rank_is_exact_and_every_rank_logs_the_same(
    tmp_path, accumulate: int
) -> None:
    run = _run("ddp_find_unused_parameters_true", tmp_path, str(accumulate))
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    windows = -(-BATCHES // accumulate)  # the last window of an epoch may be shorter
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == EPOCHS * windows

    # Every step against the rule on the ranks' mean gradients (zeros where a rank lacks a loss, an
    # encoder no rank called left without a gradient), replayed from the recorded state with the bounds
    # of _data_parallel; the conflict counts must grow by the replay's decisions, which the allowed
    # round-off cannot flip (checked per step). The visual encoder is not counted on the steps no rank
    # had it.
    replayed = check_recorded_fit(
        str(tmp_path),
        initial_model,
        lambda rank, entry: lambda m: rank_losses(m, entry["batch"], rank, entry["batch_idx"]),
        momentum=MOMENTUM,
        lr=LR,
        accumulate=accumulate,
    )
    assert len(replayed) == EPOCHS * windows
    decisions = [d for step in replayed for d in step.conflict.values()]
    assert all(robust for _, robust in decisions)
    for enc in ("audio", "visual"):  # the rule did more than sum on both encoders
        assert any(step.conflict.get(enc, (False,))[0] for step in replayed), enc
    assert any("visual" not in step.conflict for step in replayed)  # a step without the modality

    # The counters logged on every step and the epoch metrics are the same on both ranks, although rank 1
    # never saw the visual and align losses; and those keys are logged there too.
    assert ranks[0]["totals"] == ranks[1]["totals"]
    assert ranks[0]["epochs"] == ranks[1]["epochs"]
    assert len(ranks[0]["epochs"]) == EPOCHS
    recorded = [torch.load(tmp_path / f"steps{r}.pt", weights_only=False) for r in range(WORLD)]
    for epoch, logged in zip(_epoch_loss_means(replayed, recorded), ranks[0]["epochs"], strict=True):
        assert {f"mmpareto/{key}_epoch" for key in epoch} <= set(logged)
        for key, (value, bound) in epoch.items():
            assert_within(logged[f"mmpareto/{key}_epoch"], value, bound, key)
        assert "mmpareto/visual/cos_beta_epoch" in logged and "mmpareto/audio/alpha_align_epoch" in logged


@pytest.mark.slow
def test_plain_ddp_with_a_modality_missing_on_a_rank_is_refused_on_every_rank(tmp_path) -> None:
    run = _run("ddp", tmp_path)
    assert run.returncode != 0
    message = "An encoder was not called in this step (a missing modality): ['visual'] on rank 1"
    # Both ranks raise it (each prints its traceback): none is left waiting in DDP's all-reduce.
    assert run.stderr.count(message) >= WORLD, run.stderr[-4000:]
    assert "ddp_find_unused_parameters_true" in run.stderr
    assert "preamble" not in run.stderr and "Connection closed" not in run.stderr
    assert not list(tmp_path.glob("rank*.pt"))


# ---------------------------------------------------------------- the pieces, without a fit
class _ThreadGather:
    """``gather`` functions for ranks simulated by threads (what HostExchange.gather does across
    processes)."""

    def __init__(self, world: int) -> None:
        self.values: list[object] = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank: int):
        def gather(value):
            self.values[rank] = value
            self.barrier.wait()
            out = list(self.values)
            self.barrier.wait()
            return out

        return gather


def _losses(**values: float) -> dict[str, torch.Tensor]:
    return MMParetoMetrics.loss_values({k: torch.tensor(v) for k, v in values.items()})


def test_epoch_loss_means_are_taken_over_every_ranks_steps_and_are_the_same_on_every_rank() -> None:
    ranks = [MMParetoMetrics(["audio", "visual"]) for _ in range(WORLD)]
    ranks[0].update_losses(_losses(multimodal=1.0, audio=2.0, visual=4.0))
    ranks[0].update_losses(_losses(multimodal=3.0, audio=float("nan")))  # the visual loss is absent here
    ranks[1].update_losses(_losses(multimodal=5.0, audio=6.0))  # rank 1 never sees it
    gather = _ThreadGather(WORLD)
    results: list[dict] = [{}] * WORLD

    def epoch_end(rank: int) -> None:
        metrics = ranks[rank].epoch_metrics(gather.for_rank(rank))
        results[rank] = {k: float(m.compute()) for k, m in metrics.items() if k.startswith("mmpareto/loss")}

    threads = [threading.Thread(target=epoch_end, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0] == results[1]
    # Small integers: every sum, count, quotient and product on the way (float32 and float64) is exact.
    assert results[0]["mmpareto/loss_multimodal_epoch"] == 3.0  # (1 + 3 + 5) / 3
    assert results[0]["mmpareto/loss_audio_epoch"] == 4.0  # the NaN step is left out
    assert results[0]["mmpareto/loss_visual_epoch"] == 4.0  # rank 0's one step
    # The sum of each step's losses, over the three steps where it is finite: 7 and 11 (NaN left out).
    assert results[0]["mmpareto/loss_epoch"] == 9.0


def test_an_objective_met_on_some_steps_of_an_epoch_keeps_its_epoch_weight() -> None:
    metrics = MMParetoMetrics(["audio"])

    def stats(alphas: list[float]) -> RuleStats:
        true = torch.tensor(True)
        one = torch.tensor(1.0, dtype=torch.float64)
        return RuleStats(one, torch.tensor(alphas, dtype=torch.float64), true, ~true, one, true, true)

    metrics.set_objectives("audio", ["multimodal", "audio", "align"])
    metrics.update({"audio": stats([0.2, 0.3, 0.5])})
    metrics.set_objectives("audio", ["multimodal", "audio"])
    metrics.update({"audio": stats([0.4, 0.6])})
    epoch = {k: m for k, m in metrics.epoch_metrics().items() if m.update_called}
    # 0.5 is a float32 number: one step's value, divided and multiplied by a weight of 1, is exact.
    assert float(epoch["mmpareto/audio/alpha_align_epoch"].compute()) == 0.5
    # The mean of 0.2 and 0.4, each rounded to float32 on the way in (u of itself), then a float32 mean.
    mean, bound = mean_bound([0.2, 0.4], [U32 * 0.2, U32 * 0.4])
    assert_within(float(epoch["mmpareto/audio/alpha_multimodal_epoch"].compute()), mean, bound, "alpha")


def _exchange_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    try:
        # As under NCCL: the exchange makes its own gloo group for host values.
        real = torch.distributed.get_backend
        torch.distributed.get_backend = lambda *args, **kwargs: "nccl"
        try:
            exchange = HostExchange()
        finally:
            torch.distributed.get_backend = real
        result = {
            "own_group": exchange.group is not None,
            "same": exchange.differing(("audio", ("multimodal", "audio"))),
            "different": exchange.differing(("audio", ("multimodal", "audio", "align")[: 2 + (rank == 0)])),
            "gather": exchange.gather({"rank": rank}),
        }
        exchange.close()
        torch.save(result, os.path.join(out_dir, f"exchange{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_host_exchange_on_its_own_gloo_group(tmp_path) -> None:
    torch.multiprocessing.spawn(
        _exchange_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True
    )
    results = [torch.load(tmp_path / f"exchange{r}.pt") for r in range(WORLD)]
    for result in results:
        assert result["own_group"]
        assert result["same"] is None  # equal values: only the fingerprints travelled
        assert result["different"] == [
            ("audio", ("multimodal", "audio", "align")),
            ("audio", ("multimodal", "audio")),
        ]
        assert result["gather"] == [{"rank": 0}, {"rank": 1}]
