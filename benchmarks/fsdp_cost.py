"""What MMPareto costs under FSDP2 against DDP, on the same model: communication per step and step time.

Two CPU ranks (gloo, forked from this process, one thread each) train the same two-encoder MLP through
Lightning for ``--steps`` steps in four configurations: DDP and ``ModelParallelStrategy`` (FSDP2: each
encoder's hidden layers as nested groups, each encoder and each head sharded), each with the plain
summed-loss step (``MMParetoCallback(strategy="uniform", diagnostics=False)``) and with MMPareto.

Communication is counted on rank 0 by wrapping ``torch.distributed``'s collectives (FSDP2 calls them from
Python) and, for DDP's gradient buckets, a communication hook: per step, the payload of each kind of
collective (all-reduce: the tensor; reduce-scatter: its input; all-gather: its output) and the bytes each
rank sends under ring algorithms (all-reduce 2(W-1)/W of the payload, reduce-scatter and all-gather
(W-1)/W). Step time: the median over the steps after ``--warmup``, from the start of a training batch to
its end (forward, every backward, the rule, the optimizer step) on rank 0.

Run: ``python benchmarks/fsdp_cost.py --markdown fsdp_cost.md`` (about a minute on 2 cores). On a shared
machine the times are only indicative; the byte counts are exact.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mmpareto_lightning import MMParetoCallback, MMParetoModule

WORLD = 2
_LOG: list[tuple[str, int]] = []  # (kind, payload bytes) of this process's collectives
_ORIGINAL: dict[str, Any] = {}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _count_collectives() -> None:
    """Wrap the collectives FSDP2, the engine and Lightning call from Python (this process only)."""

    def wrap(name: str, kind: str, payload) -> None:
        original = getattr(dist, name, None)
        if original is None:  # older torch
            return
        _ORIGINAL[name] = original

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            _LOG.append((kind, payload(*args, **kwargs)))
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def output(*args: Any, **kwargs: Any) -> int:
        return _nbytes(kwargs.get("output_tensor", args[0] if args else None))

    def scattered(*args: Any, **kwargs: Any) -> int:
        return _nbytes(kwargs.get("input", args[1] if len(args) > 1 else None))

    wrap("all_reduce", "all_reduce", lambda tensor, *a, **k: _nbytes(tensor))
    wrap("all_gather", "all_gather", lambda tensor_list, tensor, *a, **k: _nbytes(tensor) * len(tensor_list))
    for name in ("all_gather_into_tensor", "all_gather_single"):  # FSDP2's, by torch version
        wrap(name, "all_gather_into_tensor", output)
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        wrap(name, "reduce_scatter_tensor", scattered)


def _ddp_hook(state, bucket):
    _LOG.append(("all_reduce (DDP buckets)", _nbytes(bucket.buffer())))
    # default_hooks.allreduce_hook, through the unwrapped all-reduce (counted above, not twice).
    tensor = bucket.buffer().div_(WORLD)
    work = _ORIGINAL["all_reduce"](tensor, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP checks the hook's annotations as objects (this module's are strings).
_ddp_hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


class MLPEncoders(MMParetoModule):
    """Two MLP encoders (``in -> width -> width -> 512``), concatenation fusion head, unimodal heads."""

    def __init__(self, width: int, sharded: bool, gathered: bool = False) -> None:
        super().__init__()
        self.sharded, self.gathered = sharded, gathered

        def encoder(dim: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 512)
            )

        self.audio, self.visual = encoder(256), encoder(384)
        self.head = nn.Linear(1024, 10)
        self.head_audio, self.head_visual = nn.Linear(512, 10), nn.Linear(512, 10)

    def mmpareto_encoders(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual}

    def configure_model(self) -> None:
        if not self.sharded:
            return
        mesh = self.device_mesh["data_parallel"]
        for enc in (self.audio, self.visual):
            for layer in (enc[0], enc[2], enc[4]):  # nested groups: gathered one at a time
                # gathered=True: kept gathered from the forward to the backward (ZeRO-2-like).
                fully_shard(layer, mesh=mesh, reshard_after_forward=not self.gathered)
            fully_shard(enc, mesh=mesh)
        for head in (self.head, self.head_audio, self.head_visual):
            fully_shard(head, mesh=mesh)

    def training_step(self, batch, batch_idx):
        audio, visual, y = batch
        za, zv = self.audio(audio), self.visual(visual)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, zv], 1)), y),
            "audio": F.cross_entropy(self.head_audio(za), y),
            "visual": F.cross_entropy(self.head_visual(zv), y),
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Meter(pl.Callback):
    """Per step: the collectives since the batch started, and the batch's wall time."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, list[tuple[str, int]]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers `ddp_comm_hook` on CUDA only: DDP's buckets are counted through this one.
        if isinstance(trainer.strategy, DDPStrategy):
            trainer.strategy.model.register_comm_hook(None, _ddp_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _LOG.clear()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((time.perf_counter() - self._start, list(_LOG)))


def _run(rank: int, port: int, config: dict, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _count_collectives()
    torch.manual_seed(0)
    n = WORLD * args.batch * (args.steps + args.warmup)
    data = TensorDataset(torch.randn(n, 256), torch.randn(n, 384), torch.randint(0, 10, (n,)))
    loader = DataLoader(
        data, batch_size=args.batch, sampler=DistributedSampler(data, WORLD, rank, shuffle=False)
    )
    sharded = config["strategy"] == "fsdp2"
    strategy = (
        ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
        if sharded
        else DDPStrategy(process_group_backend="gloo")
    )
    meter = Meter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=args.steps + args.warmup,
        callbacks=[MMParetoCallback(**config["callback"]), meter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(MLPEncoders(args.width, sharded, config.get("gathered", False)), loader)
    if rank == 0:
        torch.save(meter.steps[args.warmup :], out)
    dist.destroy_process_group()


def _measure(config: dict, args: argparse.Namespace, out: Path) -> list[tuple[float, list[tuple[str, int]]]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_run, args=(r, port, config, args, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{config['name']}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    return torch.load(out)


_RING = {
    "all_reduce": 2,
    "all_reduce (DDP buckets)": 2,
    "reduce_scatter_tensor": 1,
    "all_gather_into_tensor": 1,
}


def _summarise(steps: list[tuple[float, list[tuple[str, int]]]]) -> dict[str, Any]:
    per_kind: dict[str, float] = defaultdict(float)
    calls = 0
    for _, log in steps:
        calls += len(log)
        for kind, nbytes in log:
            per_kind[kind] += nbytes / len(steps)
    sent = sum(v * _RING.get(k, 1) * (WORLD - 1) / WORLD for k, v in per_kind.items())
    return {
        "ms": 1000 * statistics.median(t for t, _ in steps),
        "kinds": dict(per_kind),
        "calls": calls / len(steps),
        "sent": sent,
    }


_PLAIN = {"strategy": "uniform", "diagnostics": False}
CONFIGS = [
    {"name": "DDP, plain step", "strategy": "ddp", "callback": _PLAIN},
    {"name": "DDP, MMPareto", "strategy": "ddp", "callback": {}},
    {"name": "FSDP2, plain step", "strategy": "fsdp2", "callback": _PLAIN},
    {"name": "FSDP2, MMPareto", "strategy": "fsdp2", "callback": {}},
    {"name": "FSDP2 `reshard_after_forward=False`, plain step", "strategy": "fsdp2", "callback": _PLAIN,
     "gathered": True},
    {"name": "FSDP2 `reshard_after_forward=False`, MMPareto", "strategy": "fsdp2", "callback": {},
     "gathered": True},
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the encoders")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = MLPEncoders(args.width, False)
    encoder_params = sum(p.numel() for enc in (model.audio, model.visual) for p in enc.parameters())
    rows = []
    mib = 2**20
    for config in CONFIGS:
        result = _summarise(_measure(config, args, Path(f"/tmp/fsdp_cost_{os.getpid()}.pt")))
        kinds = result["kinds"]

        def payload(*names: str, kinds: dict = kinds) -> str:
            return f"{sum(kinds.get(n, 0.0) for n in names) / mib:.2f}"

        rows.append(
            f"| {config['name']} | {payload('all_reduce (DDP buckets)')} | {payload('all_reduce')} | "
            f"{payload('reduce_scatter_tensor')} | {payload('all_gather_into_tensor')} | "
            f"{result['calls']:.0f} | {result['sent'] / mib:.2f} | {result['ms']:.0f} |"
        )
        print(rows[-1], flush=True)
    header = [
        f"2 CPU ranks (gloo, 1 thread each), batch {args.batch} per rank, encoders of "
        f"{encoder_params / 1e6:.2f}M float32 parameters together ({encoder_params * 4 / mib:.1f} MiB), "
        f"{args.steps} measured steps; MiB per step on rank 0.",
        "",
        "| configuration | DDP bucket all-reduce | other all-reduce | reduce-scatter (input) "
        "| all-gather (output) | collectives | sent per rank (ring) | step (ms, median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = "\n".join([*header, *rows])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
