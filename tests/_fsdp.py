"""Multi-process helpers for the FSDP2 tests: ranks forked from a fork server, a sharded model.

The ranks are forked from a server process that imported torch and Lightning once (``forkserver``): a
2-rank test then takes a second or two, where spawned processes would each spend seconds importing. They
are not forked from the test process itself, whose state (a process group an earlier fit left behind,
threads, CUDA) a fork would inherit. The ranks find each other through the ``torch.distributed``
environment variables, which Lightning's default cluster environment reads as an external launcher (so
``ModelParallelStrategy`` starts no processes of its own).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _models import DIMS, Encoder, MultiModalNet, make_data
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from mmpareto_lightning import MMParetoCallback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, directory: str, target: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    code = 0
    try:
        torch.set_num_threads(1)
        target(rank, world, *args)
    except BaseException as err:  # reported to the parent through a file
        Path(directory, f"error{rank}.txt").write_text(
            f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
        )
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(code)


_PRELOAD = ["torch", "torch.distributed.fsdp", "lightning.pytorch", "mmpareto_lightning", "_models"]


def _context(start_method: str) -> Any:
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts (once per test session)
    return ctx


def run_ranks(
    target: Callable[..., Any],
    directory: Path,
    *args: Any,
    world: int = 2,
    timeout: float = 120.0,
    start_method: str = "forkserver",
) -> list[str | None]:
    """Run ``target(rank, world, *args)`` (a module-level function: it is pickled) in ``world`` processes;
    return each rank's error (the exception's type and message followed by its traceback) or ``None``.
    Fails the test on a hang; ranks still running 15 s after another failed are stopped (they wait for
    it in a collective)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    ctx = _context(start_method)
    procs = [
        ctx.Process(target=_child, args=(r, world, port, str(directory), target, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 15:
            break  # a rank failed and the others still wait for it in a collective
        time.sleep(0.05)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world):
        path = directory / f"error{r}.txt"
        errors.append(path.read_text() if path.exists() else None)
    if hung and failed_at is None:
        raise AssertionError(
            f"ranks {hung} still ran after {timeout} s (a collective hung?); errors: {errors}"
        )
    for r in hung:  # left waiting for a rank that failed, whose error tells why
        errors[r] = errors[r] or f"Hung: waited in a collective for the rank(s) that failed.\n{errors}"
    return errors


def assert_ok(errors: list[str | None]) -> None:
    """No rank failed (else the first lines of every rank's error, then the first full one)."""
    failed = [e for e in errors if e is not None]
    summary = "; ".join(f"rank {r}: {e.splitlines()[0]}" for r, e in enumerate(errors) if e is not None)
    assert not failed, f"{summary}\n\n{failed[0]}"


class InterleavedData(pl.LightningDataModule):
    """Rank r of w gets samples r, r + w, ... in order, so w ranks with batch B see, per step, the same wB
    consecutive samples as one process with batch wB."""

    def __init__(self, batch_size: int, size: int = 96) -> None:
        super().__init__()
        self.batch_size, self.size = batch_size, size

    def train_dataloader(self) -> DataLoader:
        data = make_data(2, size=self.size)
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class ShardedNet(MultiModalNet):
    """``MultiModalNet`` (no BatchNorm, no dropout) sharded in ``configure_model`` under
    ``ModelParallelStrategy``: each encoder's first layer as a nested FSDP group, each encoder, each
    head. In one process (no device mesh) it stays unsharded: the reference.

    Args:
        missing_rank: this rank's visual modality is missing in every batch (in one process: the half of
            the batch that rank would get). The visual encoder and head then run on an empty batch, the
            visual loss is 0, and the fusion head gets zeros for the visual features, so the multimodal
            loss does not reach the visual encoder on that rank.
        frozen: names of submodules frozen in ``configure_model`` (e.g. ``"encoders.audio.net.0"``).
        unsharded: names of submodules ``configure_model`` leaves unsharded (a mistake, refused).
        shard_root: also ``fully_shard`` the LightningModule itself (refused).
        inf_at: ``(rank, batch_idx)``: that rank's visual loss is infinite on that batch (in one process:
            on that batch).
        lazy: create the encoders in ``configure_model`` (as Lightning suggests for large models), not in
            ``__init__``.
        **kwargs: ``MultiModalNet``'s (``extra_loss``, ``lr``, ``momentum``).
    """

    def __init__(
        self,
        missing_rank: int | None = None,
        frozen: tuple[str, ...] = (),
        unsharded: tuple[str, ...] = (),
        shard_root: bool = False,
        inf_at: tuple[int, int] | None = None,
        lazy: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("lr", 0.2)
        kwargs.setdefault("momentum", 0.9)
        super().__init__(n=2, dropout=0.0, batchnorm=False, **kwargs)
        self.missing_rank = missing_rank
        self.frozen, self.unsharded, self.shard_root = frozen, unsharded, shard_root
        self.inf_at = inf_at
        self.lazy = lazy
        if lazy:
            del self.encoders

    def _create_encoders(self) -> None:
        torch.manual_seed(1)
        self.encoders = nn.ModuleDict(
            {k: Encoder(d, dropout=0.0, batchnorm=False) for k, d in zip(self.names, DIMS, strict=False)}
        )

    def configure_model(self) -> None:
        if self.lazy and "encoders" not in self._modules:
            self._create_encoders()
        for name in self.frozen:
            self.get_submodule(name).requires_grad_(False)
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        modules = []
        for name in self.names:
            modules += [f"encoders.{name}.net.0", f"encoders.{name}", f"uni_heads.{name}"]
        for name in [*modules, "head"]:
            if name not in self.unsharded:
                fully_shard(self.get_submodule(name), mesh=mesh)
        if self.shard_root:
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        if self.missing_rank is None:
            losses = self.losses(batch)
        elif self.device_mesh is None:  # one process: both ranks' halves, averaged as FSDP averages
            halves = [tuple(t[r::2] for t in batch) for r in range(2)]
            per_rank = [self.losses_missing(h, r == self.missing_rank) for r, h in enumerate(halves)]
            losses = {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in per_rank[0]}
        else:
            losses = self.losses_missing(batch, self.global_rank == self.missing_rank)
        inf_rank, inf_batch = self.inf_at or (None, None)
        if batch_idx == inf_batch and (self.device_mesh is None or self.global_rank == inf_rank):
            losses["visual"] = losses["visual"] * float("inf")
        return losses

    def losses_missing(self, batch, missing: bool) -> dict[str, torch.Tensor]:
        xa, xv, y = batch
        za = self.encoders["audio"](xa)
        # Every rank calls every sharded module (FSDP gathers and reduce-scatters collectively).
        xv, yv = (xv[:0], y[:0]) if missing else (xv, y)
        zv = self.encoders["visual"](xv)
        fused = torch.zeros_like(za) if missing else zv
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, fused], 1)), y),
            "audio": F.cross_entropy(self.uni_heads["audio"](za), y),
            # 0 on an empty batch, with a graph through the visual head and encoder.
            "visual": F.cross_entropy(self.uni_heads["visual"](zv), yv, reduction="sum") / max(len(yv), 1),
        }


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call it)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class SaveState(pl.Callback):
    """At the end of the fit, each rank saves the whole parameters, momentum buffers (by parameter name)
    and MMPareto's counters to ``directory/rank<r>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, MMParetoCallback))
        names = {id(p): n for n, p in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        momentum = {
            names[id(p)]: full(optimizer.state[p]["momentum_buffer"])
            for group in optimizer.param_groups
            for p in group["params"]
            if "momentum_buffer" in optimizer.state.get(p, {})
        }
        state = {
            "params": {n: full(p) for n, p in pl_module.named_parameters()},
            "momentum": momentum,
            "totals": callback.totals,
            "skipped": callback.skipped_steps,
            "steps": trainer.global_step,
            # The rule's metrics and the epoch's loss means (global: every rank's steps), not the
            # rank-local step losses.
            "metrics": {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("mmpareto/") and (not k.startswith("mmpareto/loss") or k.endswith("_epoch"))
            },
        }
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))
