"""The rule against an independent float64 re-derivation, on random and adversarial gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from _reference import kkt_alpha_is_optimal, reference_rule
from torch.utils._python_dispatch import TorchDispatchMode

from mmpareto_lightning import (
    RuleConfig,
    integrate_gradient_lists,
    integrate_gradients,
    integrate_tensor_lists,
    min_norm_2,
    min_norm_simplex,
)
from mmpareto_lightning.rule import integrate as rule
from mmpareto_lightning.rule import passes
from mmpareto_lightning.rule.passes import PIECE, tensor_grams

STRATEGIES = ["mmpareto", "pareto", "uniform", "multimodal_only"]
SHAPES = [(4, 3), (3,), (2, 2, 2), (1,)]


def _random(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).float() * scale for s in SHAPES]


def _conflicting(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gm = _random(seed)
    gu = [-(0.3 + seed % 3) * t + 0.2 * r for t, r in zip(gm, _random(seed + 100), strict=True)]
    return gm, gu


def _cases() -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    base = _random(1)
    other = _random(2)
    # Disjoint supports make the dot product exactly zero in every precision.
    ortho_a = [torch.zeros(s) for s in SHAPES]
    ortho_b = [torch.zeros(s) for s in SHAPES]
    ortho_a[0].copy_(base[0])
    ortho_b[1].copy_(base[1])
    ortho_b[2].copy_(base[2])
    cases = {
        "random": (base, other),
        "conflict": _conflicting(3),
        "identical": (base, [t.clone() for t in base]),
        "opposite": (base, [-t for t in base]),
        "opposite_scaled": (base, [-4 * t for t in base]),  # exact in float32
        "orthogonal": (ortho_a, ortho_b),
        "multimodal_zero": ([torch.zeros(s) for s in SHAPES], other),
        "unimodal_zero": (base, [torch.zeros(s) for s in SHAPES]),
        "both_zero": ([torch.zeros(s) for s in SHAPES], [torch.zeros(s) for s in SHAPES]),
        "one_huge": ([t * 1e15 for t in base], [-t for t in other]),
        "one_tiny": ([t * 1e-15 for t in base], [-t for t in other]),
        "huge_conflict": (
            [t * 1e12 for t in base],
            [-t * 1e12 + o * 1e11 for t, o in zip(base, other, strict=True)],
        ),
    }
    return cases


CASES = _cases()


def _assert_close(
    ours: list[torch.Tensor], ref: list[np.ndarray], inputs: list[list[torch.Tensor]], rtol: float = 2e-5
) -> None:
    # Errors are judged against the magnitude of what went in: an exact zero result (opposite
    # gradients) is matched up to float32 round-off of the inputs.
    scale = max(
        max(float(np.abs(r).max()) for r in ref), max(float(t.abs().max()) for g in inputs for t in g)
    )
    scale = max(scale, 1e-300)
    for o, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(o.double().numpy().reshape(-1), r, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_rule_matches_reference_on_adversarial_gradients(case: str, strategy: str, rescale: str) -> None:
    gm, gu = CASES[case]
    ours, stats = integrate_gradient_lists([gm, gu], RuleConfig(strategy=strategy, rescale=rescale))
    ref, info = reference_rule([gm, gu], strategy=strategy, rescale=rescale)
    _assert_close(ours, ref, [gm, gu])
    assert all(torch.isfinite(t).all() for t in ours)
    assert bool(stats.conflict) == info["conflict"]
    assert float(stats.cos_beta) == pytest.approx(info["cos"], abs=1e-6)
    np.testing.assert_allclose(stats.alphas.double().numpy() * 2, info["weights"], rtol=1e-6, atol=1e-7)
    assert bool(stats.finite)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_rule_matches_reference_on_random_gradients(seed: int, rescale: str) -> None:
    gm, gu = _conflicting(seed) if seed % 2 else (_random(seed), _random(seed + 50))
    gamma = [None, 1.0, 2.5][seed % 3]
    ours, stats = integrate_gradient_lists([gm, gu], RuleConfig(rescale=rescale, gamma=gamma))
    ref, info = reference_rule([gm, gu], rescale=rescale, gamma=gamma)
    _assert_close(ours, ref, [gm, gu])
    assert bool(stats.conflict) == info["conflict"]


@pytest.mark.parametrize("exponent", [-60, -20, 0, 16, 40, 50])
def test_rule_is_scale_equivariant(exponent: int) -> None:
    # AMP multiplies every gradient by a power-of-two loss scale; the rule must commute with that.
    gm, gu = _conflicting(7)
    scale = 2.0**exponent
    base, _ = integrate_gradient_lists([gm, gu])
    scaled, stats = integrate_gradient_lists([[t * scale for t in gm], [t * scale for t in gu]])
    for b, s in zip(base, scaled, strict=True):
        torch.testing.assert_close(
            s.double() / scale, b.double(), rtol=1e-5, atol=1e-6 * float(b.abs().max())
        )
    assert bool(stats.finite)


def test_defaults_follow_the_authors_code() -> None:
    assert RuleConfig().effective_gamma == 1.5
    assert RuleConfig(rescale="per_encoder").effective_gamma == 1.0
    assert RuleConfig(strategy="uniform").effective_gamma == 1.0
    assert RuleConfig(gamma=3.0, strategy="uniform").effective_gamma == 3.0
    gm, gu = _random(3), _random(3)
    out, stats = integrate_gradient_lists([gm, gu])  # identical -> no conflict -> 1.5 * (gm + gu)
    for o, a, b in zip(out, gm, gu, strict=True):
        torch.testing.assert_close(o, 1.5 * (a + b))
    assert not bool(stats.conflict)


def test_per_tensor_rescale_never_shrinks_and_per_encoder_restores_the_norm() -> None:
    gm, gu = _conflicting(11)
    h, stats = integrate_gradient_lists([gm, gu], RuleConfig(gamma=1.0))
    h_raw, _ = integrate_gradient_lists([gm, gu], RuleConfig(strategy="pareto"))
    for a, b in zip(h, h_raw, strict=True):
        assert float(a.norm()) >= float(b.norm()) * (1 - 1e-6)
    assert float(stats.rescale) >= 1.0
    h_enc, _ = integrate_gradient_lists([gm, gu], RuleConfig(rescale="per_encoder"))
    total = torch.cat([(a + b).reshape(-1) for a, b in zip(gm, gu, strict=True)]).norm()
    assert float(torch.cat([t.reshape(-1) for t in h_enc]).norm()) == pytest.approx(float(total), rel=1e-5)


def test_pareto_stationarity_is_detected() -> None:
    base = _random(5)
    _, stats = integrate_gradient_lists([base, [-2 * t for t in base]])
    assert bool(stats.stationary)
    _, stats = integrate_gradient_lists(
        [base, [-2 * t + 0.5 * o for t, o in zip(base, _random(6), strict=True)]]
    )
    assert not bool(stats.stationary)
    # A zero unimodal gradient makes the pair trivially stationary; all-zero gradients do not count.
    _, stats = integrate_gradient_lists([base, [torch.zeros_like(t) for t in base]])
    assert bool(stats.stationary)
    zeros = [torch.zeros_like(t) for t in base]
    _, stats = integrate_gradient_lists([zeros, zeros])
    assert not bool(stats.stationary)


def test_non_finite_gradients_are_flagged() -> None:
    gm, gu = _random(1), _random(2)
    gu[0][0, 0] = float("nan")
    _, stats = integrate_gradient_lists([gm, gu])
    assert not bool(stats.finite)
    gu[0][0, 0] = float("inf")
    _, stats = integrate_gradient_lists([gm, gu])
    assert not bool(stats.finite)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("strategy", ["mmpareto", "pareto"])
def test_three_objectives_match_reference(seed: int, strategy: str) -> None:
    g = [_random(seed + 10 * i) for i in range(3)]
    if seed % 3 == 0:  # all pairwise positive: no conflict
        g = [[t.abs() + 0.1 for t in lst] for lst in g]
    elif seed % 3 == 1:  # two identical, one opposite
        g[1] = [t.clone() for t in g[0]]
        g[2] = [-t for t in g[0]]
    flat = [torch.cat([t.reshape(-1) for t in lst]).double() for lst in g]
    gram = torch.stack([torch.stack([a @ b for b in flat]) for a in flat])
    alpha = min_norm_simplex(gram).numpy()
    assert kkt_alpha_is_optimal(gram.numpy(), alpha)
    ours, stats = integrate_gradient_lists(g, RuleConfig(strategy=strategy))
    ref, info = reference_rule(g, strategy=strategy, alpha_k=alpha)
    _assert_close(ours, ref, g, rtol=1e-4)
    assert bool(stats.conflict) == info["conflict"]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(8))
def test_min_norm_simplex_satisfies_kkt(k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(k, 6, generator=gen, dtype=torch.float64)
    if seed % 2:
        vectors[-1] = vectors[0]  # linearly dependent gradients
    gram = vectors @ vectors.T
    alpha = min_norm_simplex(gram).numpy()
    assert kkt_alpha_is_optimal(gram.numpy(), alpha, tol=1e-8)


def test_min_norm_simplex_two_vectors_equals_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    b = -0.5 * a + 0.3 * b
    gram = torch.stack([torch.stack([a @ a, a @ b]), torch.stack([b @ a, b @ b])])
    expected = float((b @ b - a @ b) / (a @ a + b @ b - 2 * a @ b))
    assert float(min_norm_simplex(gram)[0]) == pytest.approx(expected, rel=1e-9)
    assert float(min_norm_2(gram[0, 0], gram[0, 1], gram[1, 1])[0]) == pytest.approx(expected, rel=1e-12)


def test_min_norm_2_clamps_like_the_official_solver() -> None:
    one, two = torch.tensor(1.0), torch.tensor(2.0)
    assert min_norm_2(one, one, two).tolist() == [0.999, 0.001]  # v12 >= v11
    assert min_norm_2(two, one, one).tolist() == [0.001, 0.999]  # v12 >= v22
    assert sum(min_norm_2(two, torch.tensor(-1.0), one).tolist()) == pytest.approx(1.0)


def test_out_may_alias_an_input() -> None:
    gm, gu = _conflicting(4)
    flat_m = torch.cat([t.reshape(-1) for t in gm])
    flat_u = torch.cat([t.reshape(-1) for t in gu])
    segments = [t.numel() for t in gm]
    expected, _ = integrate_gradients([flat_m.clone(), flat_u.clone()], segments=segments)
    out, _ = integrate_gradients([flat_m, flat_u], segments=segments, out=flat_u)
    assert out is flat_u
    torch.testing.assert_close(flat_u, expected)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least two"):
        integrate_gradients([torch.ones(3)])
    with pytest.raises(ValueError, match="same size"):
        integrate_gradients([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="segments"):
        integrate_gradients([torch.ones(3), torch.ones(3)], segments=[2])
    with pytest.raises(ValueError, match="strategy"):
        RuleConfig(strategy="pcgrad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gamma"):
        RuleConfig(gamma=0.0)
    with pytest.raises(ValueError, match="rescale"):
        RuleConfig(rescale="global")  # type: ignore[arg-type]


def test_bfloat16_gradients_use_float32_dot_products() -> None:
    gm, gu = _conflicting(9)
    ours, stats = integrate_gradient_lists([[t.bfloat16() for t in gm], [t.bfloat16() for t in gu]])
    ref, info = reference_rule([[t.bfloat16() for t in gm], [t.bfloat16() for t in gu]])
    assert bool(stats.conflict) == info["conflict"]
    _assert_close([o.float() for o in ours], ref, [gm, gu], rtol=2e-2)


# ------------------------------------------------------------------------------------------------------
# The per-tensor core (integrate_tensor_lists): one read pass (per-tensor Gram matrices) and one write.

# Tensors above passes.PIECE entries go piece by piece on CPU (dot products and the write), with a tail.
BIG_SHAPES = [(3, PIECE // 3 + 5), (7,), (PIECE + 1,), (16, 3, 3, 3)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = [pytest.mark.gpu, needs_cuda]


def _objectives(seed: int, k: int, shapes: list[tuple[int, ...]], scale: float = 1.0, conflict: bool = True):
    gen = torch.Generator().manual_seed(seed)
    first = [torch.randn(s, generator=gen) for s in shapes]
    lists = [first]
    for i in range(1, k):
        noise = [torch.randn(s, generator=gen) for s in shapes]
        coef = -(0.4 + 0.3 * i) if conflict else 0.5
        lists.append([coef * f + 0.3 * z for f, z in zip(first, noise, strict=True)])
    return [[(t * scale).float() for t in lst] for lst in lists]


def _simplex_alpha(grads: list[list[torch.Tensor]]) -> np.ndarray:
    flat = [torch.cat([t.reshape(-1) for t in lst]).double() for lst in grads]
    return min_norm_simplex(torch.stack([torch.stack([a @ b for b in flat]) for a in flat])).numpy()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("exponent", [-40, 0, 40])
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
@pytest.mark.parametrize("conflict", [True, False])
def test_tensor_lists_match_reference(k: int, exponent: int, rescale: str, conflict: bool) -> None:
    grads = _objectives(k + exponent, k, BIG_SHAPES + SHAPES, 2.0**exponent, conflict)
    ours, stats = integrate_tensor_lists(grads, RuleConfig(rescale=rescale))
    alpha = _simplex_alpha(grads) if k > 2 else None
    ref, info = reference_rule(grads, rescale=rescale, alpha_k=alpha)
    _assert_close(ours, ref, grads, rtol=2e-5 if k == 2 else 1e-4)
    assert [o.shape for o in ours] == [t.shape for t in grads[0]]
    assert bool(stats.conflict) == info["conflict"]
    np.testing.assert_allclose(stats.alphas.numpy() * k, info["weights"], rtol=1e-6, atol=1e-7)


def _quadratic_errors(grads: list[list[torch.Tensor]], weights: torch.Tensor) -> tuple[float, float]:
    """Largest errors of ||sum_i w_i g_i||_t^2 and ||sum_i g_i||_t^2 from the Gram matrices against
    float64 norms, relative to (sum_i |w_i| ||g_i||_t)^2 (the scale of the floor's bound)."""
    grams = tensor_grams(grads).cpu()
    worst_h = worst_s = 0.0
    for t, gram in enumerate(grams):
        g64 = [lst[t].double().reshape(-1).cpu() for lst in grads]
        direct_h = sum(w * g for w, g in zip(weights, g64, strict=True)).square().sum()
        direct_s = sum(g64).square().sum()
        norms = torch.stack([g.norm() for g in g64])
        spread_h = float(weights.abs() @ norms) ** 2
        spread_s = float(norms.sum()) ** 2
        worst_h = max(worst_h, abs(float(weights @ gram @ weights - direct_h)) / spread_h)
        worst_s = max(worst_s, abs(float(gram.sum() - direct_s)) / spread_s)
    return worst_h, worst_s


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("multi_tensor", [False, True])
def test_gram_quadratic_forms_match_direct_norms(
    k: int, seed: int, multi_tensor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # multi_tensor=True forces the accelerator path (multi-tensor kernels) on CPU.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: multi_tensor)
    grads = _objectives(seed, k, BIG_SHAPES + SHAPES, 10.0 ** (seed - 1))
    weights = torch.linspace(0.3, 1.7, k, dtype=torch.float64)
    err_h, err_s = _quadratic_errors(grads, weights)
    assert err_h < 1e-6 and err_s < 1e-6


@pytest.mark.parametrize("size", [1, 100, 4096, PIECE, PIECE + 1, 5 * PIECE + 3])
@pytest.mark.parametrize("kind", ["normal", "positive", "heavy"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_gram_round_off_is_far_below_the_floor(size: int, kind: str, device: str) -> None:
    # h' = w_1 g_1 + w_2 g_2 cancels to float32 round-off: ||h'||^2 from the Gram matrix is then all
    # error, and that error must stay far below the rule's floor (rule._FLOOR_FACTOR eps spread^2).
    gen = torch.Generator().manual_seed(size)
    a = {
        "normal": torch.randn(size, generator=gen),
        "positive": torch.rand(size, generator=gen) + 0.5,
        "heavy": torch.randn(size, generator=gen) ** 3,
    }[kind]
    eps = torch.finfo(torch.float32).eps
    worst = worst_entry = 0.0
    for ratio in (0.3, 1.0, 2.7):
        b = -ratio * a + 1e-7 * a.abs().mean() * torch.randn(size, generator=gen)
        weights = torch.tensor([2 * ratio / (1 + ratio), 2 / (1 + ratio)], dtype=torch.float64)
        grads = [[a.to(device)], [b.to(device)]]
        worst = max(worst, _quadratic_errors(grads, weights)[0])
        # The floor's premise: each entry errs by at most c eps sum_e |g_ie g_je|, c = _FLOOR_FACTOR.
        exact = torch.stack([a.double(), b.double()])
        errors = (tensor_grams(grads)[0].cpu() - exact @ exact.T).abs() / (exact.abs() @ exact.abs().T)
        worst_entry = max(worst_entry, float(errors.max()))
    assert worst < rule._FLOOR_FACTOR * eps / 4
    assert worst_entry < rule._FLOOR_FACTOR * eps


@pytest.mark.parametrize("alias", [None, 0, 1, "separate", "both"])
def test_tensor_lists_out_may_alias_one_list(alias: int | str | None) -> None:
    grads = _objectives(5, 2, BIG_SHAPES + SHAPES)
    if alias == "both":  # the same tensors as both objectives and as the output
        grads[1] = grads[0]
    expected, expected_stats = integrate_tensor_lists([[t.clone() for t in lst] for lst in grads])
    if alias is None:
        out = None
    elif alias == "separate":
        out = [torch.full_like(t, float("nan")) for t in grads[0]]
    else:
        out = grads[0 if alias == "both" else alias]
    result, stats = integrate_tensor_lists(grads, out=out)
    if out is not None:
        assert all(r is o for r, o in zip(result, out, strict=True))
    # The same coefficients; only the order of the two roundings may differ with the output.
    for r, e in zip(result, expected, strict=True):
        torch.testing.assert_close(r, e, rtol=1e-6, atol=1e-6)
    assert bool(stats.conflict) == bool(expected_stats.conflict)


def test_tensor_lists_reject_partial_aliasing() -> None:
    grads = _objectives(6, 2, SHAPES)
    with pytest.raises(ValueError, match="only in part"):
        integrate_tensor_lists(grads, out=[grads[1][0], *[torch.empty_like(t) for t in grads[1][1:]]])
    with pytest.raises(ValueError, match="does not match"):
        integrate_tensor_lists([grads[0], grads[1][:-1]])
    with pytest.raises(ValueError, match="at least two"):
        integrate_tensor_lists([grads[0]])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("multi_tensor", [False, True])
def test_flat_api_equals_list_api(
    strategy: str, k: int, multi_tensor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # multi_tensor=True: the accelerator path, whose write takes flat buffers whole.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: multi_tensor)
    grads = _objectives(7, k, BIG_SHAPES + SHAPES)
    segments = [t.numel() for t in grads[0]]
    flats = [torch.cat([t.reshape(-1) for t in lst]) for lst in grads]
    config = RuleConfig(strategy=strategy)
    flat, flat_stats = integrate_gradients(flats, config, segments=segments, out=flats[1])
    listed, list_stats = integrate_tensor_lists(grads, config)
    for f, t in zip(flat.split(segments), listed, strict=True):
        torch.testing.assert_close(f.view_as(t), t, rtol=1e-6, atol=1e-6)
    for a, b in zip(flat_stats, list_stats, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    # A separate flat output, and one inside a larger buffer (like the engine's shared buffer).
    buffer = torch.full((flat.numel() + 10,), float("nan"))
    separate, _ = integrate_gradients(
        [torch.cat([t.reshape(-1) for t in lst]) for lst in grads], config, segments, out=buffer[3:-7]
    )
    torch.testing.assert_close(separate, flat, rtol=1e-6, atol=1e-6)
    assert buffer[:3].isnan().all() and buffer[-7:].isnan().all()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_multi_tensor_path_matches_reference(
    strategy: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The accelerator path (multi-tensor kernels), forced on CPU, on the adversarial cases.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: True)
    gm, gu = CASES[case]
    ours, stats = integrate_tensor_lists([gm, gu], RuleConfig(strategy=strategy))
    ref, info = reference_rule([gm, gu], strategy=strategy)
    _assert_close(ours, ref, [gm, gu])
    assert bool(stats.conflict) == info["conflict"]
    np.testing.assert_allclose(stats.alphas.numpy() * 2, info["weights"], rtol=1e-6, atol=1e-7)


def test_non_contiguous_and_half_precision_tensor_lists() -> None:
    grads = _objectives(8, 2, [(300, 400), (5, 6)])
    transposed = [[lst[0].t(), lst[1]] for lst in grads]  # a non-contiguous gradient
    ours, _ = integrate_tensor_lists(transposed)
    ref, _ = reference_rule(transposed)
    _assert_close(ours, ref, transposed)
    half = [[t.bfloat16() for t in lst] for lst in grads]
    out, stats = integrate_tensor_lists(half, out=half[1])
    assert all(o is h for o, h in zip(out, half[1], strict=True)) and out[0].dtype == torch.bfloat16
    ref, info = reference_rule([[t.bfloat16() for t in lst] for lst in grads])
    _assert_close([o.float() for o in out], ref, grads, rtol=2e-2)
    assert bool(stats.conflict) == info["conflict"]


def test_the_rule_makes_no_large_temporary_on_cpu() -> None:
    # One read pass and one write pass, in place: no operator allocates anything of the gradients' size.
    grads = _objectives(9, 2, BIG_SHAPES)
    allocations = []

    class RecordAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    allocations.append((str(func), t.untyped_storage().nbytes()))
            return result

    with RecordAllocations():
        integrate_tensor_lists(grads, out=grads[1])
    assert allocations and max(size for _, size in allocations) < 4096, sorted(
        allocations, key=lambda a: -a[1]
    )[:3]


def _resnet18_shapes() -> list[torch.Size]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.fc = torch.nn.Identity()
    return [p.shape for p in net.parameters()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_decisions_are_float64_accurate_at_resnet18_size(device: str) -> None:
    # 11.2M parameters with ResNet-18's shapes; per-tensor scales, offsets and a conflict. A float32
    # dot product over the flattened encoder is off by ~1e-4 here; the rule must match float64
    # arithmetic on the same float32 gradients to 1e-6.
    shapes = _resnet18_shapes()
    assert 11_000_000 < sum(s.numel() for s in shapes) < 11_300_000
    gen = torch.Generator().manual_seed(0)
    gm, gu = [], []
    for t, shape in enumerate(shapes):
        a = torch.randn(shape, generator=gen) * (0.1 + t % 5) + (0.3 if t % 3 == 0 else 0.0)
        gm.append(a)
        gu.append(-0.6 * a + 0.5 * torch.randn(shape, generator=gen) + 0.05)
    gm, gu = [t.to(device) for t in gm], [t.to(device) for t in gu]
    _, stats = integrate_tensor_lists([gm, gu])
    grams = tensor_grams([gm, gu])
    flat = [torch.cat([t.reshape(-1) for t in lst]).double() for lst in (gm, gu)]
    v11, v12, v22 = flat[0] @ flat[0], flat[0] @ flat[1], flat[1] @ flat[1]
    cos = v12 / (v11 * v22).sqrt()
    alpha = (v22 - v12) / (v11 + v22 - 2 * v12)
    assert bool(stats.conflict)
    assert abs(float(stats.cos_beta / cos) - 1) < 1e-6
    assert abs(float(stats.alphas[0] / alpha) - 1) < 1e-6
    assert abs(float(grams.sum(0)[0, 0] / v11) - 1) < 1e-6
    assert abs(float(grams.sum(0)[1, 1] / v22) - 1) < 1e-6


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.gpu
@needs_cuda
def test_cuda_rule_matches_cpu_rule_without_synchronising(
    k: int, strategy: str, rescale: str, flat: bool
) -> None:
    grads = _objectives(11, k, BIG_SHAPES + SHAPES)
    config = RuleConfig(strategy=strategy, rescale=rescale)
    expected, expected_stats = integrate_tensor_lists(grads, config)
    segments = [t.numel() for t in grads[0]]

    def on_gpu() -> list[list[torch.Tensor]]:
        if not flat:
            return [[t.cuda() for t in lst] for lst in grads]
        # The engine's layout: flat buffers; the rule writes into the unimodal one.
        buffers = [torch.cat([t.reshape(-1) for t in lst]).cuda() for lst in grads]
        return [[v.view_as(t) for v, t in zip(b.split(segments), grads[0], strict=True)] for b in buffers]

    warm = on_gpu()  # kernels load, and layouts are set up, outside the checked region
    integrate_tensor_lists(warm, config, out=warm[1])
    inputs = on_gpu()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result, stats = integrate_tensor_lists(inputs, config, out=inputs[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r is o for r, o in zip(result, inputs[1], strict=True))
    scale = max(float(t.abs().max()) for lst in grads for t in lst)
    for r, e in zip(result, expected, strict=True):
        torch.testing.assert_close(r.cpu(), e, rtol=2e-5, atol=2e-5 * scale)
    for a, b in zip(stats, expected_stats, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("out", [False, True])
def test_complex_gradients_use_the_real_inner_product(out: bool) -> None:
    # A complex parameter's gradient is the steepest-ascent direction under Re<a, b>: the rule must decide
    # on that inner product (a plain complex dot product neither conjugates nor drops the imaginary part).
    gen = torch.Generator().manual_seed(0)
    gm = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in [(3, 4), (5,), (2, 2, 2)]]
    gu = [-0.7 * t + 0.3 * torch.randn(t.shape, dtype=torch.complex64, generator=gen) for t in gm]
    target = [t.clone() for t in gu] if out else None
    ours, stats = integrate_tensor_lists([gm, target or gu], out=target)
    ref, info = reference_rule([[torch.view_as_real(t) for t in gm], [torch.view_as_real(t) for t in gu]])
    assert all(o.dtype == torch.complex64 for o in ours)
    _assert_close([torch.view_as_real(o) for o in ours], ref, [gm, gu])
    assert bool(stats.conflict) == info["conflict"]
    assert float(stats.cos_beta) == pytest.approx(info["cos"], abs=1e-6)
    flat, _ = integrate_gradients(
        [torch.cat([t.reshape(-1) for t in lst]) for lst in (gm, gu)], segments=[t.numel() for t in gm]
    )
    torch.testing.assert_close(flat, torch.cat([o.reshape(-1) for o in ours]))
