"""The correctness pre-check: nothing is timed unless our step and the re-created authors' step are right."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmpareto_lightning import RuleConfig, integrate_gradient_lists

from . import methods
from .models import MULTIMODAL, MultiEncoderNet

CHECK_TOLERANCE = 1e-5  # our engine against the direct computation (it is bit-identical in fp32 on CPU)
# The re-created authors' step takes ||g_m + g_u|| from a separate (fourth) backward and its dot products
# from float32 sums on the host, so it differs from the reference by rounding (about 1e-5 relative for
# ResNet-18 at batch 64); a wrong gamma, weight or rescale would be off by far more than this.
AUTHORS_TOLERANCE = 1e-3
CHECK_SEED = 12345  # the random state of every forward of the check (dropout)


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
    during the check so CUDA compares true fp32 results, and attention runs PyTorch's math kernel (the
    fused CUDA kernels' backward adds in a nondeterministic order). The random state is reset before
    every forward, so a model with dropout (BERT's) draws the same masks in the reference and in the
    steps.
    """
    result = CheckResult()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with sdpa_kernel(SDPBackend.MATH):
            _check_variants(base, batch, result)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return result


def _check_variants(base: MultiEncoderNet, batch: Mapping[str, Tensor], result: CheckResult) -> None:
    for variant in ("natural", "conflict"):

        def wrap(net: MultiEncoderNet, variant: str = variant) -> Any:
            return net if variant == "natural" else _NegatedUnimodal(net)

        # Reference: one forward, one autograd.grad per loss, the library's rule on plain lists.
        ref_net = copy.deepcopy(base)
        torch.manual_seed(CHECK_SEED)
        losses = wrap(ref_net).losses(batch)
        want: dict[str, list[Tensor]] = {}
        result.cos_beta[variant] = {}
        for enc, params in ref_net.encoder_params().items():
            g_m = torch.autograd.grad(losses[MULTIMODAL], params, retain_graph=True)
            g_u = torch.autograd.grad(losses[enc], params, retain_graph=True)
            want[enc], stats = integrate_gradient_lists([list(g_m), list(g_u)], RuleConfig())
            result.cos_beta[variant][enc] = float(stats.cos_beta)
        want["heads"] = list(torch.autograd.grad(sum(losses.values()), ref_net.head_params()))

        # Looked up on the module at call time, so a test can substitute a wrong engine step.
        checked = ((methods.EngineStep, result.engine_error), (methods.AuthorsStep, result.authors_error))
        for cls, errors in checked:
            net = copy.deepcopy(base)
            method = cls(net, batch)
            method.net = wrap(net)  # type: ignore[assignment]
            method.optimizer.step = lambda *a, **k: None  # type: ignore[method-assign]  # keep .grad
            torch.manual_seed(CHECK_SEED)  # the reference's dropout masks
            method.step()
            method.close()
            got = {enc: [p.grad for p in ps] for enc, ps in net.encoder_params().items()}
            got["heads"] = [p.grad for p in net.head_params()]
            errors[variant] = max(_rel_error(got[k], want[k]) for k in want)  # type: ignore[arg-type]


def format_check(check: CheckResult) -> str:
    """One line: verdict, tolerances, and per variant the cosines and both relative errors."""
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
