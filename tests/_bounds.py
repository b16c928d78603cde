"""Round-off bounds of the float32 arithmetic around the rule, for the tests that compare computed numbers.

Each bound follows from the IEEE-754 model: one correctly rounded operation returns ``x (1 + d)`` with
``|d| <= u`` (float32: ``u = 2**-24``; float64: ``2**-53``), as long as the result stays normal. The
``gamma`` of Higham (Accuracy and Stability of Numerical Algorithms, 2nd ed., lemma 3.1 and eq. 4.4)
turns ``n`` such factors into one bound without a first-order approximation:

* a sum of ``m`` terms in any order and any association: ``|computed - exact| <= gamma(m - 1) sum |terms|``
  (so two orders of the same sum differ by at most twice that);
* ``n`` roundings in a chain of products and quotients: ``|computed - exact| <= gamma(n) |exact|``.

Where two computations run the same float32 operations on the same inputs in the same order, they agree
bit for bit on whatever CPU runs both (the bits themselves may differ from one CPU to another), and the
tests compare them with equality; the bounds here are for the rest: different orders, sums of a different
length, a float64 reference, an optimizer's own roundings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from _exact import ExpectedUpdate, real

U32 = 2.0**-24
U64 = 2.0**-53


def gamma(n: int, u: float = U32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error of ``n`` chained roundings."""
    n = max(int(n), 0)
    return n * u / (1 - n * u)


def sum_bound(abs_sum, terms: int, u: float = U32):
    """``|computed - exact|`` of a sum of ``terms`` numbers whose magnitudes add up to ``abs_sum``, in any
    order (Higham eq. 4.4, which holds for every summation order)."""
    return gamma(terms - 1, u) * abs_sum


def mean_bound(values: Iterable[float], value_bounds: Iterable[float] | None = None):
    """The exact mean of ``values`` and the bound on the metrics' float32 mean of them.

    What the metrics compute (``MMParetoMetrics``, torchmetrics' ``MeanMetric``): float32 running sums of
    the values, folded into the ``MeanMetric`` in ``F >= 1`` pieces (each piece as ``sum / w``, times
    ``w`` into its state: two roundings), the pieces' products added in float32, and the state divided by
    the total weight at the end; the data-parallel loss means merge the ranks' sums in float64 first and
    enter the ``MeanMetric`` once. Along any of these paths a value meets at most ``m + 2`` float32
    roundings (``m_f - 1`` in its piece's sum, two for the piece, ``F - 1`` adding the pieces, one final
    division; ``m_f + F <= m + 1``), so the result is within ``gamma(m + 2) sum |v| / m`` of the exact
    mean, plus four float64 roundings of it (two in a data-parallel merge, two in this function's own
    ``fsum`` mean).

    Args:
        values: the values as they enter the sums (float32 numbers, given as floats).
        value_bounds: how far each value may be from the number the sum really adds (none: the same
            numbers).

    Returns:
        ``(mean, bound)``.
    """
    values = [float(v) for v in values]
    bounds = [0.0] * len(values) if value_bounds is None else [float(b) for b in value_bounds]
    m = len(values)
    assert m > 0 and len(bounds) == m
    mean = math.fsum(values) / m
    magnitude = sum(abs(v) + b for v, b in zip(values, bounds, strict=True))
    return mean, gamma(m + 2) * magnitude / m + sum(bounds) / m + gamma(4, U64) * abs(mean)


#: Halving a float32 number is exact unless the half is subnormal.
HALVING_EXACT = 2.0 * float(torch.finfo(torch.float32).smallest_normal)


def assert_halving_exact(*tensors: torch.Tensor) -> None:
    """Every nonzero entry is at least twice float32's smallest normal number: halving it is exact, the
    premise of the tests that reproduce a mean of two float32 numbers bit for bit (``RN(a / 2 + b / 2) =
    RN(a + b) / 2``)."""
    for t in tensors:
        magnitude = real(t.detach()).abs()
        assert not bool(((magnitude > 0) & (magnitude < HALVING_EXACT)).any()), (
            "a gradient entry is within a factor 2 of float32's subnormal range: halving it rounds, and a "
            "mean of two such numbers is no longer reproduced bit for bit"
        )


