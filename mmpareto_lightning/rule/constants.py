"""Small constant tensors the rule builds once per layout and device (indices, lengths, clamp values):
building them from Python data every call would copy them from the host each time, a stall on a GPU."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["cached_tensor"]

_INDEX_CACHE: dict[tuple[object, ...], Tensor] = {}


def cached_tensor(key: tuple[object, ...], make: Callable[[], Tensor]) -> Tensor:
    """A small constant tensor (indices, lengths) made once per layout and device: building it from
    Python data every call would copy it from the host each time."""
    value = _INDEX_CACHE.get(key)
    if value is None:
        if len(_INDEX_CACHE) >= 256:
            _INDEX_CACHE.clear()
        value = _INDEX_CACHE[key] = make()
    return value
