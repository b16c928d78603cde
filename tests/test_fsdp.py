"""MMPareto under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``): 2 CPU ranks (gloo) with
batch B each equal one process with batch 2B, over several steps with momentum.

The tolerance. Each step's update agrees to a few float32 units in the last place: the batch mean over 2B
samples in one process against two means over B averaged by FSDP's reduce-scatter, and the rule's Gram
matrices summed in float64 over two shards against one float32 piece per tensor (tensors here have at
most 96 entries), each a few eps relative; the rule's decisions are smooth functions of those matrices
away from a cosine of exactly 0. Over S steps the differences add up (these small nets at lr 0.2 neither
amplify nor damp them much: measured, 1 to 3 eps after 4 steps). Bound used: ``32 * eps * S`` relative to
each tensor's largest entry, far below what a dropped or doubled objective changes (every test also
checks the parameters moved by more than 1000 times the bound).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _fsdp import InterleavedData, SaveState, ShardedNet, assert_ok, full, run_ranks
from _models import trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mmpareto_lightning import MMParetoCallback, MMParetoEngine

EPS = torch.finfo(torch.float32).eps
_DP = dict(data_parallel_size=2, tensor_parallel_size=1)


def _bound(steps: int) -> float:
    return 32 * EPS * steps


def _assert_close(actual: dict, expected: dict, steps: int, before: dict | None = None) -> None:
    """Every tensor within the bound, relative to its largest entry; and the parameters really moved."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(actual[name], value, rtol=0, atol=_bound(steps) * scale, msg=name)
    if before is not None:
        moved = max(float((expected[n] - before[n]).abs().max() / before[n].abs().max()) for n in expected)
        assert moved > 1000 * _bound(steps)


# ---------------------------------------------------------------------------------------- plain loop
class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # A first layer of one unit: its shards are empty on every rank but the first.
        self.audio = nn.Sequential(nn.Linear(5, 1), nn.Tanh(), nn.Linear(1, 12), nn.ReLU(), nn.Linear(12, 8))
        self.visual = nn.Sequential(nn.Linear(7, 12), nn.ReLU(), nn.Linear(12, 8))
        self.head = nn.Linear(16, 3)
        self.head_audio, self.head_visual = nn.Linear(8, 3), nn.Linear(8, 3)

    def losses(self, xa, xv, y) -> dict[str, torch.Tensor]:
        za, zv = self.audio(xa), self.visual(xv)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, zv], 1)), y),
            "audio": F.cross_entropy(self.head_audio(za), y),
            "visual": F.cross_entropy(self.head_visual(zv), y),
            "align": 0.1 * (za - zv).pow(2).mean(),  # a third objective of both encoders
        }


def _plain_batch(step: int, size: int = 16):
    gen = torch.Generator().manual_seed(step)
    return (
        torch.randn(size, 5, generator=gen),
        torch.randn(size, 7, generator=gen),
        torch.randint(0, 3, (size,), generator=gen),
    )


