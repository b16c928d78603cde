"""``torch.compile``'d encoders and heads give the update plain autograd gives on the uncompiled model.

The split differentiates the heads and the encoders more than once per step (the cotangents and the
extra VJP keep the graph, then the ordinary backward runs), which a compiled region whose backward
donates its saved activations cannot do (see ``mmpareto_lightning/engine/compiled.py``). The encoders
here return ``(tokens, tokens[:, 0])``, the shape of output that broke; the last batch is smaller, so
torch recompiles with dynamic shapes mid-fit, where the backward graph is lowered at once. Every step is
held exactly to the rule on the compiled model's own per-loss gradients, and loosely to an uncompiled
twin (see :class:`AgainstTheUncompiledTwin`).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch._functorch.config as functorch_config
import torch.compiler.config as compiler_config
import torch.nn.functional as F
from _bounds import U32, assert_within, gamma
from _exact import ExpectedUpdate, expected_deltas, recorded_gradients
from _models import trainer_kwargs
from _reference import decision_sensitivity, h_bound, reference_rule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmpareto_lightning import MMParetoCallback, MMParetoModule
from mmpareto_lightning.engine.compiled import CACHE_TAG, RetainedGraphCompile

CLASSES, TOKENS, WIDTH = 3, 5, 16


class TokenEncoder(nn.Module):
    """A one-layer transformer returning the tokens and the first token, computed from them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, WIDTH)
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.layer(self.embed(x))
        return tokens, tokens[:, 0]


class TokenNet(MMParetoModule):
    """Two token encoders; ``compiled``: audio as ``torch.compile(encoder)``, visual compiled in place
    (``encoder.compile()``) and the fusion head as ``torch.compile(head)``."""

    def __init__(self, compiled: bool = False, backend: str = "inductor") -> None:
        super().__init__()
        self.audio, self.visual = TokenEncoder(6), TokenEncoder(7)
        self.head = nn.Sequential(nn.Linear(2 * WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, CLASSES))
        self.head_audio, self.head_visual = nn.Linear(WIDTH, CLASSES), nn.Linear(WIDTH, CLASSES)
        if compiled:
            self.audio = torch.compile(self.audio, backend=backend)
            self.visual.compile(backend=backend)
            self.head = torch.compile(self.head, backend=backend)

    def mmpareto_encoders(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "visual": self.visual}

    def losses(self, batch) -> dict[str, torch.Tensor]:
        xa, xv, y = batch
        (ta, pa), (tv, pv) = self.audio(xa), self.visual(xv)
        return {
            "multimodal": F.cross_entropy(self.head(torch.cat([pa, pv], 1)), y),
            "audio": F.cross_entropy(self.head_audio(ta.mean(1)), y),
            "visual": F.cross_entropy(self.head_visual(tv.mean(1) + pv), y),
        }

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        if getattr(self, "record", False):
            # Each loss's gradient on the step's own graph, through the compiled regions' own backward
            # (the split's graph-keeping calls run inside this capture block too, under the same settings).
            self.recorded = recorded_gradients(losses, list(self.parameters()))
        return losses

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


LR = 0.1


def _plain(name: str) -> str:
    return name.replace("_orig_mod.", "")


def _loader(size: int = 20, seed: int = 0) -> DataLoader:
    # 20 samples in batches of 8: the last batch of 4 makes torch recompile with dynamic shapes.
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(size, TOKENS, 6, generator=gen),
        torch.randn(size, TOKENS, 7, generator=gen),
        torch.randint(0, CLASSES, (size,), generator=gen),
    )
    return DataLoader(data, batch_size=8, shuffle=False)


