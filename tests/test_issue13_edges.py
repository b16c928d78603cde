"""Parameters, gradients, hooks and optimizers the split cannot serve silently: each ends exact (against
plain autograd per loss and the independent rule of ``_reference.py``) or in a clear error."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _bounds import assert_within, gamma
from _data_parallel import StepRecorder, check_recorded_fit
from _exact import assert_moved_by, expected_deltas
from _models import Net, make_loader, trainer_kwargs
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from mmpareto_lightning import MMParetoCallback, MMParetoEngine, MMParetoModule


def _encoders(model):
    return model.mmpareto_encoders()


class StepChecker(pl.Callback):
    """Checks every optimizer step of a fit against plain autograd per loss (SGD, lr 1, no momentum)."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = copy.deepcopy(pl_module)
        self.expected = expected_deltas(pl_module, _encoders, lambda m: m.losses(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert_moved_by(pl_module, self.before, self.expected)
        self.checked += 1


# ---------------------------------------------------------------- complex parameters
class ComplexEncoder(nn.Module):
    """A complex weight next to a real one; returns a real or a complex feature."""

    def __init__(self, dim: int, complex_output: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(dim, 8, dtype=torch.complex64))
        self.lin = nn.Linear(dim, 8)
        self.complex_output = complex_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.complex64) @ self.w
        if self.complex_output:
            return z * torch.tanh(self.lin(x))
        return z.real * z.imag + self.lin(x)


class ComplexNet(MMParetoModule):
    """Audio: complex weight, real output; visual: complex weight and complex output, read by a head
    with a complex weight of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = ComplexEncoder(5)
        self.visual = ComplexEncoder(7, complex_output=True)
        self.head = nn.Linear(24, 3)
        self.head_audio = nn.Linear(8, 3)
        self.head_visual = nn.Parameter(0.3 * torch.randn(8, 3, dtype=torch.complex64))

    def mmpareto_encoders(self):
        return {"audio": self.audio, "visual": self.visual}

    def losses(self, batch):
        xa, xv, y = batch
        za, zv = self.audio(xa), self.visual(xv)
        fused = torch.cat([za, zv.real, zv.imag], 1)
        return {
            "multimodal": F.cross_entropy(self.head(fused), y),
            "audio": F.cross_entropy(self.head_audio(za), y),
            "visual": F.cross_entropy((zv @ self.head_visual).abs(), y),
        }

    def training_step(self, batch, batch_idx):
        return self.losses(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_complex_parameters_are_exact_through_the_trainer() -> None:
    torch.manual_seed(0)
    checker = StepChecker()
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback(), checker], **trainer_kwargs())
    trainer.fit(ComplexNet(), make_loader(2))
    assert checker.checked == 2


def test_complex_parameters_are_exact_in_a_plain_loop_with_a_data_parallel_mean() -> None:
    # The data-parallel mean goes through one flat buffer per real dtype; a "mean" over two ranks that
    # hold the same gradients must give back exactly the gradients, each in its own tensor and dtype.
    torch.manual_seed(0)
    model = ComplexNet()
    batch = next(iter(make_loader(2)))
    before = copy.deepcopy(model)
    expected = expected_deltas(model, _encoders, lambda m: m.losses(batch))
    engine = MMParetoEngine(model.mmpareto_encoders())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    calls = []

    def mean_of_two_equal_ranks(flat: torch.Tensor) -> torch.Tensor:
        calls.append(flat.dtype)
        return flat.add_(flat.clone()).div_(2)

    with engine.capture():
        losses = model.losses(batch)
    engine.backward(losses)
    stats = engine.integrate(reduce_fn=mean_of_two_equal_ranks)
    heads = [p for n, p in model.named_parameters() if n.startswith("head")]
    assert bool(engine.all_finite(stats, heads))
    optimizer.step()
    assert calls == [torch.float32]  # complex64 and float32 gradients share one float32 buffer
    assert_moved_by(model, before, expected)


class ComplexMomentumNet(ComplexNet):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


@pytest.mark.slow
def test_complex_parameters_under_ddp_equal_one_process_with_the_global_batch(tmp_path, monkeypatch) -> None:
    from test_distributed_precision import InterleavedData

    # A port of its own: an earlier DDP test's MASTER_PORT may be taken by now on a shared machine.
    monkeypatch.delenv("MASTER_PORT", raising=False)

    # Every step against the rule on the mean of the ranks' gradients (the gradient of the global batch:
    # the ranks hold its interleaved halves), replayed from the recorded state with the bounds of
    # _data_parallel: the real views of the complex parameters, gradients and momentum buffers.
    torch.manual_seed(0)
    model = ComplexMomentumNet()
    initial = copy.deepcopy(model)
    trainer = pl.Trainer(
        max_steps=4,
        strategy="ddp_spawn",
        callbacks=[MMParetoCallback(), StepRecorder(str(tmp_path))],
        **trainer_kwargs(devices=2, use_distributed_sampler=False),
    )
    trainer.fit(model, datamodule=InterleavedData(8))
    replayed = check_recorded_fit(
        str(tmp_path),
        lambda: copy.deepcopy(initial),
        lambda rank, entry: lambda m: m.losses(entry["batch"]),
        momentum=0.9,
        lr=0.2,
    )
    assert len(replayed) == 4
    assert any(step.conflict["audio"] == (True, True) for step in replayed)


def test_a_non_finite_complex_head_gradient_is_detected() -> None:
    torch.manual_seed(0)
    model = ComplexNet()
    engine = MMParetoEngine(model.mmpareto_encoders())
    with engine.capture():
        losses = model.losses(next(iter(make_loader(2))))
    engine.backward(losses)
    stats = engine.integrate()
    assert bool(engine.all_finite(stats, [model.head_visual]))
    model.head_visual.grad[0, 0] = complex(0.0, float("inf"))
    assert not bool(engine.all_finite(stats, [model.head_visual]))


def test_complex_parameters_under_a_grad_scaler_are_refused() -> None:
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], plugins=[plugin], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=r"Complex parameter.*'audio\.w'.*GradScaler"):
        trainer.fit(ComplexNet(), make_loader(2))


def test_complex_parameters_with_value_clipping_are_refused() -> None:
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[MMParetoCallback(gradient_clip_val=1.0, gradient_clip_algorithm="value")],
        **trainer_kwargs(),
    )
    with pytest.raises(
        MisconfigurationException, match=r"Complex parameter.*'audio\.w'.*gradient_clip_algorithm='norm'"
    ):
        trainer.fit(ComplexNet(), make_loader(2))


def test_an_encoder_mixing_real_dtypes_is_refused() -> None:
    model = ComplexNet()
    model.audio.lin.double()  # float64 next to complex64 (float32 real view)
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=r"encoder 'audio'.*'audio\.lin\.weight'.*float64"):
        trainer.fit(model, make_loader(2))


# ---------------------------------------------------------------- sparse gradients
class TokenEncoder(nn.Module):
    """A bag of embeddings of the input's signs: ``sparse`` picks nn.Embedding(sparse=True), and
    ``functional`` the same lookup through F.embedding(..., sparse=True) on a plain parameter."""

    def __init__(self, dim: int, sparse: bool, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.embedding = nn.Embedding(2 * dim, 8, sparse=sparse and not functional)
        self.use_sparse = sparse
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x > 0).long() + 2 * torch.arange(x.shape[1])
        if self.functional:
            vectors = F.embedding(tokens, self.embedding.weight, sparse=self.use_sparse)
        else:
            vectors = self.embedding(tokens)
        return torch.tanh(self.proj(vectors.mean(1)))


class SparseNet(Net):
    def __init__(self, where: str) -> None:
        super().__init__()
        if where in ("module", "functional"):
            self.audio = TokenEncoder(5, sparse=True, functional=where == "functional")
        else:  # a sparse embedding in a head: plain summed gradient, as without MMPareto
            self.audio = TokenEncoder(5, sparse=False)
            self.class_bias = nn.Embedding(2, 3, sparse=True)

    def losses(self, batch):
        losses = super().losses(batch)
        if hasattr(self, "class_bias"):
            xa = batch[0]
            bias = self.class_bias((xa[:, 0] > 0).long())
            losses["multimodal"] = losses["multimodal"] + 0.1 * (bias.softmax(1)[:, 0]).mean()
        return losses


def test_a_sparse_embedding_module_in_an_encoder_is_refused_at_fit_start() -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=r"'audio\.embedding'.*sparse=True.*encoder 'audio'"):
        trainer.fit(SparseNet("module"), make_loader(2))


def test_a_functional_sparse_gradient_in_an_encoder_is_a_clear_error() -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=r"'audio\.embedding\.weight'.*sparse gradient"):
        trainer.fit(SparseNet("functional"), make_loader(2))


def test_a_functional_sparse_gradient_in_a_plain_loop_is_a_clear_error() -> None:
    from mmpareto_lightning import GradientSplittingError

    model = SparseNet("functional")
    engine = MMParetoEngine(
        model.mmpareto_encoders(), param_names={id(p): n for n, p in model.named_parameters()}
    )
    with engine.capture():
        losses = model.losses(next(iter(make_loader(2))))
    with pytest.raises(GradientSplittingError, match=r"'audio\.embedding\.weight'.*sparse gradient"):
        engine.backward(losses)


def test_a_sparse_embedding_in_a_head_is_exact_and_checked_for_non_finite_values() -> None:
    torch.manual_seed(0)
    checker = StepChecker()
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback(), checker], **trainer_kwargs())
    model = SparseNet("head")
    trainer.fit(model, make_loader(2))
    assert checker.checked == 2
    engine = MMParetoEngine(model.mmpareto_encoders())
    model.class_bias.weight.grad = torch.sparse_coo_tensor(
        [[1]], [[0.0, float("nan"), 0.0]], (2, 3), check_invariants=True
    )
    assert not bool(engine.all_finite({}, [model.class_bias.weight]))
    model.class_bias.weight.grad = torch.sparse_coo_tensor(
        [[1, 1]], [[3e38, 0, 0], [3e38, 0, 0]], (2, 3), check_invariants=True
    )
    assert not bool(engine.all_finite({}, [model.class_bias.weight]))  # duplicates sum to inf


# ---------------------------------------------------------------- parameter hooks
def _clamp(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(-0.01, 0.01)


class PostAccumulateClamp(pl.Callback):
    """Clamps ``audio.0.weight``'s gradient to +-0.01 in a post-accumulate-grad hook registered when batch
    ``at`` starts, and checks every step against plain autograd per loss and the reference rule, with
    the clamp applied to the integrated gradient of the steps where the hook exists. Records what the
    hook saw and what the optimizer applied."""

    def __init__(self, at: int = 0, strategy: str = "mmpareto") -> None:
        self.at, self.strategy = at, strategy
        self.seen: list[torch.Tensor] = []
        self.applied: list[torch.Tensor] = []
        self.checked = 0

    def hook(self, parameter: torch.Tensor) -> None:
        self.seen.append(parameter.grad.clone())
        parameter.grad.clamp_(-0.01, 0.01)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            pl_module.audio[0].weight.register_post_accumulate_grad_hook(self.hook)
        self.before = copy.deepcopy(pl_module)
        self.expected = expected_deltas(
            pl_module, _encoders, lambda m: m.losses(batch), strategy=self.strategy
        )
        if batch_idx >= self.at:  # the update is -grad (SGD, lr 1): clamp the integrated gradient
            self.expected["audio.0.weight"] = -np.clip(-self.expected["audio.0.weight"], -0.01, 0.01)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.applied.append(pl_module.audio[0].weight.grad.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert_moved_by(pl_module, self.before, self.expected)
        self.checked += 1


@pytest.mark.parametrize(
    ("strategy", "diagnostics", "at"),
    [("mmpareto", True, 0), ("mmpareto", True, 1), ("uniform", False, 1), ("multimodal_only", False, 0)],
)
def test_a_post_accumulate_grad_hook_on_an_encoder_parameter_runs_on_the_integrated_gradient(
    strategy: str, diagnostics: bool, at: int
) -> None:
    # The hook fires once per optimizer step, on the gradient the optimizer applies (a clamp to +-0.01
    # once moved the parameter by 0.17: it clamped the unimodal gradient, which the rule then replaced).
    torch.manual_seed(0)
    clamp = PostAccumulateClamp(at=at, strategy=strategy)
    callback = MMParetoCallback(strategy=strategy, diagnostics=diagnostics)
    trainer = pl.Trainer(max_steps=3, callbacks=[callback, clamp], **trainer_kwargs())
    trainer.fit(Net(), make_loader(2, size=48))
    assert clamp.checked == 3 and len(clamp.seen) == 3 - at
    assert float(clamp.seen[0].abs().max()) > 0.01  # the clamp changes the update
    for seen, applied in zip(clamp.seen, clamp.applied[at:], strict=True):
        assert torch.equal(seen.clamp(-0.01, 0.01), applied)


def test_a_post_accumulate_grad_hook_runs_once_per_window_and_not_on_a_skipped_step() -> None:
    calls: list[int] = []
    model = WithOptimizer(lambda p: torch.optim.SGD(p, lr=1.0), nan_batches=[2])
    model.audio[0].weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    before = copy.deepcopy(model)
    trainer = pl.Trainer(
        max_steps=2, callbacks=[MMParetoCallback(accumulate_grad_batches=2)], **trainer_kwargs()
    )
    with pytest.warns(RuntimeWarning, match="non-finite"):
        trainer.fit(model, make_loader(2, size=64))
    assert len(calls) == 1  # window 1 stepped, window 2 (NaN loss on its first batch) was skipped
    assert not torch.equal(model.audio[0].weight, before.audio[0].weight)


def test_a_post_accumulate_grad_hook_in_a_plain_loop_runs_on_the_integrated_gradient() -> None:
    torch.manual_seed(0)
    model = Net()
    batch = next(iter(make_loader(2)))
    reference = copy.deepcopy(model)  # no hook
    seen: list[torch.Tensor] = []
    model.visual[0].bias.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    grads = {}
    for net in (model, reference):
        engine = MMParetoEngine(net.mmpareto_encoders())
        with engine.capture():
            losses = net.losses(batch)
        engine.backward(losses)
        if net is model:
            assert seen == []  # held during the backward (it would see the unimodal gradient)
        engine.integrate()
        grads[id(net)] = net.visual[0].bias.grad
    assert len(seen) == 1 and torch.equal(seen[0], grads[id(reference)])
    assert torch.equal(grads[id(model)], grads[id(reference)])


def test_an_optimizer_in_backward_on_an_encoder_parameter_steps_with_the_integrated_gradient() -> None:
    torch.manual_seed(0)
    model = Net()
    weight = model.audio[0].weight
    in_backward = torch.optim.SGD([weight], lr=1.0)

    def step_in_backward(parameter: torch.Tensor) -> None:
        in_backward.step()
        in_backward.zero_grad(set_to_none=True)

    weight.register_post_accumulate_grad_hook(step_in_backward)
    checker = StepChecker()
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback(), checker], **trainer_kwargs())
    trainer.fit(model, make_loader(2))
    assert checker.checked == 2


def test_ddps_python_reducer_is_refused() -> None:
    from types import SimpleNamespace

    from mmpareto_lightning.lightning.fit_checks import check_ddp_reducer

    check_ddp_reducer(SimpleNamespace(strategy=SimpleNamespace(model=nn.Linear(1, 1))))
    ddp = SimpleNamespace(model=SimpleNamespace(_use_python_reducer=True))
    with pytest.raises(MisconfigurationException, match=r"Python reducer.*default reducer"):
        check_ddp_reducer(SimpleNamespace(strategy=ddp))


class HeadHook(pl.Callback):
    """Records, in a post-accumulate-grad hook on the fusion head, the gradient it sees; compares it with
    the gradient the optimizer applies."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.applied: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.head.weight.register_post_accumulate_grad_hook(lambda p: self.seen.append(p.grad.clone()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.applied.append(pl_module.head.weight.grad.clone())


def test_a_post_accumulate_grad_hook_on_a_head_sees_the_final_gradient() -> None:
    torch.manual_seed(0)
    checker, hook = StepChecker(), HeadHook()
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback(), checker, hook], **trainer_kwargs())
    trainer.fit(Net(), make_loader(2))
    assert checker.checked == 2 and len(hook.seen) == 2
    for seen, applied in zip(hook.seen, hook.applied, strict=True):
        assert torch.equal(seen, applied)


