"""The rule against an independent float64 re-derivation, on random and adversarial gradients.

Every tolerance is a bound stated in ``_reference.py``: the Gram entries' round-off (exact products, a
float64 sum), the write's round-off, and the decisions' sensitivity to the former, measured by moving
the exact Gram entries as far as the bound allows. None is a number that passed on one CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from _reference import (
    assert_rule_output,
    decide,
    decision_sensitivity,
    exact_grams,
    gram_error_bound,
    kkt_alpha_is_optimal,
    reference_rule,
)
from torch.utils._python_dispatch import TorchDispatchMode

from mmpareto_lightning import (
    RuleConfig,
    integrate_gradient_lists,
    integrate_gradients,
    integrate_tensor_lists,
    min_norm_2,
    min_norm_simplex,
)
from mmpareto_lightning.rule import chunked, integrate_encoders, passes
from mmpareto_lightning.rule.decide import decide as decide_grams
from mmpareto_lightning.rule.passes import PIECE, SMALL, tensor_grams

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


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_rule_matches_reference_on_adversarial_gradients(case: str, strategy: str, rescale: str) -> None:
    gm, gu = CASES[case]
    ours, stats = integrate_gradient_lists([gm, gu], RuleConfig(strategy=strategy, rescale=rescale))
    assert_rule_output(ours, [gm, gu], strategy, rescale, stats=stats)
    assert all(torch.isfinite(t).all() for t in ours)
    assert bool(stats.finite) and bool(stats.fits)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_rule_matches_reference_on_random_gradients(seed: int, rescale: str) -> None:
    gm, gu = _conflicting(seed) if seed % 2 else (_random(seed), _random(seed + 50))
    gamma = [None, 1.0, 2.5][seed % 3]
    ours, stats = integrate_gradient_lists([gm, gu], RuleConfig(rescale=rescale, gamma=gamma))
    assert_rule_output(ours, [gm, gu], "mmpareto", rescale, gamma, stats=stats)


@pytest.mark.parametrize("exponent", [-60, -20, 0, 16, 40, 50])
@pytest.mark.parametrize("multi_tensor", [False, True])
def test_rule_is_scale_equivariant(
    exponent: int, multi_tensor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AMP multiplies every gradient by a power-of-two loss scale; the rule must commute with that, and
    # does so exactly: the Gram entries' products are exact and scale by 2**(2 e), every decision is a
    # ratio of them, and h scales by 2**e in the same float32 roundings (nothing under- or overflows).
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: multi_tensor)
    gm, gu = _conflicting(7)
    scale = 2.0**exponent
    base, base_stats = integrate_gradient_lists([gm, gu])
    scaled, stats = integrate_gradient_lists([[t * scale for t in gm], [t * scale for t in gu]])
    for b, s in zip(base, scaled, strict=True):
        assert torch.equal(s / scale, b)
    for a, b in zip(stats, base_stats, strict=True):
        assert torch.equal(a, b)


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
    # ||h|| = ||sum g|| exactly in float64; the float32 write moves each entry by at most 5 u |h_e|.
    assert float(torch.cat([t.reshape(-1) for t in h_enc]).double().norm()) == pytest.approx(
        float(total), rel=5 * 2.0**-24
    )


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
    gram = torch.from_numpy(exact_grams(g)[0].sum(0))
    alpha = min_norm_simplex(gram).numpy()
    assert kkt_alpha_is_optimal(gram.numpy(), alpha)
    ours, stats = integrate_gradient_lists(g, RuleConfig(strategy=strategy))
    # The min-norm point is unique but its weights need not be (two identical gradients): the package's
    # weights, certified optimal above, go to the reference.
    assert_rule_output(ours, g, strategy, alpha_k=alpha, stats=stats)


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
    half = [[t.bfloat16() for t in gm], [t.bfloat16() for t in gu]]
    ours, stats = integrate_gradient_lists(half)
    assert all(o.dtype == torch.bfloat16 for o in ours)
    assert_rule_output(ours, half, stats=stats)


# ------------------------------------------------------------------------------------------------------
# The per-tensor core (integrate_tensor_lists): one read pass (per-tensor Gram matrices) and one write.

# On CPU, tensors above passes.PIECE entries go piece by piece (dot products and the write), with a tail;
# those between SMALL and PIECE in one piece; the others are packed together.
BIG_SHAPES = [(3, PIECE // 3 + 5), (7,), (PIECE + 1,), (16, 3, 3, 3), (SMALL + 3,)]
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


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("exponent", [-40, 0, 40])
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
@pytest.mark.parametrize("conflict", [True, False])
def test_tensor_lists_match_reference(k: int, exponent: int, rescale: str, conflict: bool) -> None:
    grads = _objectives(k + exponent, k, BIG_SHAPES + SHAPES, 2.0**exponent, conflict)
    ours, stats = integrate_tensor_lists(grads, RuleConfig(rescale=rescale))
    assert [o.shape for o in ours] == [t.shape for t in grads[0]]
    assert_rule_output(ours, grads, "mmpareto", rescale, stats=stats)


def _gram_sizes_and_kinds() -> list[tuple[int, str]]:
    return [(size, kind) for size in (1, 100, SMALL, SMALL + 1, PIECE, PIECE + 1, 3 * PIECE + 7)
            for kind in ("normal", "positive", "heavy", "cancelling")]  # fmt: skip


@pytest.mark.parametrize(("size", "kind"), _gram_sizes_and_kinds())
@pytest.mark.parametrize("multi_tensor", [False, True])
def test_gram_entries_are_within_the_stated_bound(
    size: int, kind: str, multi_tensor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # multi_tensor=True forces the accelerator path (whole-buffer operations) on CPU.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: multi_tensor)
    gen = torch.Generator().manual_seed(size)
    a = {
        "normal": torch.randn(size, generator=gen),
        "positive": torch.rand(size, generator=gen) + 0.5,
        "heavy": torch.randn(size, generator=gen) ** 5,
        "cancelling": torch.randn(size, generator=gen),
    }[kind]
    b = -0.7 * a + (1e-6 if kind == "cancelling" else 0.5) * torch.randn(size, generator=gen)
    grads = [[a, torch.ones(3)], [b, torch.ones(3)]]  # a second tensor: the first is not alone
    ours = tensor_grams(grads).numpy()
    exact, absolute = exact_grams(grads)
    assert np.all(np.abs(ours[0] - exact[0]) <= gram_error_bound(size) * absolute[0])
    assert ours[0, 0, 1] == ours[0, 1, 0]  # both triangles from one entry


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_the_decision_bound_holds_under_random_round_off(k: int, seed: int) -> None:
    # The tests' tolerance for the decisions (reference.decision_sensitivity) is a first-order bound
    # from moving each Gram entry to the edge of its round-off. Check it against the package's own
    # decisions on Gram matrices moved at random inside that box: they must stay within the bound of the
    # unmoved reference decisions.
    grads = _objectives(seed, k, [*SHAPES, (50,)], conflict=seed % 2 == 0)
    _, info = reference_rule(grads)
    numels = [t.numel() for t in grads[0]]
    bound = decision_sensitivity(info, numels)
    gen = np.random.default_rng(seed)
    for _ in range(20):
        moved = info["gram_t"].copy()
        for t, n in enumerate(numels):
            noise = gen.uniform(-1, 1, (k, k))
            noise = np.triu(noise) + np.triu(noise, 1).T
            moved[t] += noise * gram_error_bound(n) * info["absolute"][t]
        _, (stats,) = decide_grams(torch.from_numpy(moved), [len(numels)], RuleConfig(), float("inf"))
        assert np.all(np.abs(stats.alphas.numpy() * k - info["weights"]) <= bound["weights"] + 1e-15)
        assert abs(float(stats.cos_beta) - info["cos"]) <= bound["cos"] + 1e-15


@pytest.mark.parametrize("alias", [None, 0, 1, "separate", "both"])
def test_tensor_lists_out_may_alias_one_list(alias: int | str | None) -> None:
    grads = _objectives(5, 2, BIG_SHAPES + SHAPES)
    if alias == "both":  # the same tensors as both objectives and as the output
        grads[1] = grads[0]
    inputs = [[t.clone() for t in lst] for lst in grads]
    if alias is None:
        out = None
    elif alias == "separate":
        out = [torch.full_like(t, float("nan")) for t in grads[0]]
    else:
        out = grads[0 if alias == "both" else alias]
    result, stats = integrate_tensor_lists(grads, out=out)
    if out is not None:
        assert all(r is o for r, o in zip(result, out, strict=True))
    assert_rule_output(result, inputs, stats=stats)


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
    # The same Gram entries from the same operations: the same decisions, bit for bit.
    for a, b in zip(flat_stats, list_stats, strict=True):
        assert torch.equal(a, b)
    views = [f.view_as(t) for f, t in zip(flat.split(segments), grads[0], strict=True)]
    assert_rule_output(views, grads, strategy)
    assert_rule_output(listed, grads, strategy)
    # A separate flat output, and one inside a larger buffer (like the engine's shared buffer).
    buffer = torch.full((flat.numel() + 10,), float("nan"))
    separate, _ = integrate_gradients(
        [torch.cat([t.reshape(-1) for t in lst]) for lst in grads], config, segments, out=buffer[3:-7]
    )
    assert_rule_output(
        [f.view_as(t) for f, t in zip(separate.split(segments), grads[0], strict=True)], grads, strategy
    )
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
    assert_rule_output(ours, [gm, gu], strategy, stats=stats)


@pytest.mark.parametrize("piece_chunks", [1, 2, 1 << 11])
@pytest.mark.parametrize(("k", "dtype"), [(2, torch.float32), (3, torch.float32), (2, torch.float64)])
def test_accelerator_path_in_float64_pieces_matches_reference(
    piece_chunks: int, k: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The accelerator path widens PIECE_CHUNKS chunks at a time: pieces that end inside a tensor, a
    # tensor over several pieces, two encoders in one call, ``out`` aliasing the unimodal gradients.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: True)
    monkeypatch.setattr(chunked, "PIECE_CHUNKS", piece_chunks)
    shapes = ([(3, chunked.CHUNK + 7), (5,), (9, 11)], [(2 * chunked.CHUNK + 1,), (4, 4)])
    first, second = (
        [[t.to(dtype) for t in lst] for lst in _objectives(21 + i, k, s)] for i, s in enumerate(shapes)
    )
    inputs = [[[t.clone() for t in lst] for lst in enc] for enc in (first, second)]
    results, stats = integrate_encoders([first, second], RuleConfig(), [first[1], second[1]])
    for ours, given, s in zip(results, inputs, stats, strict=True):
        assert_rule_output(ours, given, stats=s)


def test_accelerator_path_float64_scratch_is_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    # Beside one copy of the gradients in their dtype, the float64 temporaries hold at most a piece per
    # objective (the widened piece) and one more (a product, the write's result): nothing of the
    # encoder's size in float64.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: True)
    monkeypatch.setattr(chunked, "PIECE_CHUNKS", 2)
    grads = _objectives(23, 2, [(3, 5 * chunked.CHUNK + 1), (7 * chunked.CHUNK,), (16, 3, 3, 3)])
    allocations: list[tuple[torch.dtype, int]] = []

    class RecordAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            leaves = pytree.tree_leaves((args, kwargs))
            inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
            for t in pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    allocations.append((t.dtype, t.untyped_storage().nbytes()))
            return result

    with RecordAllocations():
        integrate_tensor_lists(grads, out=grads[1])
    piece_bytes = 2 * chunked.CHUNK * 8
    wide = [n for dtype, n in allocations if dtype == torch.float64]
    assert wide and max(wide) <= 2 * piece_bytes
    total = sum(chunked.chunked_sizes([t.numel() for t in grads[0]]))
    assert max(n for _, n in allocations) <= 2 * total * 4  # the float32 rows


def test_accelerator_path_new_tensors_hold_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without ``out`` the result is new tensors: they must not keep the K rows of the copy alive.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: True)
    grads = _objectives(24, 3, [(3, chunked.CHUNK + 1), (5,)])
    ours, stats = integrate_tensor_lists(grads)
    total = sum(chunked.chunked_sizes([t.numel() for t in grads[0]]))
    assert ours[0].untyped_storage().nbytes() == total * 4
    assert_rule_output(ours, grads, stats=stats)


def test_non_contiguous_and_half_precision_tensor_lists() -> None:
    grads = _objectives(8, 2, [(300, 400), (5, 6)])
    transposed = [[lst[0].t(), lst[1]] for lst in grads]  # a non-contiguous gradient
    ours, stats = integrate_tensor_lists(transposed)
    assert_rule_output(ours, transposed, stats=stats)
    half = [[t.bfloat16() for t in lst] for lst in grads]
    reference_inputs = [[t.clone() for t in lst] for lst in half]
    out, stats = integrate_tensor_lists(half, out=half[1])
    assert all(o is h for o, h in zip(out, half[1], strict=True)) and out[0].dtype == torch.bfloat16
    assert_rule_output(out, reference_inputs, stats=stats)


def test_the_rule_makes_no_large_temporary_on_cpu() -> None:
    # One read pass and one write pass, in place: the only buffers are a float64 scratch of one piece
    # per objective and the packed small tensors; nothing grows with the large tensors' size.
    def largest_allocation(shapes: list[tuple[int, ...]]) -> int:
        grads = _objectives(9, 2, shapes)
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
                        allocations.append(t.untyped_storage().nbytes())
                return result

        with RecordAllocations():
            integrate_tensor_lists(grads, out=grads[1])
        assert allocations
        return max(allocations)

    small = [(7,), (16, 3, 3, 3)]
    scratch = 2 * PIECE * 8  # float64, two objectives
    assert largest_allocation([(3, PIECE // 3 + 5), (PIECE + 1,), *small]) <= scratch
    assert largest_allocation([(3, 4 * PIECE + 5), (5 * PIECE + 1,), *small]) <= scratch


def _resnet18_shapes() -> list[torch.Size]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.fc = torch.nn.Identity()
    return [p.shape for p in net.parameters()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_decisions_are_float64_accurate_at_resnet18_size(device: str) -> None:
    # 11.2M parameters with ResNet-18's shapes; per-tensor scales, offsets and a conflict. A float32
    # dot product over the flattened encoder is off by ~1e-4 here. The reference: per-tensor float64
    # dot products (torch), within gram_error_bound of the exact ones like ours, so the decisions may
    # differ by the sensitivity to twice the bound.
    shapes = _resnet18_shapes()
    assert 11_000_000 < sum(s.numel() for s in shapes) < 11_300_000
    gen = torch.Generator().manual_seed(0)
    gm, gu = [], []
    for t, shape in enumerate(shapes):
        a = torch.randn(shape, generator=gen) * (0.1 + t % 5) + (0.3 if t % 3 == 0 else 0.0)
        gm.append(a)
        gu.append(-0.6 * a + 0.5 * torch.randn(shape, generator=gen) + 0.05)
    on_device = [[t.to(device) for t in lst] for lst in (gm, gu)]
    _, stats = integrate_tensor_lists(on_device)
    grams = tensor_grams(on_device).cpu().numpy()
    reference = np.zeros_like(grams)
    absolute = np.zeros_like(grams)
    for t in range(len(shapes)):
        pair = [gm[t].double().reshape(-1), gu[t].double().reshape(-1)]
        for i in range(2):
            for j in range(2):
                reference[t, i, j] = float(pair[i] @ pair[j])
                absolute[t, i, j] = float(pair[i].abs() @ pair[j].abs())
    numels = [s.numel() for s in shapes]
    bounds = np.array([2 * gram_error_bound(n) for n in numels])[:, None, None] * absolute
    assert np.all(np.abs(grams - reference) <= bounds)
    info = {"gram_t": reference, "absolute": 2 * absolute, "strategy": "mmpareto", "rescale": "per_tensor"}
    info.update(decide(reference))
    sensitivity = decision_sensitivity({**info, "alpha_k": None}, numels)
    assert bool(stats.conflict) and info["conflict"]
    assert abs(float(stats.cos_beta) - info["cos"]) <= sensitivity["cos"] + 1e-13
    assert np.all(np.abs(stats.alphas.cpu().numpy() * 2 - info["weights"]) <= sensitivity["weights"] + 1e-13)
    assert sensitivity["weights"].max() < 1e-9  # the bound is meaningful: far below float32's


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
    assert_rule_output([r.cpu() for r in result], grads, strategy, rescale, stats=stats)


@pytest.mark.parametrize("out", [False, True])
def test_complex_gradients_use_the_real_inner_product(out: bool) -> None:
    # A complex parameter's gradient is the steepest-ascent direction under Re<a, b>: the rule must decide
    # on that inner product (a plain complex dot product neither conjugates nor drops the imaginary part).
    gen = torch.Generator().manual_seed(0)
    gm = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in [(3, 4), (5,), (2, 2, 2)]]
    gu = [-0.7 * t + 0.3 * torch.randn(t.shape, dtype=torch.complex64, generator=gen) for t in gm]
    target = [t.clone() for t in gu] if out else None
    ours, stats = integrate_tensor_lists([gm, target or gu], out=target)
    assert all(o.dtype == torch.complex64 for o in ours)
    real = [[torch.view_as_real(t) for t in gm], [torch.view_as_real(t) for t in gu]]
    assert_rule_output([torch.view_as_real(o) for o in ours], real, stats=stats)
    flat, _ = integrate_gradients(
        [torch.cat([t.reshape(-1) for t in lst]) for lst in (gm, gu)], segments=[t.numel() for t in gm]
    )
    torch.testing.assert_close(flat, torch.cat([o.reshape(-1) for o in ours]))


# ------------------------------------------------------------------------------------------------------
# The whole float32 range: Gram entries are float64 sums of exact float64 products, which neither
# overflow nor underflow for any float32 inputs.

EXPONENTS = [-149, -126, -100, -64, -20, 0, 20, 64, 100, 120, 126]


def _pair_at(seed: int, exponent_m: int, exponent_u: int, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    other = [
        -0.4 * b + 0.3 * torch.randn(s, generator=gen, dtype=torch.float64)
        for b, s in zip(base, shapes, strict=True)
    ]
    # ldexp keeps float64 exact; the float32 rounding (denormals included) happens once, here.
    gm = [torch.ldexp(b, torch.tensor(exponent_m)).float() for b in base]
    gu = [torch.ldexp(o, torch.tensor(exponent_u)).float() for o in other]
    return gm, gu


def _check_range(gm, gu, strategy="mmpareto", rescale="per_tensor") -> None:
    ours, stats = integrate_tensor_lists([gm, gu], RuleConfig(strategy=strategy, rescale=rescale))
    assert bool(stats.finite)
    assert -1.0 <= float(stats.cos_beta) <= 1.0
    if bool(stats.fits):
        assert all(torch.isfinite(o).all() for o in ours)
        assert_rule_output(ours, [gm, gu], strategy, rescale, stats=stats)
    else:
        # Only where the flag's own definition says so: sum_i |c_i| ||g_i||_t, or a coefficient c_i,
        # reaches float32's range.
        _, info = reference_rule([gm, gu], strategy, rescale)
        norms = np.sqrt(np.stack([np.diagonal(g) for g in info["gram_t"]]))
        reach = info["gamma"] * info["factors"] * (norms @ np.abs(info["weights"]))
        largest = info["gamma"] * info["factors"].max() * np.abs(info["weights"]).max()
        limit = torch.finfo(torch.float32).max * (1 - 64 * torch.finfo(torch.float32).eps)
        assert max(reach.max(), largest) >= limit * (1 - 1e-9)


@pytest.mark.parametrize("exponent_m", EXPONENTS)
@pytest.mark.parametrize("exponent_u", EXPONENTS)
@pytest.mark.parametrize("multi_tensor", [False, True])
def test_rule_over_the_whole_float32_range_per_objective(
    exponent_m: int, exponent_u: int, multi_tensor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Entries from float32's smallest denormal (2**-149) to its largest exponent, and one objective up to
    # 2**275 (1e82) times the other.
    monkeypatch.setattr(passes, "_multi_tensor", lambda device: multi_tensor)
    gm, gu = _pair_at(exponent_m + 3 * exponent_u, exponent_m, exponent_u)
    if not any(t.any() for t in gm) or not any(t.any() for t in gu):
        pytest.skip("float32 rounds this scale to zero")
    _check_range(gm, gu)


@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rule_over_the_whole_float32_range_per_tensor(rescale: str, strategy: str) -> None:
    # Within one encoder, tensors from 2**-140 to 2**120, both objectives alike and one 2**100 apart.
    shapes = [(5,), (3, 4), (17,), (2, 3), (9,), (4,), (6,)]
    exponents = [-140, -100, -30, 0, 40, 100, 120]
    gm, gu = _pair_at(0, 0, 0, shapes)
    gm = [torch.ldexp(t.double(), torch.tensor(e)).float() for t, e in zip(gm, exponents, strict=True)]
    gu = [torch.ldexp(t.double(), torch.tensor(e)).float() for t, e in zip(gu, exponents, strict=True)]
    _check_range(gm, gu, strategy, rescale)
    shifted = [
        torch.ldexp(t.double(), torch.tensor(-100 if e > 0 else 0)).float()
        for t, e in zip(gu, exponents, strict=True)
    ]
    _check_range(gm, shifted, strategy, rescale)


def test_the_issue_examples_give_true_cosines() -> None:
    # Two gradients of 1e20 and 2e20 (a float32 dot product overflows): parallel, no conflict.
    h, stats = integrate_tensor_lists([[torch.full((4,), 1e20)], [torch.full((4,), 2e20)]], RuleConfig())
    assert float(stats.cos_beta) == 1.0 and bool(stats.finite) and bool(stats.fits)
    torch.testing.assert_close(h[0], torch.full((4,), 4.5e20), rtol=2.0**-23, atol=0)
    # A multimodal gradient of scale 1e-23 against a unimodal one of 1e-2 (float32 products underflow):
    # the cosine is the true one (it was -1.43, and -1.4e284 at 1e-24).
    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(1000, generator=gen) * 1e-2
    for scale in (1e-23, 1e-24, 1e-30):
        gm = ((-0.3 * gu / 1e-2 + torch.randn(1000, generator=gen)) * scale).float()
        _, stats = integrate_tensor_lists([[gm], [gu]])
        a, b = gm.double(), gu.double()
        true = float(a @ b / (a.norm() * b.norm()))
        assert float(stats.cos_beta) == pytest.approx(true, abs=1e-12)


def test_an_integrated_gradient_beyond_float32_is_flagged() -> None:
    # Finite inputs whose integrated gradient does not fit in float32: `fits` says so (the step must be
    # skipped), `finite` still says the inputs were finite.
    h, stats = integrate_tensor_lists([[torch.full((4,), 3e38)], [torch.full((4,), 3e38)]])
    assert bool(stats.finite) and not bool(stats.fits)
    assert not torch.isfinite(h[0]).all()
    half = [[torch.full((4,), 6e4, dtype=torch.float16)], [torch.full((4,), 6e4, dtype=torch.float16)]]
    _, stats = integrate_tensor_lists(half)  # 1.5 * 1.2e5 > float16's 65504
    assert bool(stats.finite) and not bool(stats.fits)
    _, stats = integrate_tensor_lists([[torch.full((4,), 1e4, dtype=torch.float16)]] * 2)
    assert bool(stats.fits)


@pytest.mark.parametrize("exponent", [-1000, -300, 0, 300, 1000])
def test_float64_gradients_over_their_whole_range(exponent: int) -> None:
    # Float64 products can leave float64's range: one common power of two first (exact), so 1e300
    # gradients neither overflow the Gram entries nor get a false "non-finite".
    gm, gu = _conflicting(3)
    gm = [torch.ldexp(t.double(), torch.tensor(exponent)) for t in gm]
    gu = [torch.ldexp(t.double(), torch.tensor(exponent)) for t in gu]
    ours, stats = integrate_tensor_lists([gm, gu])
    base, base_stats = integrate_tensor_lists([[t.double() for t in lst] for lst in _conflicting(3)])
    assert bool(stats.finite) and bool(stats.fits)
    for a, b in zip(stats, base_stats, strict=True):
        assert torch.equal(a, b)
    for o, b in zip(ours, base, strict=True):
        assert torch.equal(torch.ldexp(o, torch.tensor(-exponent)), b)
