"""Step-time benchmark: uniform step vs our MMPareto step vs the authors' procedure.

Run ``python benchmarks/step_time.py`` (``--help`` for the flags). One process, one run, the methods
interleaved round by round so that a noisy shared machine slows them all alike:

* ``uniform``: the plain multitask baseline, ``sum(losses).backward()``, one backward.
* ``mmpareto``: our step with the framework-free :class:`~mmpareto_lightning.MMParetoEngine`
  (capture -> backward -> integrate): one forward, the ordinary backward of the summed loss plus one
  extra encoder VJP, the rule as tensor ops without host synchronisation.
* ``authors``: a faithful re-creation of the official ``code/MMPareto.py`` training step: one
  ``backward(retain_graph=True)`` per loss with per-tensor ``.clone()`` of the encoder gradients and a
  ``zero_grad`` after each, ``F.cosine_similarity`` over the concatenated encoder gradient with a
  ``.item()``-style decision, the two-vector min-norm solver on host-synced per-tensor dot products,
  a fourth backward of the summed loss, then the per-tensor rescale
  ``g = 1.5 * max(1, ||g_m + g_u|| / ||2a_m g_m + 2a_u g_u||) * (2a_m g_m + 2a_u g_u)`` into ``.grad``.

Every method times a full training step: ``zero_grad`` + forward + backward(s) + integration +
``SGD(momentum=0.9).step()``. Before anything is timed, the benchmark checks that our engine's
integrated gradients (and the re-created authors' step) equal a direct computation (plain autograd per
loss + :func:`mmpareto_lightning.integrate_gradient_lists`), so it never times a wrong computation.

Also measured: the same two steps through Lightning (a ``Trainer`` with ``MMParetoModule`` +
``MMParetoCallback`` vs an automatic-optimization ``LightningModule`` on the summed loss), peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``torch.distributed._tools.mem_tracker.MemTracker``,
which counts tensor storages), and how the cost scales with 2, 3 and 4 encoders.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpareto_lightning import MMParetoEngine, RuleConfig, integrate_gradient_lists

MULTIMODAL = "multimodal"
LABEL = "label"
NUM_CLASSES = 6  # CREMA-D's six emotions
ENCODER_NAMES = ("audio", "visual", "visual2", "visual3", "visual4", "visual5")
METHODS = ("uniform", "mmpareto", "authors")
GAMMA_AUTHORS = 1.5
CHECK_TOLERANCE = 1e-5  # our engine against the direct computation (it is bit-identical in fp32 on CPU)
# The re-created authors' step takes ||g_m + g_u|| from a separate (fourth) backward and its dot products
# from float32 sums on the host, so it differs from the reference by rounding (about 1e-5 relative for
# ResNet-18 at batch 64); a wrong gamma, weight or rescale would be off by far more than this.
AUTHORS_TOLERANCE = 1e-3
MiB = 2**20


# --------------------------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 with a max-pool and global average pooling: ``(B, C, H, W) -> (B, feature_dim)``.

    BatchNorm is included on purpose: its affine parameters are encoder parameters (as in ResNet-18) and
    its running statistics must be updated by exactly one forward per step.
    """

    def __init__(self, in_channels: int, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def resnet18_encoder(in_channels: int) -> nn.Module:
    """ResNet-18 trunk from scratch with ``in_channels`` inputs and 512 pooled features (the paper's)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if in_channels != 3:
        # The audio encoder takes a one-channel log-mel spectrogram, as in the official model.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


class MultiEncoderNet(nn.Module):
    """MMPareto's multitask layout: per-modality encoders, concat fusion head, one unimodal head each."""

    def __init__(self, encoders: Mapping[str, nn.Module], feature_dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion_head = nn.Linear(feature_dim * len(encoders), num_classes)
        self.unimodal_heads = nn.ModuleDict({n: nn.Linear(feature_dim, num_classes) for n in encoders})

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"multimodal": ..., <encoder>: ...}``; each encoder module is called once (hooks see it)."""
        features = {n: enc(batch[n]) for n, enc in self.encoders.items()}
        target = batch[LABEL]
        fused = self.fusion_head(torch.cat(list(features.values()), dim=1))
        out = {MULTIMODAL: F.cross_entropy(fused, target)}
        for n, z in features.items():
            out[n] = F.cross_entropy(self.unimodal_heads[n](z), target)
        return out

    def encoder_params(self) -> dict[str, list[nn.Parameter]]:
        return {n: [p for p in enc.parameters() if p.requires_grad] for n, enc in self.encoders.items()}

    def head_params(self) -> list[nn.Parameter]:
        return [*self.fusion_head.parameters(), *self.unimodal_heads.parameters()]


@dataclass(frozen=True)
class ModelSpec:
    """Which encoders and inputs a run uses.

    Args:
        kind: ``"small-cnn"`` or ``"resnet18"``.
        image_size: side of the small CNN's square inputs (ignored by ``resnet18``, which uses the
            CREMA-D shapes: audio 1x257x188 fbank, visual 3x224x224 frames).
        width: first convolution width of the small CNN.
    """

    kind: str = "small-cnn"
    image_size: int = 16
    width: int = 16

    def input_shape(self, name: str) -> tuple[int, ...]:
        channels = 1 if name == "audio" else 3
        if self.kind == "resnet18":
            return (1, 257, 188) if name == "audio" else (3, 224, 224)
        return (channels, self.image_size, self.image_size)

    def build(self, n_encoders: int) -> MultiEncoderNet:
        if not 2 <= n_encoders <= len(ENCODER_NAMES):
            raise ValueError(f"Between 2 and {len(ENCODER_NAMES)} encoders are supported, got {n_encoders}.")
        names = ENCODER_NAMES[:n_encoders]
        if self.kind == "resnet18":
            return MultiEncoderNet({n: resnet18_encoder(self.input_shape(n)[0]) for n in names}, 512)
        if self.kind == "small-cnn":
            feature = 2 * self.width
            encoders = {n: SmallCNN(self.input_shape(n)[0], self.width, feature) for n in names}
            return MultiEncoderNet(encoders, feature)
        raise ValueError(f"Unknown model {self.kind!r}; choose 'small-cnn' or 'resnet18'.")


def make_batch(
    spec: ModelSpec, names: Sequence[str], batch_size: int, device: torch.device, seed: int
) -> dict[str, Tensor]:
    """One fixed random batch (reused every step: the benchmark times compute, not data loading)."""
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {n: torch.randn(batch_size, *spec.input_shape(n), generator=gen) for n in names}
    batch[LABEL] = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def build_network_and_batch(
    spec: ModelSpec, n_encoders: int, batch_size: int, device: torch.device, seed: int
) -> tuple[MultiEncoderNet, dict[str, Tensor]]:
    """The seeded initial network (every method copies it) and the fixed batch of one measurement."""
    torch.manual_seed(seed)
    base = spec.build(n_encoders).to(device)
    return base, make_batch(spec, list(base.encoders), batch_size, device, seed)


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    # The paper's CREMA-D optimizer.
    return torch.optim.SGD(net.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)


# --------------------------------------------------------------------------------------------- steps
class Method:
    """One training method: its own copy of the network, its own optimizer, and ``step()``."""

    name = ""

    def __init__(self, net: MultiEncoderNet, batch: Mapping[str, Tensor]) -> None:
        self.net = net
        self.batch = batch
        self.optimizer = make_optimizer(net)

    def step(self) -> None:
        raise NotImplementedError

    def persistent_tensors(self) -> list[Tensor]:
        """State held between steps outside the model and the optimizer (for the CPU memory tracker)."""
        return []

    def close(self) -> None:
        """Release hooks."""


class UniformStep(Method):
    """Plain summed loss, one backward: the baseline every ratio is relative to."""

    name = "uniform"

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.net.losses(self.batch)
        sum(losses.values()).backward()  # type: ignore[union-attr]
        self.optimizer.step()


class EngineStep(Method):
    """Our MMPareto step through the framework-free engine (the engine docstring's loop)."""

    name = "mmpareto"

    def __init__(self, net: MultiEncoderNet, batch: Mapping[str, Tensor], config: RuleConfig | None = None):
        super().__init__(net, batch)
        self.engine = MMParetoEngine(dict(net.encoders.items()), config or RuleConfig())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.engine.capture():
            losses = self.net.losses(self.batch)
        self.engine.backward(losses)
        self.engine.integrate()
        self.optimizer.step()

    def persistent_tensors(self) -> list[Tensor]:
        layouts = self.engine.splitter.layouts.values()
        extra = self.engine.splitter.extra_buffer
        return [
            *(layout.grads[1] for layout in layouts if layout.grads),
            *([extra] if extra is not None else []),
        ]

    def close(self) -> None:
        self.engine.remove_hooks()


def _authors_min_norm_2(vecs: Sequence[Sequence[Tensor]]) -> tuple[float, float]:
    """``MinNormSolver.find_min_norm_element`` for two objectives, as the official code runs it.

    The official call passes ``list(grads[t].values())``: every per-tensor gradient *and* the
    ``"concat"`` entry, so each dot product is accumulated tensor by tensor, each term moved to the host
    with ``.data.cpu()`` (one synchronisation per tensor and dot product). Double counting the concat
    entry scales all three dot products by two and leaves the weights unchanged.
    """
    v1, v2 = vecs

    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        total: Any = 0.0
        for x, y in zip(a, b, strict=True):
            total += torch.mul(x, y).sum().data.cpu()
        return total

    v1v2, v1v1, v2v2 = dot(v1, v2), dot(v1, v1), dot(v2, v2)
    # ``_min_norm_element_from2``: Python comparisons on host values, clamps included.
    if v1v2 >= v1v1:
        c = 0.999
    elif v1v2 >= v2v2:
        c = 0.001
    else:
        c = float(-1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2)))
    return c, 1.0 - c