def assert_within(got, want, bound, what: str) -> None:
    """``|got - want| <= bound`` entrywise (arrays or numbers), with the worst entry in the message.

    ``want`` is a float64 reference computed in a few operations: ``gamma(16, U64) |want|`` (sixteen
    float64 roundings) is added for its own evaluation, and the smallest normal float64 for a bound of 0.
    """
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    bound = np.asarray(bound, dtype=np.float64) + gamma(16, U64) * np.abs(want) + np.finfo(np.float64).tiny
    excess = np.abs(got - want) - bound
    if not np.all(excess <= 0):
        worst = int(np.argmax(excess))
        raise AssertionError(
            f"{what}: off by more than the bound at {int((excess > 0).sum())} of {excess.size} entries "
            f"(worst: got {got.flat[worst]!r}, want {want.flat[worst]!r}, bound {bound.flat[worst]:.3e})"
        )


def momentum_sgd(
    gradient: ExpectedUpdate,
    buffers: Mapping[str, torch.Tensor | None],
    momentum: float,
    lr: float,
    skipped: Iterable[str] = (),
) -> tuple[ExpectedUpdate, ExpectedUpdate]:
    """The update and new momentum buffer of ``torch.optim.SGD`` (no dampening, no Nesterov, no weight
    decay) from an expected gradient with its bound, tracking the bound through the step.

    torch computes ``buf = clone(g)`` on a parameter's first step (exact), then ``buf = buf * m + g`` (two
    float32 roundings, with ``m`` itself rounded to float32 first: at most ``2 u m |buf| (1 + u)`` for the
    product and ``u |buf_new|`` for the sum), and ``p = p + (-lr) buf`` (``-lr`` rounded to float32:
    ``u lr |buf_new|``; the product's and the sum's roundings are what ``_exact.assert_moved_by`` adds).
    A parameter without a gradient (in ``skipped``) is skipped by SGD: its update is 0 and its buffer
    stays.

    Args:
        gradient: name -> the gradient the optimizer receives (not its negative), with ``.bounds``.
        buffers: name -> the momentum buffer before the step (``None`` before the first one).
        momentum, lr: the SGD settings.
        skipped: names of the parameters that have no gradient this step (their ``gradient`` entry
            only gives the shape).

    Returns:
        ``(update, buffer)``: the parameter update ``-lr buf_new`` with its bound (the rounding of
        ``p + (-lr) buf`` left to ``assert_moved_by``), and the new buffer with its bound.
    """
    update, new_buffers = ExpectedUpdate(), ExpectedUpdate()
    skipped = set(skipped)
    for name, g in gradient.items():
        bound = gradient.bounds[name]
        previous = buffers.get(name)
        if name in skipped:
            update[name], update.bounds[name] = np.zeros_like(g), np.zeros_like(g)
            if previous is not None:
                kept = real(previous.detach()).double().cpu().numpy()
                new_buffers[name], new_buffers.bounds[name] = kept, np.zeros_like(kept)
            continue
        if previous is None:
            value, value_bound = g, bound
        else:
            old = real(previous.detach()).double().cpu().numpy()
            value = momentum * old + g
            product = 2 * U32 * momentum * np.abs(old) * (1 + U32)
            value_bound = bound + product + U32 * (np.abs(value) + bound + product)
        # (1 + 2 u): room for the float64 evaluation of value and bound here (2**-53 per operation).
        new_buffers[name], new_buffers.bounds[name] = value, value_bound * (1 + 2 * U32)
        update[name] = -lr * value
        update.bounds[name] = lr * new_buffers.bounds[name] + U32 * lr * (np.abs(value) + value_bound)
    return update, new_buffers
