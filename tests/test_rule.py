"""The rule against an independent float64 re-derivation, on random and adversarial gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import kkt_alpha_is_optimal, reference_rule

from mmpareto_lightning import (
    RuleConfig,
    integrate_gradient_lists,
    integrate_gradients,
    min_norm_2,
    min_norm_simplex,
)

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