class ClampHooks(pl.Callback):
    """Clamps the gradient of an encoder weight with a tensor hook, counting its calls, and checks every
    step against plain autograd per loss on a copy carrying the same hook."""

    def __init__(self) -> None:
        self.calls, self.checked, self.material = 0, 0, 0

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.audio[0].weight.register_hook(self.count_and_clamp)

    def count_and_clamp(self, grad: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _clamp(grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        def hooked_losses(model):
            model.audio[0].weight.register_hook(_clamp)  # the copy has no hooks: give it the same one
            return model.losses(batch)

        self.before = copy.deepcopy(pl_module)
        self.expected = expected_deltas(pl_module, _encoders, hooked_losses)
        unhooked = expected_deltas(pl_module, _encoders, lambda m: m.losses(batch))
        # The clamp matters when the two expected updates differ by more than both their bounds.
        name = "audio.0.weight"
        apart = np.abs(self.expected[name] - unhooked[name])
        self.material += bool((apart > self.expected.bounds[name] + unhooked.bounds[name]).any())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert_moved_by(pl_module, self.before, self.expected)
        self.checked += 1


def test_tensor_hooks_on_encoder_parameters_act_on_each_objectives_gradient() -> None:
    # A tensor hook fires wherever a gradient w.r.t. the parameter is computed: in the extra backward
    # (the multimodal gradient) and in the ordinary one (the unimodal gradient), as in plain autograd
    # per loss (and in the authors' one backward per loss). What it returns is what the rule integrates.
    torch.manual_seed(0)
    hooks = ClampHooks()
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback(), hooks], **trainer_kwargs())
    trainer.fit(Net(), make_loader(2))
    assert hooks.checked == 2 and hooks.material == 2
    assert hooks.calls == 2 * 2  # once per objective per step