class AuthorsStep(Method):
    """Re-creation of the training step of the official ``code/MMPareto.py`` (any number of encoders).

    Kept deliberately as the authors wrote it (dicts of clones, host-side decisions, a fourth backward),
    generalised only from the hard-coded audio/visual pair to a loop over encoders.
    """

    name = "authors"

    def __init__(self, net: MultiEncoderNet, batch: Mapping[str, Tensor]) -> None:
        super().__init__(net, batch)
        self.params = net.encoder_params()
        self.conflicts = 0
        self.decisions = 0

    def step(self) -> None:
        net, optimizer = self.net, self.optimizer
        optimizer.zero_grad()
        losses = net.losses(self.batch)
        # The official loop logs every loss with ``.item()`` (three host synchronisations).
        _ = [loss.item() for loss in losses.values()]

        # grads[encoder][loss] = per-tensor clones + the flattened "concat" entry, as in the official code.
        grads: dict[str, dict[str, list[Tensor]]] = {n: {} for n in self.params}
        for loss_name, loss in losses.items():
            loss.backward(retain_graph=True)
            reached = list(self.params) if loss_name == MULTIMODAL else [loss_name]
            for enc in reached:
                clones = [p.grad.data.clone() for p in self.params[enc]]  # type: ignore[union-attr]
                grads[enc][loss_name] = [*clones, torch.cat([g.flatten() for g in clones])]
            optimizer.zero_grad()

        weights: dict[str, tuple[float, float]] = {}
        for enc in self.params:
            g_m, g_u = grads[enc][MULTIMODAL], grads[enc][enc]
            cos = F.cosine_similarity(g_m[-1], g_u[-1], dim=0)
            self.decisions += 1
            if cos > 0:  # a host synchronisation, as ``if(this_cos_audio>0)``
                weights[enc] = (0.5, 0.5)
            else:
                self.conflicts += 1
                weights[enc] = _authors_min_norm_2([g_m, g_u])

        total = sum(losses.values())
        total.backward()  # type: ignore[union-attr]
        for enc, params in self.params.items():
            a_m, a_u = weights[enc]
            g_m, g_u = grads[enc][MULTIMODAL], grads[enc][enc]
            for i, p in enumerate(params):
                three_norm = torch.norm(p.grad.data.clone())  # type: ignore[union-attr]
                new_grad = 2 * a_m * g_m[i] + 2 * a_u * g_u[i]
                new_norm = torch.norm(new_grad)
                diff = three_norm / new_norm
                if diff > 1:  # one host synchronisation per parameter tensor
                    p.grad = diff * new_grad * GAMMA_AUTHORS
                else:
                    p.grad = new_grad * GAMMA_AUTHORS
        optimizer.step()
        _ = total.item()  # ``_loss += loss.item()``


