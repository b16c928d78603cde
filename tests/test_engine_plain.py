"""The framework-free engine in a hand-written PyTorch loop (no Lightning)."""

from __future__ import annotations

import copy

import pytest
import torch
from _exact import assert_moved_by, expected_deltas
from _models import MultiModalNet, make_loader
from _reference import underflow_round_off

from mmpareto_lightning import GradientSplitter, GradientSplittingError, MMParetoEngine, RuleConfig


def _direct(model: MultiModalNet, batch) -> dict[str, list[torch.Tensor]]:
    losses = model.losses(batch)
    params = list(model.parameters())
    return {
        n: [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(
                params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), strict=True
            )
        ]
        for n, loss in losses.items()
    }


@pytest.mark.parametrize("use_scaler", [False, True])
def test_plain_loop_step_matches_reference(use_scaler: bool) -> None:
    torch.manual_seed(0)
    model = MultiModalNet(n=2, dropout=0.0)
    model.train()
    reference_model = copy.deepcopy(model)
    batch = next(iter(make_loader(2)))
    engine = MMParetoEngine(model.mmpareto_encoders())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None

    optimizer.zero_grad(set_to_none=True)
    with engine.capture():
        losses = model.losses(batch)
    if scaler is None:
        engine.backward(losses)
    else:
        engine.backward(losses, backward_fn=lambda t: scaler.scale(t).backward(), scale_fn=scaler.scale)
    stats = engine.integrate()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    assert set(stats) == {"audio", "visual"}

    # Against plain autograd per loss and the float64 rule, within the bound of _exact (the rule's
    # round-off for encoders, the float32 sum of the losses for heads, SGD's rounding). The scaler's
    # 2**10 is a power of two: scaling the loss scales every rounded step of the backward, the rule's
    # write and the unscale exactly (rounding commutes with a power-of-two scale), so its update is the
    # unscaled one; the one rounding that does not commute is a result in the subnormal range, off by at
    # most eta absolute for the write of the scaled h and once more for its unscale.
    expected = expected_deltas(reference_model, lambda m: m.mmpareto_encoders(), lambda m: m.losses(batch))
    if scaler is not None:
        eta = underflow_round_off(torch.float32)
        for name in expected:
            expected.bounds[name] = expected.bounds[name] + 2 * eta
    assert_moved_by(model, reference_model, expected)


def test_scaler_skips_a_step_with_an_infinite_gradient() -> None:
    torch.manual_seed(0)
    model = MultiModalNet(n=2)
    before = copy.deepcopy(model)
    engine = MMParetoEngine(model.mmpareto_encoders())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = next(iter(make_loader(2)))
    with engine.capture():
        losses = model.losses(batch)
    losses["audio"] = losses["audio"] * float("inf")
    engine.backward(losses, backward_fn=lambda t: scaler.scale(t).backward(), scale_fn=scaler.scale)
    stats = engine.integrate()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf, skipped and backed off
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not bool(engine.all_finite(stats, model.parameters()))
    assert engine.non_finite_losses() == ["audio"]


def test_splitter_gives_exact_per_loss_gradients_and_leaves_unimodal_in_grad() -> None:
    torch.manual_seed(1)
    model = MultiModalNet(n=3, extra_loss=True, dropout=0.0)
    reference_model = copy.deepcopy(model)
    splitter = GradientSplitter(model.mmpareto_encoders())
    batch = next(iter(make_loader(3)))
    with splitter.capture():
        losses = model.losses(batch)
    layouts = splitter.backward(losses)
    grads = _direct(reference_model, batch)
    index = {id(p): i for i, p in enumerate(reference_model.parameters())}
    for name, encoder in reference_model.mmpareto_encoders().items():
        layout = layouts[name]
        expected_objectives = ["multimodal", name, *(["align"] if name in ("audio", "visual") else [])]
        assert layout.objectives == expected_objectives
        for objective, grad_list in zip(layout.objectives, layout.grads, strict=True):
            flat = torch.cat([g.reshape(-1) for g in grad_list])
            expected = torch.cat([grads[objective][index[id(p)]].reshape(-1) for p in encoder.parameters()])
            # Bitwise: the split runs the same autograd operations on the same numbers as
            # torch.autograd.grad of the loss (the heads' backward to the encoder's output, then the
            # encoder's), in the same order, so whatever CPU runs both rounds them alike.
            assert torch.equal(flat, expected), (name, objective)
        # .grad of the encoder is the unimodal gradient until the rule runs.
        for p, q in zip(model.mmpareto_encoders()[name].parameters(), encoder.parameters(), strict=True):
            assert torch.equal(p.grad, grads[name][index[id(q)]]), name
    # Heads get the plain gradient of the summed losses. The fusion head is reached by the multimodal
    # loss alone (the others are zero there), so the summed backward runs that loss's operations: bitwise.
    for p, q in zip(model.head.parameters(), reference_model.head.parameters(), strict=True):
        reaching = [g[index[id(q)]] for g in grads.values() if bool(g[index[id(q)]].any())]
        assert len(reaching) == 1
        assert torch.equal(p.grad, reaching[0])


