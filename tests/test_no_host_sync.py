"""The training step never reads a device value back to the host.

On CPU there is no stream to stall, so the test watches the operators instead: a TorchDispatchMode
records every ATen call made while the engine splits the gradients and applies the rule, and fails on
the ones that copy a value to the host (``.item()``, ``bool(tensor)``, ``nonzero``, boolean masking,
``tensor.tolist()``) or copy host data to the device (``torch.tensor([...])``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _models import MultiModalNet, make_loader, trainer_kwargs
from torch.utils._python_dispatch import TorchDispatchMode

from mmpareto_lightning import MMParetoCallback, MMParetoEngine, RuleConfig
from mmpareto_lightning.rule import passes

HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), bool(t), float(t), int(t), indexing with a 0-d tensor
    "aten::nonzero",  # boolean-mask indexing, torch.where(cond) with one argument
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
    "aten::lift_fresh",  # torch.tensor(python data)
}


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.overloads: list[str] = []
        self.safe_segment_reduces = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        self.overloads.append(str(func))
        if func._schema.name == "aten::segment_reduce" and not (kwargs or {}).get("unsafe", False):
            # The checked path reads device values inside the kernel (min and sum of the lengths), out
            # of this mode's sight: a GPU stall per call.
            self.safe_segment_reduces += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("n", "extra_loss", "strategy", "rescale"),
    [
        (2, False, "mmpareto", "per_tensor"),
        (2, False, "mmpareto", "per_encoder"),
        (2, False, "pareto", "per_tensor"),
        (3, True, "mmpareto", "per_tensor"),  # three objectives: the simplex solver
        (2, False, "uniform", "per_tensor"),
        (2, False, "multimodal_only", "per_tensor"),
    ],
)
@pytest.mark.parametrize("multi_tensor", [False, True], ids=["cpu-path", "accelerator-path"])
def test_engine_step_has_no_host_synchronisation(
    n, extra_loss, strategy, rescale, multi_tensor, monkeypatch
) -> None:
    # The accelerator path of the rule (multi-tensor kernels) is forced on CPU too: a GPU would
    # otherwise be the only place its host reads could show.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: multi_tensor)
    model = MultiModalNet(n=n, extra_loss=extra_loss)
    engine = MMParetoEngine(model.mmpareto_encoders(), RuleConfig(strategy=strategy, rescale=rescale))
    batches = iter(make_loader(n, size=64))
    # The first step builds buffers and checks the graph once; the steady state is what must not sync.
    with engine.capture():
        losses = model.losses(next(batches))
    engine.backward(losses)
    engine.integrate()

    recorder = RecordOps()
    with recorder:
        with engine.capture():
            losses = model.losses(next(batches))
        engine.backward(losses)
        engine.integrate()
    assert recorder.ops, "the recorder saw nothing: the test would pass vacuously"
    assert "aten::segment_reduce" in recorder.ops
    found = sorted(set(recorder.ops) & HOST_READS)
    assert not found, f"host synchronisation in the step: {found}"
    assert recorder.safe_segment_reduces == 0
    # A list of 0-d tensors bound as a *scalar* list is read back element by element, which CPU
    # tensors do without a visible operator: the overload itself gives it away.
    scalar_lists = sorted({o for o in recorder.overloads if o.endswith(".ScalarList")})
    assert not multi_tensor or not scalar_lists, f"per-tensor host reads on an accelerator: {scalar_lists}"


def test_the_recorder_catches_an_item_call() -> None:
    recorder = RecordOps()
    with recorder:
        torch.ones(2).sum().item()
        torch.tensor([1.0, 2.0])
    assert {"aten::_local_scalar_dense", "aten::lift_fresh"} <= set(recorder.ops)


class RecordBatch(pl.Callback):
    """Records the operators of one whole training step (batch ``index``) inside the Trainer."""

    def __init__(self, index: int = 2) -> None:
        self.index = index
        self.recorder = RecordOps()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.recorder.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.recorder.__exit__(None, None, None)


@pytest.mark.parametrize(("skip_non_finite", "expected_reads"), [(False, 0), (True, 1)])
def test_lightning_training_step_syncs_only_for_the_finite_check(
    skip_non_finite: bool, expected_reads: int
) -> None:
    record = RecordBatch()
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[MMParetoCallback(skip_non_finite=skip_non_finite), record],
        **trainer_kwargs(log_every_n_steps=50),
    )
    trainer.fit(MultiModalNet(n=2), make_loader(2, size=64))
    ops = record.recorder.ops
    assert "aten::segment_reduce" in ops  # the rule ran (its Gram matrices)
    assert ops.count("aten::_local_scalar_dense") == expected_reads
    assert not sorted((set(ops) & HOST_READS) - {"aten::_local_scalar_dense"})
