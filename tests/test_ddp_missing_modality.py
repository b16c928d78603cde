"""DDP with a modality missing on a rank: exact against a single-process replay of the ranks, the same
metrics on every rank, and a clear refusal where DDP itself cannot run it.

The fits run as scripts (``_ddp_missing_modality.py``) in their own process group, killed if they outlive
the timeout: before the fix, the fit hung in the epoch-end metric sync or aborted inside gloo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_missing_modality import (
    BATCH,
    BATCHES,
    EPOCHS,
    LR,
    MOMENTUM,
    initial_model,
    rank_data,
    rank_losses,
)
from _reference import kkt_alpha_is_optimal, reference_rule

from mmpareto_lightning import min_norm_simplex
from mmpareto_lightning.distributed import HostExchange
from mmpareto_lightning.lightning.metrics import MMParetoMetrics
from mmpareto_lightning.rule import RuleStats

HERE = Path(__file__).parent
WORLD = 2
TIMEOUT_S = 150


def _run(strategy: str, directory: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
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


def _replay(
    accumulate: int = 1,
) -> tuple[dict[str, np.ndarray], list[dict[str, list[int]]], list[dict[str, float]], float]:
    """What DDP should do, in one process and float64: each step, every rank's per-loss gradients
    (plain autograd on that rank's batches and loss code, summed over the accumulation window of
    ``accumulate`` batches, each loss divided by ``accumulate``; the last window of an epoch may be
    shorter), averaged over the ranks with zeros where a rank lacks the loss; the rule on each encoder
    that some rank called; SGD with momentum (a parameter no rank reached has no gradient and is skipped,
    as DDP and SGD leave it).

    Returns the final parameters, the cumulative (conflicts, stationary) counts after every batch, the
    epoch means of the losses, and the smallest relative margin of a conflict decision (how far every
    pairwise cosine is from 0, so that float32 round-off cannot flip one).
    """
    model = initial_model().double()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    index = {id(p): i for i, p in enumerate(params)}
    buffers: dict[int, torch.Tensor] = {}
    data = [[t.double() if t.is_floating_point() else t for t in rank_data(r).tensors] for r in range(WORLD)]
    totals = {enc: [0, 0] for enc in model.names}
    totals_per_step, epoch_losses, margin = [], [], np.inf
    for _ in range(EPOCHS):
        seen: dict[str, list[float]] = {}
        per_rank: list[dict[str, list[torch.Tensor | None]]] = [{} for _ in range(WORLD)]
        for b in range(BATCHES):
            for r in range(WORLD):
                batch = tuple(t[b * BATCH : (b + 1) * BATCH] for t in data[r])
                losses = rank_losses(model, batch, r, b)
                for name, loss in losses.items():
                    seen.setdefault(f"loss_{name}", []).append(loss.item())
                    grads = torch.autograd.grad(
                        loss / accumulate, params, retain_graph=True, allow_unused=True
                    )
                    window = per_rank[r].setdefault(name, [None] * len(params))
                    for i, g in enumerate(grads):
                        if g is not None:
                            window[i] = g if window[i] is None else window[i] + g
                seen.setdefault("loss", []).append(sum(losses.values()).item())
            if (b + 1) % accumulate and b + 1 < BATCHES:  # the window stays open
                totals_per_step.append({k: list(v) for k, v in totals.items()})
                continue
            names = list(dict.fromkeys(n for grads in per_rank for n in grads))
            avg: dict[str, list[torch.Tensor | None]] = {}
            for n in names:
                avg[n] = []
                for i in range(len(params)):
                    parts = [g[n][i] for g in per_rank if n in g and g[n][i] is not None]
                    avg[n].append(sum(parts) / WORLD if parts else None)
            grad: list[torch.Tensor | None] = [None] * len(params)
            encoder_ids = set()
            for enc, encoder in model.mmpareto_encoders().items():
                ids = [index[id(p)] for p in encoder.parameters()]
                encoder_ids |= set(ids)
                reaching = [n for n in names if any(avg[n][i] is not None for i in ids)]
                if not reaching:
                    continue  # no rank called it: no gradient
                objectives = ["multimodal", enc, *[n for n in reaching if n not in ("multimodal", enc)]]
                per_objective = [
                    [avg[o][i] if avg[o][i] is not None else torch.zeros_like(params[i]) for i in ids]
                    for o in objectives
                ]
                alpha = None
                flat = [torch.cat([t.reshape(-1) for t in lst]) for lst in per_objective]
                gram = torch.stack([torch.stack([a @ c for c in flat]) for a in flat])
                if len(objectives) > 2:
                    alpha = min_norm_simplex(gram).numpy()
                    assert kkt_alpha_is_optimal(gram.numpy(), alpha)
                norms = gram.diagonal().sqrt()
                cosines = gram / torch.outer(norms, norms)
                margin = min(margin, float(cosines.abs().min()))
                h, info = reference_rule(per_objective, alpha_k=alpha)
                totals[enc][0] += int(info["conflict"])
                for i, hi in zip(ids, h, strict=True):
                    grad[i] = torch.from_numpy(hi).reshape(params[i].shape)
            for i in range(len(params)):
                if i not in encoder_ids:
                    parts = [avg[n][i] for n in names if avg[n][i] is not None]
                    grad[i] = sum(parts) if parts else None
            with torch.no_grad():
                for i, p in enumerate(params):
                    if grad[i] is None:
                        continue
                    buf = buffers.get(i)
                    buffers[i] = grad[i].clone() if buf is None else buf.mul_(MOMENTUM).add_(grad[i])
                    p.sub_(LR * buffers[i])
            totals_per_step.append({k: list(v) for k, v in totals.items()})
            per_rank = [{} for _ in range(WORLD)]
        epoch_losses.append({k: float(np.mean(v)) for k, v in seen.items()})
    return {n: p.detach().numpy() for n, p in named}, totals_per_step, epoch_losses, margin


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

    params, totals, epoch_losses, margin = _replay(accumulate)
    # The counters logged on every step and the epoch metrics are the same on both ranks, although rank 1
    # never saw the visual and align losses; and those keys are logged there too.
    assert ranks[0]["totals"] == ranks[1]["totals"]
    assert ranks[0]["epochs"] == ranks[1]["epochs"]
    assert len(ranks[0]["epochs"]) == EPOCHS
    for epoch, logged in zip(epoch_losses, ranks[0]["epochs"], strict=True):
        for key, value in epoch.items():
            # A mean of float32 losses (each within ~1e-6 relative of the float64 one).
            assert logged[f"mmpareto/{key}_epoch"] == pytest.approx(value, rel=1e-5), key
        assert "mmpareto/visual/cos_beta_epoch" in logged and "mmpareto/audio/alpha_align_epoch" in logged

    # Conflict decisions are discrete: the replay's cosines are all far from 0 (float32 cannot flip them),
    # so the counts must be the replay's exactly. The visual encoder is not counted on the steps no rank
    # had it.
    assert margin > 1e-3
    got = [
        {enc: [v["conflicts"], v["stationary"]] for enc, v in step["totals"].items()}
        for step in ranks[0]["totals"]
    ]
    assert got == totals
    assert totals[-1]["audio"][0] > 0 and totals[-1]["visual"][0] > 0  # the rule did more than sum

    # Parameters: float32 (DDP) against float64 (replay). Each step's update is float32 round-off away
    # from the replay's: some 40 operations deep (forward, backward, the all-reduce, the rule, momentum),
    # each rounding within eps32 / 2 = 6e-8, so ~2.4e-6 of a step; momentum and the gradients at the
    # slightly different parameters carry a step's error into the later ones, which over 6 steps stays
    # below ~6x that. So 2e-5 of the total movement bounds round-off (measured: 3.4e-7), while a wrong
    # average, a missing or extra objective or a zero gradient where none belongs moves a parameter by a
    # whole step (tens of percent of the movement).
    initial = dict(initial_model().named_parameters())
    for name, want in params.items():
        got_r0 = ranks[0]["params"][name]
        assert torch.equal(got_r0, ranks[1]["params"][name]), f"{name} differs between ranks"
        moved = float(np.abs(want - initial[name].detach().double().numpy()).max())
        assert moved > 0, name
        np.testing.assert_allclose(got_r0.double().numpy(), want, rtol=0, atol=2e-5 * moved, err_msg=name)


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
    assert results[0]["mmpareto/loss_multimodal_epoch"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3
    assert results[0]["mmpareto/loss_audio_epoch"] == pytest.approx(4.0)  # the NaN step is left out
    assert results[0]["mmpareto/loss_visual_epoch"] == pytest.approx(4.0)  # rank 0's one step
    # The sum of each step's losses, over the three steps where it is finite: 7 and 11 (NaN left out).
    assert results[0]["mmpareto/loss_epoch"] == pytest.approx(9.0)


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
    assert float(epoch["mmpareto/audio/alpha_align_epoch"].compute()) == pytest.approx(0.5)
    assert float(epoch["mmpareto/audio/alpha_multimodal_epoch"].compute()) == pytest.approx(0.3)


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
