"""Data-parallel fits checked step by step: every rank records what each optimizer step saw and where it
ended (:class:`StepRecorder`), and the test replays every step in its own process from the recorded
state (:func:`check_recorded_fit`), holding the ranks to a stated bound.

Why step by step, not one whole fit against another: a float32 difference at one step changes the next
step's gradients through the model, by an amount that no round-off analysis bounds without the model's
Lipschitz constants. From the same state, one step is a short computation whose round-off is stated:

* each rank's per-loss gradients are the same numbers here: the same autograd operations on the same batch
  (a fresh copy, as the DataLoader hands it over) with one intra-op thread on both sides (the recorder sets
  it on the ranks, the replay for itself), which the split reproduces exactly (``_exact``);
* the window's sum (``accumulate > 1``, every loss divided by ``accumulate`` as the callback does) adds
  micro-batches' float32 gradients one at a time: for encoder objectives the replay does the same
  additions (two terms per addition: ``a + b = b + a``, so the order is immaterial);
* two ranks' mean is one float32 rounding of the exact ``(a + b) / 2`` whichever way it is computed (DDP
  halves then adds, the package's all-reduce adds then halves; halving is exact while the halves stay
  normal, which is checked): the replay's ``(a + b) / 2`` gives the same bits;
* so the rule sees the replay's float32 gradients, and :func:`_reference.h_bound` bounds the rest;
* heads get the ordinary backward of the summed losses; a head parameter reached by one loss gets that
  loss's gradient (the same operations), then ``gamma(n - 1)`` for the window's ``n`` micro-batches and
  one rounding for the mean (plus two roundings into the subnormal range); a head parameter several
  losses reach is refused (their cotangents meet inside the backward, where no stated bound holds);
* the optimizer step: :func:`_bounds.momentum_sgd` and ``_exact.assert_moved_by``.

The decisions (conflict, Pareto stationarity) are compared where the allowed Gram round-off cannot flip
them, which is checked per step.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import numpy as np
import torch
from _bounds import U64, assert_halving_exact, assert_within, gamma, momentum_sgd
from _exact import ExpectedUpdate, assert_moved_by, per_loss_gradients, real
from _reference import (
    SOLVER_RIDGE,
    decision_sensitivity,
    gram_error_bound,
    h_bound,
    kkt_alpha_is_optimal,
    min_norm_weights,
    reference_rule,
    underflow_round_off,
)
from torch import nn

from mmpareto_lightning import MMParetoCallback

LossFn = Callable[[nn.Module], Mapping[str, torch.Tensor]]


class StepRecorder(pl.Callback):
    """Records on every rank, per optimizer step, the window's batches (with their index and epoch), the
    parameters, momentum buffers and MMPareto counters after the step; saved as ``steps<rank>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.steps: list[dict] = []
        self._window: list[dict] = []
        self._global_step = 0

    def setup(self, trainer, pl_module, stage) -> None:
        # The test process replays with one intra-op thread (conftest.py): so do the ranks.
        torch.set_num_threads(1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._global_step = trainer.global_step
        self._window.append(
            {
                "batch": [t.detach().cpu().clone() for t in batch],
                "batch_idx": batch_idx,
                "epoch": trainer.current_epoch,
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._global_step:
            return  # the accumulation window is still open
        names = {id(p): n for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        callback = next(c for c in trainer.callbacks if isinstance(c, MMParetoCallback))
        self.steps.append(
            {
                "window": self._window,
                "params": {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()},
                "momentum": {
                    names[id(p)]: s["momentum_buffer"].detach().cpu().clone()
                    for p, s in state.items()
                    if s.get("momentum_buffer") is not None
                },
                "totals": copy.deepcopy(callback.totals),
            }
        )
        self._window = []

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.steps, os.path.join(self.directory, f"steps{trainer.global_rank}.pt"))


@dataclass
class ReplayedStep:
    """What one optimizer step should have done, from the ranks' windows at one state.

    Attributes:
        gradient: parameter name -> the gradient the optimizer receives (float64), with ``.bounds``.
        skipped: names of the parameters no rank's loss reached (SGD skips them).
        conflict: encoder -> (conflict, whether the allowed Gram round-off cannot flip it).
        not_stationary: encoder -> the exact min-norm point is clear of the stationarity test even
            with the allowed Gram round-off (so the step must not count as stationary).
        losses: per rank, per micro-batch: loss name -> the float32 loss value the rank computed.
    """

    gradient: ExpectedUpdate
    skipped: set[str]
    conflict: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    not_stationary: dict[str, bool] = field(default_factory=dict)
    losses: list[list[dict[str, float]]] = field(default_factory=list)


def _decisions(info: dict, numels: list[int], stationarity_tol: float) -> tuple[bool, bool, bool]:
    """(conflict, conflict is robust, not stationary robustly) under the package's Gram bound.

    Each Gram entry of the encoder errs by at most ``E_ij = sum_t gram_error_bound(numel_t) A_tij`` per
    tensor (``A`` the sums of absolute products) plus ``gamma(T) sum_t A_tij`` for adding the ``T``
    tensors' entries in float64. The conflict test reads the signs of the off-diagonal entries: it cannot
    flip where ``|G_ij| > E_ij``. Stationarity compares the min-norm value ``v = min alpha^T G alpha``
    over the simplex with ``tol**2 max_i G_ii``: a perturbation ``E`` moves ``v`` by at most
    ``max_ij E_ij`` (``alpha`` sums to 1) and the diagonal by as much. The package evaluates ``v`` in
    float64 from its weights: sixteen roundings of a quadratic form bounded by ``max |G|``; for ``K > 2``
    its weights are exact for ``G + 1e-12 tr(G) I`` (``v`` moves by at most ``1e-12 tr(G)``) and carry
    the solve's error ``d <= cond * gamma(4 K)`` (``cond`` of the bordered KKT system on the optimal
    support): ``v`` is stationary in ``alpha`` at the optimum, so that moves it by ``K d**2 max |G|``.
    """
    gram, absolute = info["gram"], info["absolute"]
    k = gram.shape[0]
    err = sum(gram_error_bound(n) * absolute[t] for t, n in enumerate(numels))
    err = err + gamma(len(numels), U64) * absolute.sum(0)
    off = [(i, j) for i in range(k) for j in range(i + 1, k)]
    conflict = any(gram[i, j] <= 0 for i, j in off)
    robust = all(abs(gram[i, j]) > err[i, j] for i, j in off)
    largest_entry = float(np.abs(gram).max())
    slack = float(err.max()) + gamma(16, U64) * largest_entry
    if k == 2:
        a, b, c = gram[0, 0], gram[0, 1], gram[1, 1]
        value = a if b >= a else c if b >= c else (a * c - b * b) / (a + c - 2 * b)
    else:
        alpha = min_norm_weights(gram)
        value = float(alpha @ gram @ alpha)
        support = np.flatnonzero(alpha > 0)
        size, trace = len(support), float(np.trace(gram))
        system = np.zeros((size + 1, size + 1))
        system[:size, :size] = gram[np.ix_(support, support)] / trace + SOLVER_RIDGE * np.eye(size)
        system[:size, size], system[size, :size] = -1.0, 1.0
        d = np.linalg.cond(system) * gamma(4 * k, U64)
        slack += SOLVER_RIDGE * trace + k * d**2 * largest_entry
    largest = float(np.diag(gram).max())
    not_stationary = value - slack > stationarity_tol**2 * (largest + slack)
    return conflict, robust, not_stationary


def replay_step(
    model: nn.Module,
    encoders: Mapping[str, nn.Module],
    windows: Sequence[Sequence[LossFn]],
    accumulate: int = 1,
    multimodal_key: str = "multimodal",
    stationarity_tol: float = 1e-3,
) -> ReplayedStep:
    """The gradient one optimizer step of a two-rank data-parallel fit applies, with its bound.

    Args:
        model: the model in its state before the step (not changed).
        encoders: name -> encoder module of ``model``.
        windows: per rank, the loss functions of the window's micro-batches (each computes the named
            losses that rank's ``training_step`` returns on that micro-batch).
        accumulate: the callback's ``accumulate_grad_batches`` (every loss is divided by it).
        multimodal_key: the multimodal loss's name.
        stationarity_tol: the callback's stationarity tolerance.
    """
    world = len(windows)
    assert world == 2, "the mean's bits are one rounding of the exact mean for two ranks only"
    named = list(model.named_parameters())
    params = [p for _, p in named if p.requires_grad]
    param_names = [n for n, p in named if p.requires_grad]
    index = {id(p): i for i, p in enumerate(params)}
    eta = underflow_round_off(torch.float32)

    encoder_ids = {id(p) for module in encoders.values() for p in module.parameters()}
    sums: list[dict[str, list[torch.Tensor | None]]] = []  # per rank: loss -> window sum per parameter
    heads: list[list[tuple[np.ndarray, np.ndarray] | None]] = []  # per rank: (value, bound) per parameter
    losses: list[list[dict[str, float]]] = []
    for fns in windows:
        acc: dict[str, list[torch.Tensor | None]] = {}
        parts: list[list[list[np.ndarray]]] = [[] for _ in params]  # per parameter, per micro-batch
        seen: list[dict[str, float]] = []
        for fn in fns:

            def scaled(m: nn.Module, fn: LossFn = fn, seen: list = seen) -> dict[str, torch.Tensor]:
                values = dict(fn(m))
                seen.append({k: float(v.detach()) for k, v in values.items()})
                return {k: v / accumulate for k, v in values.items()} if accumulate > 1 else values

            grads = per_loss_gradients(model, scaled)
            for loss, gl in grads.items():
                window = acc.setdefault(loss, [None] * len(params))
                for i, g in enumerate(gl):
                    if g is not None:
                        window[i] = g if window[i] is None else window[i] + g
            for i in range(len(params)):
                contributions = [real(gl[i]).double().numpy() for gl in grads.values() if gl[i] is not None]
                if contributions:
                    parts[i].append(contributions)
        rank_heads: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i, pieces in enumerate(parts):
            if not pieces or id(params[i]) in encoder_ids:
                rank_heads.append(None)
                continue
            # The summed backward adds several losses' cotangents wherever their paths meet and rounds
            # J^T (c_1 + c_2) there, not J^T c_1 + J^T c_2: no stated bound covers a head parameter that
            # several losses reach, so none may (one loss: the same operations as its own gradient).
            assert all(len(c) == 1 for c in pieces), f"{param_names[i]} is reached by several losses"
            micro = [c[0] for c in pieces]  # the window adds its micro-batches' float32 gradients
            rank_heads.append((sum(micro), gamma(len(micro) - 1) * sum(np.abs(v) for v in micro)))
        sums.append(acc)
        heads.append(rank_heads)
        losses.append(seen)

    gradient = ExpectedUpdate()
    names = {id(p): n for n, p in named}
    skipped = {n for n, p in named if not p.requires_grad}
    for n, p in named:
        gradient[n] = np.zeros(tuple(real(p).shape))
        gradient.bounds[n] = np.zeros(tuple(real(p).shape))
    step = ReplayedStep(gradient, skipped, losses=losses)

    for enc, module in encoders.items():
        ids = [index[id(p)] for p in module.parameters() if p.requires_grad]
        reaching: list[str] = []
        for acc in sums:
            reaching += [
                o for o, gl in acc.items() if o not in reaching and any(gl[i] is not None for i in ids)
            ]
        if not ids or not reaching:
            skipped |= {names[id(params[i])] for i in ids}  # no rank called it: no gradient
            continue
        objectives = [multimodal_key, enc, *[o for o in reaching if o not in (multimodal_key, enc)]]
        per_objective = []
        for o in objectives:
            means = []
            for i in ids:
                parts = [
                    acc[o][i] if o in acc and acc[o][i] is not None else torch.zeros_like(params[i])
                    for acc in sums
                ]
                total = parts[0] + parts[1]
                assert_halving_exact(*parts, total)
                means.append(real(total / world))
            per_objective.append(means)
        h, info = reference_rule(per_objective)
        if len(objectives) > 2 and info["conflict"]:  # the reference's own min-norm weights are optimal
            assert kkt_alpha_is_optimal(info["gram"], info["weights"] / len(objectives))
        numels = [real(params[i]).numel() for i in ids]
        bounds = h_bound(per_objective, info, decision_sensitivity(info, numels))
        for i, ht, bt in zip(ids, h, bounds, strict=True):
            shape = tuple(real(params[i]).shape)
            gradient[names[id(params[i])]] = ht.reshape(shape)
            gradient.bounds[names[id(params[i])]] = bt.reshape(shape)
        conflict, robust, not_stationary = _decisions(info, numels, stationarity_tol)
        step.conflict[enc] = (conflict, robust)
        step.not_stationary[enc] = not_stationary

    for i, p in enumerate(params):
        if id(p) in encoder_ids:
            continue
        ranks = [h[i] for h in heads if h[i] is not None]
        if not ranks:
            skipped.add(names[id(p)])
            continue
        total = sum(v for v, _ in ranks)
        carried = sum(b for _, b in ranks)
        mean = total / world
        # DDP halves each rank's float32 gradient and adds the halves: one rounding of the mean, plus an
        # absolute eta for each halving that lands in the subnormal range.
        gradient[names[id(p)]] = mean
        gradient.bounds[names[id(p)]] = (
            carried / world + gamma(1) * (np.abs(mean) + carried / world) + 2 * eta
        )
    return step


def _load(make_model: Callable[[], nn.Module], params: Mapping[str, torch.Tensor]) -> nn.Module:
    model = make_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model


def check_recorded_fit(
    directory: str,
    make_model: Callable[[], nn.Module],
    loss_fn: Callable[[int, dict], LossFn],
    momentum: float,
    lr: float,
    accumulate: int = 1,
    world: int = 2,
) -> list[ReplayedStep]:
    """Replay every optimizer step of a recorded fit and hold the ranks to the bounds.

    Checks that the ranks end every step bitwise equal (parameters, momentum buffers, counters), that
    every step moved the parameters and buffers as the replay says within the bound, and that the
    counters grew by the replay's decisions wherever those are robust.

    Args:
        directory: where :class:`StepRecorder` saved ``steps<rank>.pt``.
        make_model: builds the model in its initial state (the fit's starting point).
        loss_fn: ``(rank, window entry) -> loss function`` for one micro-batch of that rank (the entry
            has ``batch``, ``batch_idx`` and ``epoch``).
        momentum, lr: the SGD settings of the fit.
        accumulate: the callback's ``accumulate_grad_batches``.

    Returns:
        The replayed steps (with the ranks' loss values and the decisions).
    """
    ranks = [torch.load(os.path.join(directory, f"steps{r}.pt"), weights_only=False) for r in range(world)]
    assert all(len(r) == len(ranks[0]) for r in ranks) and ranks[0]
    for s, recorded in enumerate(zip(*ranks, strict=True)):
        first = recorded[0]
        for other in recorded[1:]:
            for n, v in first["params"].items():
                assert torch.equal(v, other["params"][n]), f"step {s}: {n} differs between ranks"
            assert first["momentum"].keys() == other["momentum"].keys()
            for n, v in first["momentum"].items():
                assert torch.equal(v, other["momentum"][n]), f"step {s}: momentum of {n} differs"
            assert first["totals"] == other["totals"], f"step {s}: counters differ between ranks"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (StepRecorder.setup), whatever the test process uses
    try:
        return _replay_recorded(ranks, make_model, loss_fn, momentum, lr, accumulate, world)
    finally:
        torch.set_num_threads(threads)


def _replay_recorded(ranks, make_model, loss_fn, momentum, lr, accumulate, world) -> list[ReplayedStep]:
    replayed = []
    params = dict(make_model().named_parameters())
    buffers: dict[str, torch.Tensor] = {}
    totals = None
    for s, recorded in enumerate(zip(*ranks, strict=True)):
        before = _load(make_model, params)
        windows = [[loss_fn(r, entry) for entry in recorded[r]["window"]] for r in range(world)]
        encoders = before.mmpareto_encoders()
        step = replay_step(before, encoders, windows, accumulate)
        update, expected_buffers = momentum_sgd(step.gradient, buffers, momentum, lr, step.skipped)
        after = _load(make_model, recorded[0]["params"])
        try:
            assert_moved_by(after, before, update)
        except AssertionError as error:
            raise AssertionError(f"step {s}: {error}") from None
        assert recorded[0]["momentum"].keys() == expected_buffers.keys(), f"step {s}: momentum buffers"
        for n, value in expected_buffers.items():
            got = real(recorded[0]["momentum"][n]).double().numpy()
            assert_within(got, value, expected_buffers.bounds[n], f"step {s}: momentum buffer of {n}")
        new = recorded[0]["totals"]
        for enc in encoders:
            old = totals[enc] if totals is not None else {"conflicts": 0, "stationary": 0}
            if enc not in step.conflict:  # no rank called it: nothing counted
                assert new[enc] == old, f"step {s}: {enc} counted without a gradient"
                continue
            conflict, robust = step.conflict[enc]
            if robust:
                assert new[enc]["conflicts"] - old["conflicts"] == int(conflict), f"step {s}: {enc} conflict"
            if step.not_stationary[enc]:
                assert new[enc]["stationary"] == old["stationary"], f"step {s}: {enc} stationary"
        totals = new
        params = recorded[0]["params"]
        buffers = recorded[0]["momentum"]
        replayed.append(step)
    return replayed