METHOD_CLASSES: dict[str, type[Method]] = {
    "uniform": UniformStep,
    "mmpareto": EngineStep,
    "authors": AuthorsStep,
}


# --------------------------------------------------------------------------------------------- check
@dataclass
class CheckResult:
    """Relative errors (``||a - b|| / ||b||``, worst tensor group) of the pre-check, per variant."""

    engine_error: dict[str, float] = field(default_factory=dict)
    authors_error: dict[str, float] = field(default_factory=dict)
    cos_beta: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        engine_ok = all(e <= CHECK_TOLERANCE for e in self.engine_error.values())
        return engine_ok and all(e <= AUTHORS_TOLERANCE for e in self.authors_error.values())


def _rel_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    num = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, want, strict=True)))
    den = torch.sqrt(sum((b.double() ** 2).sum() for b in want))
    return float(num / den) if den > 0 else float(num)


class _NegatedUnimodal(nn.Module):
    """Wraps a network so that every unimodal loss is negated: the check then hits the conflict branch."""

    def __init__(self, net: MultiEncoderNet) -> None:
        super().__init__()
        self.inner = net

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: (v if k == MULTIMODAL else -v) for k, v in self.inner.losses(batch).items()}


def check_correctness(base: MultiEncoderNet, batch: Mapping[str, Tensor]) -> CheckResult:
    """Compare the engine's and the re-created authors' integrated gradients with a direct computation.

    Two variants run: the natural losses, and the unimodal losses negated (forces ``cos < 0``, so the
    min-norm weights and the rescale are exercised, not only the ``1.5 * (g_m + g_u)`` branch). The
    reference is plain ``torch.autograd.grad`` per loss plus ``integrate_gradient_lists`` with the
    default (authors') rule; heads must get the plain gradient of the summed loss. TF32 is disabled
    during the check so CUDA compares true fp32 results.
    """
    result = CheckResult()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for variant in ("natural", "conflict"):

            def wrap(net: MultiEncoderNet, variant: str = variant) -> Any:
                return net if variant == "natural" else _NegatedUnimodal(net)

            # Reference: one forward, one autograd.grad per loss, the library's rule on plain lists.
            ref_net = copy.deepcopy(base)
            losses = wrap(ref_net).losses(batch)
            want: dict[str, list[Tensor]] = {}
            result.cos_beta[variant] = {}
            for enc, params in ref_net.encoder_params().items():
                g_m = torch.autograd.grad(losses[MULTIMODAL], params, retain_graph=True)
                g_u = torch.autograd.grad(losses[enc], params, retain_graph=True)
                want[enc], stats = integrate_gradient_lists([list(g_m), list(g_u)], RuleConfig())
                result.cos_beta[variant][enc] = float(stats.cos_beta)
            want["heads"] = list(torch.autograd.grad(sum(losses.values()), ref_net.head_params()))

            for cls, errors in ((EngineStep, result.engine_error), (AuthorsStep, result.authors_error)):
                net = copy.deepcopy(base)
                method = cls(net, batch)
                method.net = wrap(net)  # type: ignore[assignment]
                method.optimizer.step = lambda *a, **k: None  # type: ignore[method-assign]  # keep .grad
                method.step()
                method.close()
                got = {enc: [p.grad for p in ps] for enc, ps in net.encoder_params().items()}
                got["heads"] = [p.grad for p in net.head_params()]
                errors[variant] = max(_rel_error(got[k], want[k]) for k in want)  # type: ignore[arg-type]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return result