def test_encoder_not_called_inside_capture() -> None:
    model = MultiModalNet(n=2)
    splitter = GradientSplitter(model.mmpareto_encoders())
    losses = model.losses(next(iter(make_loader(2))))  # forward outside capture()
    with pytest.raises(GradientSplittingError, match="produced no output"):
        splitter.backward(losses)


def test_encoder_named_like_the_multimodal_loss() -> None:
    model = MultiModalNet(n=2)
    with pytest.raises(GradientSplittingError, match="also the multimodal loss's key"):
        GradientSplitter({"multimodal": model.encoders["audio"]})


def test_engine_rule_config_is_used() -> None:
    model = MultiModalNet(n=2)
    engine = MMParetoEngine(model.mmpareto_encoders(), RuleConfig(strategy="uniform"))
    with engine.capture():
        losses = model.losses(next(iter(make_loader(2))))
    engine.backward(losses)
    stats = engine.integrate()
    for s in stats.values():
        assert s.alphas.tolist() == [0.5, 0.5]


class TupleEncoder(torch.nn.Module):
    """Returns (features, auxiliary) and is called once per view: two calls, four captured outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(5, 8)
        self.aux = torch.nn.Linear(8, 2)

    def forward(self, x):
        z = torch.tanh(self.body(x))
        return z, self.aux(z)


class TwoViewNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = TupleEncoder()
        self.visual = torch.nn.Linear(7, 8)
        self.head = torch.nn.Linear(16, 3)
        self.head_audio = torch.nn.Linear(8 + 2, 3)
        self.head_visual = torch.nn.Linear(8, 3)

    def losses(self, batch):
        xa, xv, y = batch
        (za1, aux1), (za2, _aux2) = self.audio(xa), self.audio(xa.flip(0))  # the second aux is unused
        zv = self.visual(xv)
        ce = torch.nn.functional.cross_entropy
        return {
            "multimodal": ce(self.head(torch.cat([za1 + za2, zv], 1)), y),
            "audio": ce(self.head_audio(torch.cat([za1, aux1], 1)), y),
            "visual": ce(self.head_visual(zv), y),
        }


def test_tuple_outputs_and_repeated_encoder_calls_split_exactly() -> None:
    torch.manual_seed(0)
    model = TwoViewNet()
    reference_model = copy.deepcopy(model)
    batch = next(iter(make_loader(2)))
    splitter = GradientSplitter({"audio": model.audio, "visual": model.visual})
    with splitter.capture():
        losses = model.losses(batch)
    layouts = splitter.backward(losses)
    losses = reference_model.losses(batch)
    for name, module in (("audio", reference_model.audio), ("visual", reference_model.visual)):
        params = list(module.parameters())
        for objective, grad_list in zip(layouts[name].objectives, layouts[name].grads, strict=True):
            flat = torch.cat([g.reshape(-1) for g in grad_list])
            grads = torch.autograd.grad(losses[objective], params, retain_graph=True, allow_unused=True)
            expected = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
            # Bitwise, as above: the two calls' contributions into a parameter are one float32 addition
            # in either computation (two terms: a + b = b + a), the same autograd operations otherwise.
            assert torch.equal(flat, expected), (name, objective)


def test_changing_losses_within_an_accumulation_window_is_refused() -> None:
    model = MultiModalNet(n=2)
    engine = MMParetoEngine(model.mmpareto_encoders())
    batches = iter(make_loader(2))
    with engine.capture():
        losses = model.losses(next(batches))
    engine.backward(losses)
    model.extra_loss = True  # the next batch adds an "align" loss reaching both encoders
    with engine.capture():
        losses = model.losses(next(batches))
    with pytest.raises(GradientSplittingError, match="changed within an accumulation window"):
        engine.backward(losses, accumulate=True)