def _plain_loop(rank: int, world: int, steps: int = 4, hsdp: bool = False, sync: bool = True) -> dict:
    torch.manual_seed(0)
    net = PlainNet()
    if world > 1:
        # HSDP: 2 replicas of 2 shards; FSDP: 1 group of `world` shards.
        mesh = (
            init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp else None
        )
        for module in (net.audio[0], net.audio, net.visual, net.head, net.head_audio, net.head_visual):
            fully_shard(module, mesh=mesh)
        net.audio.set_requires_gradient_sync(sync)
    before = {n: full(p) for n, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    engine = MMParetoEngine({"audio": net.audio, "visual": net.visual})
    assert (engine.sharded is not None) == (world > 1)
    conflicts = 0
    for step in range(steps):
        xa, xv, y = _plain_batch(step)
        if world > 1:
            xa, xv, y = xa[rank::world], xv[rank::world], y[rank::world]
        optimizer.zero_grad(set_to_none=True)
        with engine.capture():
            losses = net.losses(xa, xv, y)
        engine.backward(losses)
        stats = engine.integrate()
        conflicts += sum(int(s.conflict) for s in stats.values())
        optimizer.step()
    return {
        "before": before,
        "params": {n: full(p) for n, p in net.named_parameters()},
        "conflicts": conflicts,
    }


def _plain_rank(rank: int, world: int, directory: str, **kwargs) -> None:
    dist.init_process_group("gloo")
    torch.save(_plain_loop(rank, world, **kwargs), os.path.join(directory, f"rank{rank}.pt"))


@pytest.mark.parametrize(
    ("world", "hsdp"), [(2, False), pytest.param(4, True, marks=pytest.mark.slow)], ids=["fsdp", "hsdp"]
)
def test_plain_loop_engine_under_fully_shard_equals_one_process(tmp_path, world: int, hsdp: bool) -> None:
    assert_ok(run_ranks(functools.partial(_plain_rank, hsdp=hsdp), tmp_path, str(tmp_path), world=world))
    single = _plain_loop(0, 1)
    assert single["conflicts"] > 0  # the rule's conflict branch runs
    for r in range(world):
        sharded = torch.load(tmp_path / f"rank{r}.pt")
        assert sharded["conflicts"] == single["conflicts"]
        _assert_close(sharded["params"], single["params"], steps=4, before=single["before"])


def _count_bytes(names: tuple[str, ...], sink: list[int], payload: int) -> None:
    """Wrap the ``torch.distributed`` functions ``names`` (those this torch has) to add the byte size of
    argument ``payload`` (0: the output, 1: the input) of each call to ``sink``."""
    for name in names:
        original = getattr(dist, name, None)
        if original is not None:

            def counted(*args, _original=original, **kwargs):
                tensor = args[payload] if len(args) > payload else list(kwargs.values())[payload]
                sink.append(tensor.numel() * tensor.element_size())
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def _communication_rank(rank: int, world: int, directory: str) -> None:
    dist.init_process_group("gloo")
    gathered: list[int] = []
    scattered: list[int] = []
    _count_bytes(("all_gather_into_tensor", "all_gather_single"), gathered, 0)  # FSDP's, by torch version
    _count_bytes(("reduce_scatter_tensor", "reduce_scatter_single"), scattered, 1)
    torch.manual_seed(0)
    net = PlainNet()
    for module in (net.audio[0], net.audio, net.visual, net.head, net.head_audio, net.head_visual):
        fully_shard(module, reshard_after_forward=False)
    engine = MMParetoEngine({"audio": net.audio, "visual": net.visual})
    counts = {}
    for step, split in enumerate((False, True)):
        gathered.clear(), scattered.clear()
        xa, xv, y = (t[rank::world] for t in _plain_batch(step))
        with engine.capture():
            losses = net.losses(xa, xv, y)
        if split:
            engine.backward(losses)
            engine.integrate()
        else:
            engine.splitter.release_outputs()
            sum(losses.values()).backward()
        counts[split] = (sum(gathered), sum(scattered))
    padded = sum(  # reduce-scatter inputs: dim 0 padded to a multiple of the ranks
        -(-p.shape[0] // world) * world * p[0].numel() * p.element_size()
        for enc in (net.audio, net.visual)
        for p in enc.parameters()
    )
    torch.save({"counts": counts, "encoder_bytes": padded}, os.path.join(directory, f"rank{rank}.pt"))


def test_extra_communication_is_one_reduce_scatter_per_extra_objective(tmp_path) -> None:
    # Everything sharded with reshard_after_forward=False (gathered from the forward to the end of the
    # backward): a plain step all-gathers once, in the forward, and MMPareto's split gathers nothing
    # more; it reduce-scatters the encoders' gradients once more per extra objective ("multimodal" and
    # "align": 2).
    assert_ok(run_ranks(_communication_rank, tmp_path, str(tmp_path)))
    result = torch.load(tmp_path / "rank0.pt")
    (plain_gathered, plain_scattered), (split_gathered, split_scattered) = (
        result["counts"][False],
        result["counts"][True],
    )
    assert split_gathered == plain_gathered > 0
    assert split_scattered - plain_scattered == 2 * result["encoder_bytes"]


def test_gradient_sync_switched_off_is_refused(tmp_path) -> None:
    errors = run_ranks(functools.partial(_plain_rank, sync=False), tmp_path, str(tmp_path))
    for error in errors:
        assert error is not None and error.startswith("GradientSplittingError"), error
        assert "Gradient synchronisation is off in encoder 'audio'" in error


# ---------------------------------------------------------------------------------------- Lightning
def _fit(
    directory: str,
    world: int,
    per_rank: int,
    steps: int | None = None,
    epochs: int | None = None,
    size: int = 96,
    model_kwargs: dict | None = None,
    callback_kwargs: dict | None = None,
    ckpt_path: str | None = None,
    checkpoint_dir: str | None = None,
    sharded: bool | None = None,
    **trainer_overrides,
) -> pl.Trainer:
    torch.manual_seed(0)
    model = ShardedNet(**(model_kwargs or {}))
    if model.lazy and not (world > 1 if sharded is None else sharded):
        model.configure_model()  # one device: the callback reads the encoders in `setup`, before it
    callbacks = [MMParetoCallback(**(callback_kwargs or {})), SaveState(directory)]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, save_on_train_epoch_end=True))
    if world > 1 if sharded is None else sharded:
        trainer_overrides.update(
            strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1), devices=world
        )
    trainer = pl.Trainer(
        max_steps=steps if steps is not None else -1,
        max_epochs=epochs,
        callbacks=callbacks,
        **trainer_kwargs(
            use_distributed_sampler=False,
            enable_checkpointing=checkpoint_dir is not None,
            **trainer_overrides,
        ),
    )
    trainer.fit(model, datamodule=InterleavedData(per_rank, size), ckpt_path=ckpt_path)
    return trainer