# --------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-step wall-clock times of one method, in milliseconds."""

    name: str
    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr(self) -> float:
        if len(self.times_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q3 - q1


def paired_ratios(timing: Timing, base: Timing) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``timing / base``.

    ``time_interleaved`` runs one step of every method per round, so the i-th times of two methods were
    taken within milliseconds of each other: their ratio cancels the machine's slow drifts (other jobs on
    shared cores), which the ratio of the two medians does not.
    """
    ratios = [t / b for t, b in zip(timing.times_ms, base.times_ms, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: Mapping[str, Callable[[], None]], iters: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """Run every step ``warmup + iters`` times, one of each per round, rotating the order every round.

    Interleaving spreads slow phases of a shared machine over all methods; rotating the order removes
    any bias from always running right after the same method (cache state, allocator state).
    """
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    for r in range(warmup + iters):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {n: Timing(n, t) for n, t in times.items()}


PHASES = (
    "forward",
    "head cotangents + extra encoder backward",
    "ordinary backward",
    "rule (+ gradient bookkeeping)",
    "optimizer step",
)


def time_phases(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], iters: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median time of each phase of the uniform and the MMPareto step (interleaved, one of each per round).

    The device is synchronised at every phase boundary, so on CUDA the phases add up to a little more
    than the step time of the main table.
    """
    uniform, ours = UniformStep(copy.deepcopy(base), batch), EngineStep(copy.deepcopy(base), batch)
    times: dict[str, dict[str, list[float]]] = {"uniform": {}, "mmpareto": {}}

    def stamp() -> float:
        _sync(device)
        return time.perf_counter()

    def run_uniform() -> dict[str, float]:
        uniform.optimizer.zero_grad(set_to_none=True)
        t0 = stamp()
        losses = uniform.net.losses(batch)
        t1 = stamp()
        sum(losses.values()).backward()  # type: ignore[union-attr]
        t2 = stamp()
        uniform.optimizer.step()
        t3 = stamp()
        return {PHASES[0]: t1 - t0, PHASES[2]: t2 - t1, PHASES[4]: t3 - t2}

    def run_ours() -> dict[str, float]:
        marks: dict[str, float] = {}

        def backward(loss: Tensor) -> None:
            marks["start"] = stamp()
            loss.backward()
            marks["end"] = stamp()

        ours.optimizer.zero_grad(set_to_none=True)
        t0 = stamp()
        with ours.engine.capture():
            losses = ours.net.losses(batch)
        t1 = stamp()
        ours.engine.backward(losses, backward_fn=backward)
        ours.engine.integrate()
        t2 = stamp()
        ours.optimizer.step()
        t3 = stamp()
        return {
            PHASES[0]: t1 - t0,
            PHASES[1]: marks["start"] - t1,
            PHASES[2]: marks["end"] - marks["start"],
            PHASES[3]: t2 - marks["end"],
            PHASES[4]: t3 - t2,
        }

    gc.collect()
    for r in range(warmup + iters):
        runs = (("uniform", run_uniform), ("mmpareto", run_ours))
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            phases = run()
            if r >= warmup:
                for phase, seconds in phases.items():
                    times[name].setdefault(phase, []).append(seconds * 1e3)
    ours.close()
    return {
        name: {ph: statistics.median(v) for ph, v in by_phase.items()} for name, by_phase in times.items()
    }


def format_phase_table(phases: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: phase | uniform ms | mmpareto ms, and the sums."""
    lines = ["| phase | uniform ms | mmpareto ms |", "|---|---:|---:|"]
    for phase in PHASES:
        cells = [f"{phases[m][phase]:.2f}" if phase in phases[m] else "-" for m in ("uniform", "mmpareto")]
        lines.append(f"| {phase} | {cells[0]} | {cells[1]} |")
    sums = [sum(phases[m].values()) for m in ("uniform", "mmpareto")]
    lines.append(f"| sum of the medians | {sums[0]:.2f} | {sums[1]:.2f} ({sums[1] / sums[0]:.2f}x) |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- memory
def grad_bytes(net: MultiEncoderNet) -> int:
    """Bytes of one copy of every encoder's gradient."""
    return sum(p.numel() * p.element_size() for ps in net.encoder_params().values() for p in ps)


def peak_memory_bytes(factory: Callable[[], Method], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes of one training step of a freshly built method, and how it was measured.

    Counts the method's whole footprint (parameters, gradients, optimizer state, any state the method
    keeps between steps, activations and temporaries), not the input batch. CUDA: the caching
    allocator's ``max_memory_allocated`` over two steps after two warm-up steps, minus what was
    allocated before the method was built. CPU: PyTorch's ``MemTracker`` (tensor storages created or
    registered, freed when their storage dies) over one step after one warm-up step.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        method = factory()
        for _ in range(2):
            method.step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            method.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method.close()
        del method
        gc.collect()
        torch.cuda.empty_cache()
        return peak, "torch.cuda.max_memory_allocated"
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as err:  # private API: report rather than fail
        return None, f"MemTracker unavailable ({err})"
    method = factory()
    method.step()
    try:
        tracker = MemTracker()
        tracker.track_external(method.net, method.optimizer, *method.persistent_tensors())
        with tracker:
            method.step()
        peak = int(tracker.get_tracker_snapshot("peak")[device]["Total"])
    except Exception as err:  # the tracker is a private API; a failure must not end the run
        return None, f"MemTracker failed ({type(err).__name__}: {err})"
    finally:
        method.close()
    return peak, "torch MemTracker (tensor storages)"