def _expected_from_recorded(model: TokenNet) -> ExpectedUpdate:
    """Parameter name -> the SGD(LR) update from the per-loss gradients the model recorded in its step,
    with the bounds of ``_exact``: the float64 rule's (``_reference.h_bound``) for encoders, the float32
    sum of the losses reaching a head (``gamma(L - 1)`` of their magnitudes), the lr product's rounding."""
    named = list(model.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(named)}
    expected = ExpectedUpdate()
    encoder_ids: set[int] = set()
    for enc_name, encoder in model.mmpareto_encoders().items():
        params = list(encoder.parameters())
        encoder_ids |= {id(p) for p in params}
        per_objective = [[model.recorded[o][index[id(p)]] for p in params] for o in ("multimodal", enc_name)]
        h, info = reference_rule(per_objective)
        bounds = h_bound(per_objective, info, decision_sensitivity(info, [p.numel() for p in params]))
        for p, ht, bt in zip(params, h, bounds, strict=True):
            name = named[index[id(p)]][0]
            expected[name] = -LR * ht.reshape(p.shape)
            expected.bounds[name] = (LR * bt + U32 * LR * np.abs(ht)).reshape(p.shape)
    for i, (name, p) in enumerate(named):
        if id(p) in encoder_ids:
            continue
        gs = [g[i].double().cpu().numpy() for g in model.recorded.values() if bool(g[i].any())]
        total = sum(gs)
        expected[name] = -LR * total
        summed = gamma(len(gs) - 1) * sum(np.abs(g) for g in gs)
        expected.bounds[name] = LR * summed + U32 * LR * np.abs(total)
    return expected