# ---------------------------------------------------------------- optimizers and their closures
class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation as davda54/sam does it: ascend to ``p + rho g / ||g||``, clear the
    gradients, re-evaluate them through the closure, step from ``p`` with them.

    ``through_data`` changes parameters and gradients through ``.data`` only (no version counter moves);
    ``from_step`` behaves as plain SGD before that step (the closure called first, as torch does).
    """

    def __init__(self, params, lr: float = 1.0, rho: float = 0.05, through_data=False, from_step=0):
        super().__init__(params, {"lr": lr, "rho": rho})
        self.through_data, self.from_step, self.steps = through_data, from_step, 0

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is not None, "SAM needs a closure"
        self.steps += 1
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.steps <= self.from_step:
            with torch.enable_grad():
                closure()
            for p in params:
                p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
            return None
        norm = torch.stack([p.grad.norm() for p in params]).norm()
        for p in params:
            e = self.param_groups[0]["rho"] * p.grad / (norm + 1e-12)
            self.state[p]["e"] = e
            (p.data if self.through_data else p).add_(e)
            if self.through_data:
                p.grad.data.zero_()
        if not self.through_data:
            self.zero_grad()
        with torch.enable_grad():
            closure()
        for p in params:
            p.data.sub_(self.state[p]["e"])
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        return None


class ClosureFirstSGD(torch.optim.Optimizer):
    """An optimizer from outside torch.optim that calls its closure first, reads the loss value, then
    takes an SGD step: served exactly, the closure returning the window's loss."""

    def __init__(self, params, lr: float = 1.0) -> None:
        super().__init__(params, {"lr": lr})
        self.losses: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = float(closure())
        self.losses.append(loss)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