def peak_memory_of_methods(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], device: torch.device
) -> tuple[dict[str, int | None], str]:
    """Peak bytes of every method's step, each built fresh from a copy of ``base``, and how measured."""
    peaks: dict[str, int | None] = {}
    memory_method = "not measured"
    for name in METHODS:
        peaks[name], memory_method = peak_memory_bytes(
            lambda name=name: METHOD_CLASSES[name](copy.deepcopy(base), batch), device
        )
    return peaks, memory_method


# --------------------------------------------------------------------------------------------- Lightning
def time_lightning(
    spec: ModelSpec,
    base: MultiEncoderNet,
    batch: Mapping[str, Tensor],
    device: torch.device,
    iters: int,
    rounds: int = 3,
    skip: int = 2,
) -> dict[str, Timing]:
    """Per-step time of the uniform and the MMPareto step through a real ``Trainer``.

    A step is the interval between consecutive ``on_train_batch_start`` calls: everything the loop does
    per batch (fetch, training step, backward, optimizer step, logging). The two Trainers alternate in
    ``rounds`` ``fit`` calls; the first ``skip`` steps of each fit (set-up, first-step graph checks) are
    dropped.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    from mmpareto_lightning import MMParetoCallback, MMParetoModule

    class Repeat(Dataset):
        def __init__(self, length: int) -> None:
            self.length = length

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, index: int) -> Mapping[str, Tensor]:
            return batch

    class LitUniform(pl.LightningModule):
        def __init__(self, net: MultiEncoderNet) -> None:
            super().__init__()
            self.net = net

        def training_step(self, b: Mapping[str, Tensor], batch_idx: int) -> Tensor:
            losses = self.net.losses(b)
            total = sum(losses.values())
            self.log("train/loss", total.detach(), batch_size=b[LABEL].shape[0])  # type: ignore[union-attr]
            return total  # type: ignore[return-value]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self)

    class LitMMPareto(MMParetoModule):
        def __init__(self, net: MultiEncoderNet) -> None:
            super().__init__()
            self.net = net

        def mmpareto_encoders(self) -> dict[str, nn.Module]:
            return dict(self.net.encoders.items())

        def training_step(self, b: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
            return self.net.losses(b)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            _sync(device)
            self.stamps.append(time.perf_counter())

    modules: dict[str, pl.LightningModule] = {
        "lightning uniform": LitUniform(copy.deepcopy(base)),
        "lightning mmpareto": LitMMPareto(copy.deepcopy(base)),
    }
    per_round = max(1, -(-iters // rounds))
    times: dict[str, list[float]] = {n: [] for n in modules}
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            order = list(modules) if r % 2 == 0 else list(reversed(modules))
            for name in order:
                timer = StepTimer()
                callbacks: list[pl.Callback] = [timer]
                if name == "lightning mmpareto":
                    callbacks.append(MMParetoCallback())
                steps = skip + per_round + 1  # the last stamp closes the previous step
                trainer = pl.Trainer(
                    accelerator="gpu" if device.type == "cuda" else "cpu",
                    devices=1,
                    max_steps=steps,
                    max_epochs=1,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    limit_val_batches=0,
                    callbacks=callbacks,
                )
                loader = DataLoader(Repeat(steps), batch_size=None, shuffle=False, num_workers=0)
                trainer.fit(modules[name], train_dataloaders=loader)
                stamps = timer.stamps
                times[name].extend(
                    (b - a) * 1e3 for a, b in zip(stamps[skip:-1], stamps[skip + 1 :], strict=True)
                )
    return {n: Timing(n, t) for n, t in times.items()}


# --------------------------------------------------------------------------------------------- runs
@dataclass
class MainResult:
    """Everything the main (two-or-more-encoder) measurement produced."""

    timings: dict[str, Timing]
    peaks: dict[str, int | None]
    memory_method: str
    encoder_grad_bytes: int
    check: CheckResult
    lightning: dict[str, Timing] | None
    authors_conflict_rate: float


def build_methods(
    base: MultiEncoderNet, batch: Mapping[str, Tensor], names: Sequence[str] = METHODS
) -> dict[str, Method]:
    """Independent copies of the same initial network, one per method."""
    return {n: METHOD_CLASSES[n](copy.deepcopy(base), batch) for n in names}


def run_main(
    spec: ModelSpec,
    n_encoders: int,
    batch_size: int,
    device: torch.device,
    iters: int,
    warmup: int,
    seed: int,
    lightning: bool = True,
    memory: bool = True,
    lightning_rounds: int = 3,
    timing: bool = True,
) -> MainResult:
    """Correctness pre-check, interleaved timing, peak memory and (optionally) the Lightning pair.

    With ``timing=False`` only the pre-check and the memory pass run (e.g. ResNet-18 shapes on a CPU).
    """
    base, batch = build_network_and_batch(spec, n_encoders, batch_size, device, seed)
    check = check_correctness(base, batch)
    if not check.passed:
        raise AssertionError(
            f"Correctness pre-check failed (tolerance {CHECK_TOLERANCE} for the engine, "
            f"{AUTHORS_TOLERANCE} for the authors' re-creation): engine {check.engine_error}, "
            f"authors {check.authors_error}. "
            "Refusing to time a wrong computation."
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    timings: dict[str, Timing] = {}
    conflict_rate = float("nan")
    if timing:
        methods = build_methods(base, batch)
        timings = time_interleaved({n: m.step for n, m in methods.items()}, iters, warmup, device)
        authors = methods["authors"]
        assert isinstance(authors, AuthorsStep)
        conflict_rate = authors.conflicts / max(1, authors.decisions)
        for m in methods.values():
            m.close()
        del methods

    peaks: dict[str, int | None] = {}
    memory_method = "not measured"
    if memory:
        peaks, memory_method = peak_memory_of_methods(base, batch, device)
    light = (
        time_lightning(spec, base, batch, device, iters, lightning_rounds) if lightning and timing else None
    )
    return MainResult(timings, peaks, memory_method, grad_bytes(base), check, light, conflict_rate)


def run_scaling(
    spec: ModelSpec,
    counts: Sequence[int],
    batch_size: int,
    device: torch.device,
    iters: int,
    warmup: int,
    seed: int,
) -> dict[int, dict[str, Timing]]:
    """Interleaved timing of the three methods for each encoder count."""
    out: dict[int, dict[str, Timing]] = {}
    for k in counts:
        base, batch = build_network_and_batch(spec, k, batch_size, device, seed)
        methods = build_methods(base, batch)
        out[k] = time_interleaved({n: m.step for n, m in methods.items()}, iters, warmup, device)
        for m in methods.values():
            m.close()
        del methods, base, batch
        gc.collect()
    return out


@dataclass
class MemoryPoint:
    """Peak memory of every method at one batch size."""

    batch_size: int
    peaks: dict[str, int | None]
    encoder_grad_bytes: int


def run_memory_sweep(
    spec: ModelSpec, n_encoders: int, batch_sizes: Sequence[int], device: torch.device, seed: int
) -> tuple[list[MemoryPoint], str]:
    """Peak memory of every method at each batch size (the same network, freshly built per method)."""
    points: list[MemoryPoint] = []
    memory_method = "not measured"
    for size in batch_sizes:
        base, batch = build_network_and_batch(spec, n_encoders, size, device, seed)
        peaks, memory_method = peak_memory_of_methods(base, batch, device)
        points.append(MemoryPoint(size, peaks, grad_bytes(base)))
        gc.collect()
    return points, memory_method


# --------------------------------------------------------------------------------------------- report
def machine_description(device: torch.device) -> dict[str, str]:
    """Versions, device and thread count for the report."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": _cpu_model(),
        "cpu cores (os.cpu_count)": str(os.cpu_count()),
    }
    # glibc's malloc returns big blocks to the OS on free; every step then page-faults fresh memory, which
    # costs most where a retained graph keeps the old blocks busy (see benchmarks/README.md).
    tuning = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")]
    info["malloc env"] = " ".join(tuning) if tuning else "default"
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = "cpu"
    return info