class AgainstTheUncompiledTwin(pl.Callback):
    """Every step, two checks of the compiled model's move (SGD, no momentum: -lr * update).

    * Exact: against the rule on the per-loss gradients it recorded in the step through its own compiled
      regions (the split computes the same gradients with the same compiled backward functions, so the
      bound is the rule's, as in test_end_to_end).
    * Against the update plain autograd and the float64 rule give on an uncompiled twin holding the same
      weights. This difference is not bounded by a stated round-off analysis: Inductor fuses and reorders
      the float32 sums of the forward and the backward (a transformer layer: attention softmax, layer
      norm) in an order this test cannot see, and the twin's error goes through the same layers. The
      tolerance is therefore sized to what the comparison exists to catch (a region whose second backward
      reads overwritten activations, a dropped or doubled path: a whole update): 1e-2 of the tensor's
      largest update, 100 times below such an error (measured deviation: about 1e-5).
    """

    def __init__(self) -> None:
        self.twin = TokenNet(compiled=False)
        self.checked = 0
        self.worst = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.record = True
        self.twin.load_state_dict({_plain(k): v.cpu() for k, v in pl_module.state_dict().items()})
        self.before = {k: p.detach().cpu().clone() for k, p in pl_module.named_parameters()}
        batch = [t.cpu() for t in batch]
        self.expected = expected_deltas(self.twin, lambda m: m.mmpareto_encoders(), lambda m: m.losses(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        exact = _expected_from_recorded(pl_module)
        for name, p in pl_module.named_parameters():
            new = p.detach().cpu().double().numpy()
            moved = new - self.before[name].double().numpy()
            bound = exact.bounds[name] + U32 * (np.abs(new) + np.abs(exact[name])) * (1 + 2 * U32)
            assert_within(moved, exact[name], bound, f"{name}: against its own per-loss gradients")
            want = LR * self.expected[_plain(name)]
            scale = float(np.abs(want).max())
            err = float(np.abs(moved - want).max())
            self.worst = max(self.worst, err / scale if scale else 0.0)
            step_rounding = 2 * U32 * float(np.abs(new).max() + scale)  # p - lr g rounds to float32
            assert err <= 1e-2 * scale + step_rounding, (
                f"{name}: off the uncompiled twin by {err:.3g}, update scale {scale:.3g}"
            )
        self.checked += 1


def _fit(model: TokenNet, callbacks=(), accelerator: str = "cpu") -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[MMParetoCallback(), *callbacks],
        **trainer_kwargs(accelerator=accelerator),
    )
    trainer.fit(model, _loader())
    return trainer


def _twin_weights(compiled: TokenNet) -> TokenNet:
    torch.manual_seed(0)
    plain = TokenNet(compiled=False)
    compiled.load_state_dict({k: plain.state_dict()[_plain(k)] for k in compiled.state_dict()})
    return compiled


@pytest.mark.slow
@pytest.mark.parametrize(
    "accelerator",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_compiled_encoders_and_head_are_exact_and_leave_the_settings_as_they_were(accelerator: str) -> None:
    torch._dynamo.reset()
    donated, tag = functorch_config.donated_buffer, compiler_config.cache_key_tag
    checker = AgainstTheUncompiledTwin()
    _fit(_twin_weights(TokenNet(compiled=True)), callbacks=[checker], accelerator=accelerator)
    assert checker.checked == 3
    assert functorch_config.donated_buffer == donated and compiler_config.cache_key_tag == tag
    print(f"worst relative deviation from the uncompiled twin: {checker.worst:.2e}")


@pytest.mark.slow
def test_a_warm_compile_cache_from_a_plain_run_does_not_leak_into_the_split() -> None:
    # A plain run compiles the same graphs with donated buffers (torch's default) and leaves them in
    # Inductor's on-disk cache, which does not key a backward graph on donation.
    torch._dynamo.reset()
    plain = TokenNet(compiled=True)
    for batch in _loader(seed=1):
        sum(plain.losses(batch).values()).backward()
    torch._dynamo.reset()  # in-memory artifacts gone; the on-disk cache stays warm
    checker = AgainstTheUncompiledTwin()
    _fit(_twin_weights(TokenNet(compiled=True)), callbacks=[checker])
    assert checker.checked == 3


def test_a_region_compiled_with_donated_buffers_before_the_fit_is_refused() -> None:
    torch._dynamo.reset()
    model = _twin_weights(TokenNet(compiled=True, backend="aot_eager"))
    # A plain loop (the user's settings) lowers the backward graphs with donated buffers: at its first
    # backward for the batches of 8, at once for the smaller last batch (dynamic shapes).
    for batch in _loader(seed=1):
        sum(model.losses(batch).values()).backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(MisconfigurationException, match=r"torch\._dynamo\.reset\(\) before the fit"):
        _fit(model)
    torch._dynamo.reset()


def test_the_compile_settings_are_restored_exactly() -> None:
    donated, tag = functorch_config.donated_buffer, compiler_config.cache_key_tag
    try:
        functorch_config.donated_buffer, compiler_config.cache_key_tag = True, "mine"
        with pytest.raises(RuntimeError, match="boom"), RetainedGraphCompile():
            assert functorch_config.donated_buffer is False
            assert compiler_config.cache_key_tag == "mine" + CACHE_TAG
            with RetainedGraphCompile():  # nested: tagged once
                assert compiler_config.cache_key_tag == "mine" + CACHE_TAG
            raise RuntimeError("boom")
        assert functorch_config.donated_buffer is True and compiler_config.cache_key_tag == "mine"
        with RetainedGraphCompile(enabled=False):
            assert functorch_config.donated_buffer is True and compiler_config.cache_key_tag == "mine"
    finally:
        functorch_config.donated_buffer, compiler_config.cache_key_tag = donated, tag


class SettingsSeen(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen = pl_module.settings_in_step


class RecordsSettings(TokenNet):
    def training_step(self, batch, batch_idx):
        self.settings_in_step = (functorch_config.donated_buffer, compiler_config.cache_key_tag)
        return self.losses(batch)


def test_without_compiled_modules_the_users_settings_are_untouched() -> None:
    torch.manual_seed(0)
    model = RecordsSettings(compiled=False)
    seen = SettingsSeen()
    _fit(model, callbacks=[seen])
    assert seen.seen == (functorch_config.donated_buffer, compiler_config.cache_key_tag)