def _fit_rank(rank: int, world: int, directory: str, *runs: dict) -> None:
    for kwargs in runs:  # one after the other in the same processes (a fit, then its resumption)
        _fit(directory, world, **kwargs)


def _initial(model_kwargs: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = ShardedNet(**(model_kwargs or {}))
    model.configure_model()  # no device mesh: creates (lazy) and freezes, shards nothing
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(tmp_path, runs: list[dict], single: dict, steps: int, conflicts: bool = True) -> list[dict]:
    """2 ranks (the fits ``runs``, in order) against one process (``single``): parameters, momentum,
    the rule's counts and metrics (global on every rank). Returns the ranks' saved states."""
    sharded_dir, single_dir = tmp_path / "sharded", tmp_path / "single"
    assert_ok(run_ranks(_fit_rank, sharded_dir, str(sharded_dir), *runs))
    single_dir.mkdir()
    _fit(str(single_dir), 1, **single)
    reference = torch.load(single_dir / "rank0.pt")
    ranks = [torch.load(sharded_dir / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["steps"] == reference["steps"] == steps
        _assert_close(rank["params"], reference["params"], steps, before=_initial(single.get("model_kwargs")))
        _assert_close(rank["momentum"], reference["momentum"], steps)
        assert rank["totals"] == reference["totals"]
        assert rank["skipped"] == reference["skipped"]
        assert rank["metrics"].keys() == reference["metrics"].keys()
        for key, value in reference["metrics"].items():
            assert rank["metrics"][key] == pytest.approx(value, rel=_bound(steps), abs=_bound(steps)), key
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), f"{name} differs between ranks"
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    if conflicts:
        assert sum(v["conflicts"] for v in reference["totals"].values()) > 0
    return ranks


def test_model_parallel_two_ranks_equal_one_process_with_the_global_batch(tmp_path) -> None:
    _compare(tmp_path, [dict(per_rank=8, steps=4)], dict(per_rank=16, steps=4), steps=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "callback",
    [
        dict(strategy="pareto", rescale="per_encoder"),
        dict(strategy="multimodal_only", diagnostics=False),
        dict(strategy="uniform", diagnostics=False, gamma=1.5),
    ],
    ids=["pareto", "multimodal_only-cheap", "uniform-cheap"],
)
def test_model_parallel_other_strategies(tmp_path, callback: dict) -> None:
    _compare(
        tmp_path,
        [dict(per_rank=8, steps=3, callback_kwargs=callback)],
        dict(per_rank=16, steps=3, callback_kwargs=callback),
        steps=3,
        conflicts=callback.get("diagnostics", True),
    )


@pytest.mark.slow
def test_model_parallel_with_encoders_created_in_configure_model(tmp_path) -> None:
    # Under FSDP2 the callback reads the encoders at fit start, after configure_model made them.
    model = dict(lazy=True)
    _compare(
        tmp_path,
        [dict(per_rank=8, steps=2, model_kwargs=model)],
        dict(per_rank=16, steps=2, model_kwargs=model),
        steps=2,
        conflicts=False,
    )


@pytest.mark.slow
def test_model_parallel_with_accumulation_and_clipping(tmp_path) -> None:
    callback = dict(accumulate_grad_batches=2, gradient_clip_val=0.05)
    _compare(
        tmp_path,
        [dict(per_rank=4, steps=3, callback_kwargs=callback)],
        dict(per_rank=16, steps=3, callback_kwargs=dict(gradient_clip_val=0.05)),
        steps=3,
    )


@pytest.mark.slow
def test_model_parallel_with_a_modality_missing_on_one_rank(tmp_path) -> None:
    # Rank 1 never has the visual modality: the multimodal loss reaches the visual encoder on rank 0
    # only, and rank 1's visual loss is 0 (computed through the encoder on an empty batch).
    model = dict(missing_rank=1)
    _compare(
        tmp_path,
        [dict(per_rank=8, steps=4, model_kwargs=model)],
        dict(per_rank=16, steps=4, model_kwargs=model),
        steps=4,
    )


@pytest.mark.slow
def test_model_parallel_with_three_objectives_and_a_frozen_nested_group(tmp_path) -> None:
    # "align" reaches both encoders (K = 3: two extra backward passes); the audio encoder's first layer,
    # a nested FSDP group, is frozen.
    model = dict(extra_loss=True, frozen=("encoders.audio.net.0",))
    ranks = _compare(
        tmp_path,
        [dict(per_rank=8, steps=3, model_kwargs=model)],
        dict(per_rank=16, steps=3, model_kwargs=model),
        steps=3,
        conflicts=False,
    )
    initial = _initial(model)
    assert torch.equal(
        ranks[0]["params"]["encoders.audio.net.0.weight"], initial["encoders.audio.net.0.weight"]
    )
    assert "mmpareto/audio/alpha_align_step" in ranks[0]["metrics"]


@pytest.mark.slow
def test_model_parallel_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path) -> None:
    # Rank 1's visual loss is infinite on the second batch: both ranks skip that step (one process with
    # the infinite loss skips it too), and train on.
    model = dict(inf_at=(1, 1))
    with pytest.warns(RuntimeWarning, match="MMPareto: non-finite values at global step 1"):  # one process
        ranks = _compare(
            tmp_path,
            [dict(per_rank=8, steps=4, model_kwargs=model)],
            dict(per_rank=16, steps=4, model_kwargs=model),
            steps=4,
        )
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1


@pytest.mark.slow
def test_model_parallel_resume_from_a_distributed_checkpoint(tmp_path) -> None:
    # 2 steps per epoch: a fit of one epoch saves a distributed checkpoint (a folder of shards); a second
    # fit resumes it for a second epoch. Equal to one process running both epochs.
    checkpoints = tmp_path / "checkpoints"
    first = dict(per_rank=8, epochs=1, size=32, checkpoint_dir=str(checkpoints))
    second = dict(per_rank=8, epochs=2, size=32, ckpt_path=str(checkpoints / "epoch=0-step=2.ckpt"))
    _compare(tmp_path, [first, second], dict(per_rank=16, epochs=2, size=32), steps=4)
    assert (checkpoints / "epoch=0-step=2.ckpt").is_dir()


def _bf16_rank(rank: int, world: int, directory: str, precision: str) -> None:
    _fit(directory, world, per_rank=8, steps=2, precision=precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_model_parallel_bf16(tmp_path, precision: str) -> None:
    # bfloat16 keeps 8 significant bits (spacing eps = 2**-7 at 1): the activations and the batch sums
    # of the weight gradients round differently over B and 2B samples, a few units per step, so each
    # update (the change of the parameters) is compared to 5 % of its largest entry; under bf16-true the
    # parameters themselves are bfloat16, and each of the 2 steps rounds them: 2 eps of their largest
    # entry more. The 32-bit tests bound the split itself; this one checks that the bfloat16 paths
    # (autocast; bfloat16 parameters and gradients, which the rule widens to float32) run sharded.
    # (The one-process bf16-true run is also the single-device check of that precision.)
    assert_ok(run_ranks(_bf16_rank, tmp_path, str(tmp_path), precision))
    single = tmp_path / "single"
    single.mkdir()
    _fit(str(single), 1, per_rank=16, steps=2, precision=precision)
    initial = _initial()
    reference = torch.load(single / "rank0.pt")["params"]
    eps = torch.finfo(torch.bfloat16).eps
    for r in range(2):
        params = torch.load(tmp_path / f"rank{r}.pt")["params"]
        for name, value in reference.items():
            assert params[name].dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
            expected, actual = value.float() - initial[name], params[name].float() - initial[name]
            bound = 0.05 * float(expected.abs().max())
            if precision == "bf16-true":
                bound += 2 * eps * float(value.abs().max())
            torch.testing.assert_close(actual, expected, rtol=0, atol=bound, msg=name)


def _readme_model_rank(rank: int, world: int, directory: str) -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Sharded encoders.*?```python\n(.*?)```", text, re.S)
    assert block is not None
    namespace: dict = {}
    exec(compile(block.group(1), "README-sharded-encoders", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["ShardedAVClassifier"](dim=16, depth=2, heads=2)
    data = TensorDataset(torch.randn(32, 4, 128), torch.randn(32, 4, 768), torch.randint(0, 6, (32,)))
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, world, rank, shuffle=False))
    callback = MMParetoCallback()
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[callback, SaveState(directory)],
        **trainer_kwargs(strategy=ModelParallelStrategy(**_DP), devices=world, use_distributed_sampler=False),
    )
    trainer.fit(model, loader)
    assert callback.optimizer_steps == 2


def test_readme_sharded_model_trains_under_model_parallel_strategy(tmp_path) -> None:
    assert_ok(run_ranks(_readme_model_rank, tmp_path, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.isfinite(value).all() and torch.equal(value, ranks[1]["params"][name]), name
    assert (
        ranks[0]["metrics"] == ranks[1]["metrics"] and "mmpareto/visual/cos_beta_step" in ranks[0]["metrics"]
    )


# ---------------------------------------------------------------------------------------- refusals
def _refused_rank(rank: int, world: int, model_kwargs: dict, strategy_kwargs: dict) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(
            strategy=ModelParallelStrategy(**strategy_kwargs), devices=world, use_distributed_sampler=False
        ),
    )
    trainer.fit(ShardedNet(**model_kwargs), datamodule=InterleavedData(8))


@pytest.mark.parametrize(
    ("model_kwargs", "strategy_kwargs", "match"),
    [
        ({}, dict(data_parallel_size=1, tensor_parallel_size=2), "tensor parallelism"),
        (dict(unsharded=("head",)), _DP, r"not sharded: \['head.weight', 'head.bias'\]"),
        (dict(shard_root=True), _DP, "was applied to the LightningModule itself"),
    ],
    ids=["tensor-parallel", "unsharded-head", "sharded-root"],
)
def test_model_parallel_misconfigurations_are_refused(tmp_path, model_kwargs, strategy_kwargs, match) -> None:
    errors = run_ranks(_refused_rank, tmp_path, model_kwargs, strategy_kwargs)
    for error in errors:
        assert error is not None and error.startswith("MisconfigurationException")
        assert re.search(match, error), error


class _OtherLossesOnRank1(ShardedNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        if self.global_rank == 1:
            losses["extra"] = losses["visual"] * 0.5
        return losses


def _other_losses_rank(rank: int, world: int) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(strategy=ModelParallelStrategy(**_DP), devices=world, use_distributed_sampler=False),
    )
    trainer.fit(_OtherLossesOnRank1(), datamodule=InterleavedData(8))


def test_model_parallel_ranks_returning_different_losses_are_refused(tmp_path) -> None:
    errors = run_ranks(_other_losses_rank, tmp_path)
    for error in errors:
        assert error is not None and error.startswith("MisconfigurationException"), error
        assert "0: ['multimodal', 'audio', 'visual']; 1: ['multimodal', 'audio', 'visual', 'extra']" in error


class _DetachedOnRank1(ShardedNet):
    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        if self.global_rank == 1:
            losses["visual"] = losses["visual"].detach()
        return losses


def _detached_rank(rank: int, world: int) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[MMParetoCallback()],
        **trainer_kwargs(strategy=ModelParallelStrategy(**_DP), devices=world, use_distributed_sampler=False),
    )
    trainer.fit(_DetachedOnRank1(), datamodule=InterleavedData(8))


def test_model_parallel_a_refusal_on_one_rank_stops_every_rank(tmp_path) -> None:
    # Rank 1 refuses its detached loss; rank 0, whose losses are fine, must not wait for it in a
    # collective (a hang until the process group's timeout), but stop too.
    rank0, rank1 = run_ranks(_detached_rank, tmp_path, timeout=60)
    assert rank1 is not None and "Loss 'visual' does not require grad" in rank1
    assert rank0 is not None and "Rank(s) [1] refused this training step" in rank0


# ---------------------------------------------------------------------------------------- CUDA
def _cuda_rank(rank: int, world: int, directory: str) -> None:
    _fit(directory, world, per_rank=16, steps=4, sharded=True, accelerator="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_parallel_on_one_gpu_with_nccl(tmp_path) -> None:
    # One NCCL rank (the ranks' agreement then runs on a gloo group of its own; the rule's Gram matrices
    # on the GPU) against the unsharded single-device run.
    sharded_dir, single_dir = tmp_path / "sharded", tmp_path / "single"
    assert_ok(run_ranks(_cuda_rank, sharded_dir, str(sharded_dir), world=1, timeout=300))
    single_dir.mkdir()
    _fit(str(single_dir), 1, per_rank=16, steps=4, accelerator="cuda")
    sharded = torch.load(sharded_dir / "rank0.pt", map_location="cpu")
    single = torch.load(single_dir / "rank0.pt", map_location="cpu")
    _assert_close(sharded["params"], single["params"], 4, before=_initial())
    _assert_close(sharded["momentum"], single["momentum"], 4)
    assert sharded["totals"] == single["totals"]