def load_average() -> str:
    """1-minute load average (other work on a shared machine shows up here), or ``n/a``."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MiB:.1f}"


def format_main_table(result: MainResult) -> str:
    """Markdown table: method | median ms | IQR ms | ratio of medians | per-round ratio | peak MiB."""
    uniform = result.timings["uniform"]
    lines = [
        "| method | median ms | IQR ms | ratio to uniform (medians) | per-round ratio, median [IQR] "
        "| peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in METHODS:
        t = result.timings[name]
        peak = result.peaks.get(name)
        paired, q1, q3 = paired_ratios(t, uniform)
        lines.append(
            f"| {name} | {t.median:.2f} | {t.iqr:.2f} | {t.median / uniform.median:.2f}x "
            f"| {paired:.2f}x [{q1:.2f}-{q3:.2f}] | {_mib(peak)} |"
        )
    return "\n".join(lines)


def format_target(result: MainResult, target: float) -> str:
    """The step-time target next to both ratio estimates, and how often the authors' rule saw a conflict."""
    uniform, ours = result.timings["uniform"], result.timings["mmpareto"]
    of_medians = ours.median / uniform.median
    per_round = paired_ratios(ours, uniform)[0]

    def verdict(ratio: float) -> str:
        return "met" if ratio <= target else "NOT met"

    return (
        f"target: mmpareto <= {target}x uniform: ratio of medians {of_medians:.2f}x ({verdict(of_medians)}), "
        f"median per-round ratio {per_round:.2f}x ({verdict(per_round)}); authors' decisions with "
        f"cos <= 0 during timing: {result.authors_conflict_rate:.0%}"
    )