class NoClosureSGD(ClosureFirstSGD):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class WithOptimizer(Net):
    def __init__(self, make, nan_batches=()) -> None:
        super().__init__()
        self.make, self.nan_batches = make, set(nan_batches)

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        if batch_idx in self.nan_batches:
            losses["audio"] = losses["audio"] * float("nan")
        return losses

    def configure_optimizers(self):
        return self.make(self.parameters())


def test_lbfgs_is_refused_at_fit_start() -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(
        MisconfigurationException, match=r"LBFGS re-evaluates the loss.*first-order optimizer"
    ):
        trainer.fit(WithOptimizer(lambda p: torch.optim.LBFGS(p)), make_loader(2))


@pytest.mark.parametrize("through_data", [False, True])
def test_a_sam_style_optimizer_is_refused_and_the_parameters_are_restored(through_data: bool) -> None:
    model = WithOptimizer(lambda p: SAM(p, through_data=through_data))
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(max_steps=2, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(
        MisconfigurationException, match=r"SAM changed .*before calling its closure.*restored"
    ):
        trainer.fit(model, make_loader(2))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_sam_style_optimizer_that_starts_later_is_refused_on_that_step() -> None:
    # The first step is checked against a copy of the parameters; later steps by version counters.
    model = WithOptimizer(lambda p: SAM(p, from_step=1))
    trainer = pl.Trainer(max_steps=3, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=r"SAM changed parameter 'audio\.0\.weight' before"):
        trainer.fit(model, make_loader(2, size=48))
    assert trainer.global_step == 1


def test_a_skipped_step_never_calls_the_optimizer_and_the_next_step_is_checked() -> None:
    model = WithOptimizer(lambda p: SAM(p), nan_batches=[0])
    trainer = pl.Trainer(max_steps=3, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with (
        pytest.warns(RuntimeWarning, match="non-finite"),
        pytest.raises(MisconfigurationException, match="SAM"),
    ):
        trainer.fit(model, make_loader(2, size=48))
    assert trainer.global_step == 1  # the skipped step counted; SAM refused on the next one


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_optimizer_calling_its_closure_first_is_exact_and_gets_the_windows_loss(accumulate: int) -> None:
    torch.manual_seed(0)
    checker, recorder = StepChecker(), LossRecorder()
    callbacks = [MMParetoCallback(accumulate_grad_batches=accumulate), recorder]
    model = WithOptimizer(lambda p: ClosureFirstSGD(p))
    trainer = pl.Trainer(
        max_steps=2, callbacks=[*callbacks, *([checker] if accumulate == 1 else [])], **trainer_kwargs()
    )
    trainer.fit(model, make_loader(2, size=64))
    assert checker.checked == (2 if accumulate == 1 else 0)
    # The closure returns the loss whose gradient the step applies: the window's mean of summed losses,
    # as float32: each batch's (float32) loss divided by the window's length (a power of two: exact),
    # added in float32 (gamma(n - 1) of the magnitudes), against the float64 mean here (exact for one).
    windows = [recorder.losses[i : i + accumulate] for i in range(0, len(recorder.losses), accumulate)]
    assert len(trainer.optimizers[0].losses) == len(windows) == 2
    for got, window in zip(trainer.optimizers[0].losses, windows, strict=True):
        bound = gamma(len(window) - 1) * sum(abs(v) for v in window) / accumulate
        assert_within(got, math.fsum(window) / accumulate, bound, "the closure's loss")


def test_an_optimizer_that_never_calls_its_closure_is_refused() -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="NoClosureSGD did not call the closure"):
        trainer.fit(WithOptimizer(lambda p: NoClosureSGD(p)), make_loader(2))


# ---------------------------------------------------------------- outputs the capture cannot see
class Box:
    """An output container of a type the capture does not look into."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features


class BoxEncoder(nn.Module):
    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.linear, self.mode = nn.Linear(dim, 8), mode

    def forward(self, x: torch.Tensor):
        z = torch.tanh(self.linear(x))
        if self.mode == "box":
            return Box(z)
        if self.mode == "nested":
            return z, Box(2 * z)
        self.features = z  # "stash": kept on the module, read by the heads
        return z


class UncapturedNet(Net):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.audio = BoxEncoder(5, mode)

    def losses(self, batch):
        xa, xv, y = batch
        out, zv = self.audio(xa), self.visual(xv)
        za = {
            "box": lambda: out.features,
            "nested": lambda: out[1].features,
            "stash": lambda: self.audio.features,
        }
        za = za[self.mode]()
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([za, zv], 1)), y),
            "audio": F.cross_entropy(self.head_audio(za), y),
            "visual": F.cross_entropy(self.head_visual(zv), y),
        }


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("box", r"Encoder 'audio' returned its output inside a Box object.*make Box a dataclass"),
        ("nested", r"'multimodal' depends on encoder 'audio', but not through.*inside a Box object"),
        ("stash", r"'multimodal' depends on encoder 'audio', but not through.*stashed on the module"),
    ],
)
def test_an_output_the_capture_cannot_see_is_named_with_the_fix(mode: str, message: str) -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=[MMParetoCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=message) as error:
        trainer.fit(UncapturedNet(mode), make_loader(2))
    assert "does not depend" not in str(error.value) and "return" in str(error.value)