def format_memory_table(result: MainResult) -> str:
    """Markdown table of the peaks alone: method | peak MiB | over uniform, in encoder-gradient copies."""
    g = result.encoder_grad_bytes
    uniform = result.peaks.get("uniform")
    lines = [
        "| method | peak MiB | over uniform, MiB | over uniform, encoder-gradient copies |",
        "|---|---:|---:|---:|",
    ]
    for name in METHODS:
        peak = result.peaks.get(name)
        if peak is None or uniform is None:
            lines.append(f"| {name} | {_mib(peak)} | n/a | n/a |")
        else:
            lines.append(
                f"| {name} | {_mib(peak)} | {(peak - uniform) / MiB:.1f} | {(peak - uniform) / g:.2f} |"
            )
    return "\n".join(lines)


def format_memory_note(result: MainResult) -> str:
    """The bound ``uniform + 2 x encoder gradient bytes`` next to the measured peaks."""
    g = result.encoder_grad_bytes
    lines = [f"encoder gradient bytes (one copy, all encoders): {g / MiB:.1f} MiB"]
    uniform = result.peaks.get("uniform")
    if uniform is None:
        lines.append(f"peak memory: {result.memory_method}")
        return "\n".join(lines)
    bound = uniform + 2 * g
    lines.append(
        f"bound uniform + 2 x encoder gradients = {bound / MiB:.1f} MiB (peaks by {result.memory_method})"
    )
    for name in ("mmpareto", "authors"):
        peak = result.peaks.get(name)
        if peak is not None:
            extra = (peak - uniform) / g if g else float("nan")
            verdict = "within" if peak <= bound else "ABOVE"
            lines.append(f"{name}: uniform + {extra:.2f} x encoder gradients ({verdict} bound)")
    return "\n".join(lines)


def format_memory_sweep(points: Sequence[MemoryPoint], memory_method: str) -> str:
    """Markdown table: per batch size, each method's peak over uniform in encoder-gradient copies.

    The bound ``uniform + 2 copies`` is checked for ``mmpareto``; the last column divides its excess
    beyond two copies by the batch size.
    """
    lines = [
        "| batch | uniform peak MiB | mmpareto over uniform, copies | authors over uniform, copies "
        "| mmpareto within uniform + 2 copies | mmpareto excess beyond 2 copies, MiB per sample |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for point in points:
        g, uniform = point.encoder_grad_bytes, point.peaks.get("uniform")
        ours, authors = point.peaks.get("mmpareto"), point.peaks.get("authors")
        if uniform is None or ours is None or authors is None or not g:
            lines.append(f"| {point.batch_size} | {_mib(uniform)} | n/a | n/a | n/a | n/a |")
            continue
        beyond = max(0, ours - uniform - 2 * g) / MiB / point.batch_size
        within = "yes" if ours <= uniform + 2 * g else "no"
        lines.append(
            f"| {point.batch_size} | {_mib(uniform)} | {(ours - uniform) / g:.2f} "
            f"| {(authors - uniform) / g:.2f} | {within} | {beyond:.2f} |"
        )
    first = points[0].encoder_grad_bytes if points else 0
    lines += [
        "",
        f"encoder gradient bytes (one copy, all encoders): {first / MiB:.1f} MiB; peaks by {memory_method}",
    ]
    return "\n".join(lines)


def format_lightning_table(timings: Mapping[str, Timing], plain: Mapping[str, Timing]) -> str:
    """Markdown table of the Trainer-driven steps, relative to the Lightning uniform step."""
    base = timings["lightning uniform"].median
    lines = [
        "| method (through Lightning Trainer) | median ms | IQR ms | ratio to Lightning uniform "
        "| overhead vs plain step ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        plain_name = name.removeprefix("lightning ")
        overhead = t.median - plain[plain_name].median if plain_name in plain else float("nan")
        lines.append(f"| {name} | {t.median:.2f} | {t.iqr:.2f} | {t.median / base:.2f}x | {overhead:+.2f} |")
    return "\n".join(lines)


def format_scaling_table(scaling: Mapping[int, Mapping[str, Timing]]) -> str:
    """Markdown table: per encoder count, the medians and both ratios to uniform."""
    lines = [
        "| encoders | uniform ms | mmpareto ms | authors ms | mmpareto / uniform | authors / uniform "
        "| mmpareto / uniform, per round |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, t in scaling.items():
        u, m, a = t["uniform"].median, t["mmpareto"].median, t["authors"].median
        paired = paired_ratios(t["mmpareto"], t["uniform"])[0]
        lines.append(f"| {k} | {u:.2f} | {m:.2f} | {a:.2f} | {m / u:.2f}x | {a / u:.2f}x | {paired:.2f}x |")
    return "\n".join(lines)


def format_check(check: CheckResult) -> str:
    parts = []
    for variant in check.engine_error:
        cos = ", ".join(f"{k} {v:+.3f}" for k, v in check.cos_beta[variant].items())
        parts.append(
            f"{variant} (cos beta: {cos}): engine rel. error {check.engine_error[variant]:.1e}, "
            f"authors re-creation {check.authors_error[variant]:.1e}"
        )
    verdict = "PASSED" if check.passed else "FAILED"
    tolerances = f"tolerance {CHECK_TOLERANCE:g} engine, {AUTHORS_TOLERANCE:g} authors' re-creation"
    return f"correctness pre-check {verdict} ({tolerances}): " + "; ".join(parts)


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--model",
        choices=("small-cnn", "resnet18"),
        default=None,
        help="default: resnet18 at CREMA-D shapes on CUDA, small-cnn on CPU",
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed steps per method (default: 150 CPU, 50 CUDA)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 5 CPU, 10 CUDA)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--main-encoders", type=int, default=2, help="encoders of the main table")
    p.add_argument(
        "--encoders",
        type=int,
        nargs="*",
        default=[2, 3, 4],
        help="encoder counts of the scaling table (none: skip it)",
    )
    p.add_argument("--scaling-iters", type=int, default=None, help="timed steps per method and count")
    p.add_argument("--image-size", type=int, default=16, help="small-cnn input side")
    p.add_argument("--width", type=int, default=16, help="small-cnn first convolution width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-lightning", action="store_true", help="skip the Trainer-driven measurement")
    p.add_argument("--lightning-rounds", type=int, default=3, help="alternating fit() calls per Trainer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument(
        "--memory-only", action="store_true", help="only the pre-check and the peak-memory pass (no timing)"
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each phase of the uniform and the MMPareto step (forward, backwards, rule, step)",
    )
    p.add_argument(
        "--memory-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="also measure the peak memory of every method at each of these batch sizes",
    )
    p.add_argument("--markdown", type=str, default=None, help="also write the tables to this file")
    return p.parse_args(argv)


def _emit(body: list[str], *lines: str) -> None:
    """Print report lines as soon as they are measured, and keep them for the Markdown file."""
    print("\n".join(lines), flush=True)
    body.extend(lines)


def _emit_section(body: list[str], title: str, table: str) -> None:
    _emit(body, "", f"## {title}", "", table)


def _emit_memory_sweep(
    body: list[str], spec: ModelSpec, args: argparse.Namespace, device: torch.device
) -> None:
    """The ``--memory-batch-sizes`` table, if asked for."""
    if args.memory_batch_sizes:
        points, memory_method = run_memory_sweep(
            spec, args.main_encoders, args.memory_batch_sizes, device, args.seed
        )
        _emit_section(
            body, f"Peak memory by batch size ({spec.kind})", format_memory_sweep(points, memory_method)
        )


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark, print the report and return it (Markdown)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda requested, but CUDA is not available.")
    on_gpu = device.type == "cuda"
    kind = args.model or ("resnet18" if on_gpu else "small-cnn")
    spec = ModelSpec(kind, args.image_size, args.width)
    iters = args.iters or (50 if on_gpu else 150)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 5)
    scaling_iters = args.scaling_iters or max(5, iters // 2)

    info = machine_description(device)
    info["load average at start"] = load_average()
    shapes = ", ".join(
        f"{n} {'x'.join(map(str, spec.input_shape(n)))}" for n in ENCODER_NAMES[: args.main_encoders]
    )
    header = [
        "# MMPareto step-time benchmark",
        "",
        f"command: `python benchmarks/step_time.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        f"model: {kind} x {args.main_encoders} encoders ({shapes}), batch {args.batch_size}, fp32, "
        "SGD momentum 0.9; "
        + (
            "memory only: peak of a training step per method, after warm-up"
            if args.memory_only
            else f"{warmup} warm-up + {iters} timed steps per method, interleaved"
        )
        + (
            f"; the memory sweep uses batch sizes {' '.join(map(str, args.memory_batch_sizes))}"
            if args.memory_batch_sizes
            else ""
        ),
    ]
    print("\n".join(header), flush=True)

    result = run_main(
        spec,
        args.main_encoders,
        args.batch_size,
        device,
        iters,
        warmup,
        args.seed,
        lightning=not args.no_lightning,
        # A batch-size sweep measures the memory itself; the main pass would repeat one of its points.
        memory=not args.no_memory and not args.memory_batch_sizes,
        lightning_rounds=args.lightning_rounds,
        timing=not args.memory_only,
    )
    body: list[str] = []
    _emit(body, "", format_check(result.check))
    if args.memory_only:
        if result.peaks:
            _emit_section(
                body, "Peak memory", format_memory_table(result) + "\n\n" + format_memory_note(result)
            )
    else:
        target = 1.75 if on_gpu else 1.7
        table = "\n".join(
            [format_main_table(result), "", format_target(result, target), format_memory_note(result)]
        )
        _emit_section(body, "Step time (plain PyTorch)", table)
        if result.lightning is not None:
            _emit_section(body, "Through Lightning", format_lightning_table(result.lightning, result.timings))
        if args.breakdown:
            base, batch = build_network_and_batch(
                spec, args.main_encoders, args.batch_size, device, args.seed
            )
            phases = time_phases(base, batch, iters, warmup, device)
            del base, batch
            _emit_section(
                body, f"Where the time goes (medians of {iters} steps per method)", format_phase_table(phases)
            )
        if args.encoders:
            scaling = run_scaling(
                spec, args.encoders, args.batch_size, device, scaling_iters, max(2, warmup // 2), args.seed
            )
            _emit_section(
                body,
                f"Scaling with the number of encoders ({kind}, {scaling_iters} timed steps per method)",
                format_scaling_table(scaling),
            )
    _emit_memory_sweep(body, spec, args, device)
    if not args.memory_only:
        _emit(
            body,
            f"\nload average at the end: {load_average()} (load above the thread count means shared cores)",
        )
    report = "\n".join(header + body) + "\n"
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report)
    return report


if __name__ == "__main__":
    main()
