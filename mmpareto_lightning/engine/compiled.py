"""``torch.compile``'d encoders and heads: backward graphs that can run twice in one step.

The split runs the backward of the heads and of the encoders more than once per step: the head-level
cotangents and the extra VJP keep the graph (``retain_graph=True``), then the ordinary backward runs.
A compiled region whose backward "donates" its saved activations (AOTAutograd lets Inductor overwrite
them in place, ``torch._functorch.config.donated_buffer``, on by default) cannot do that: torch refuses
(``RuntimeError: This backward function was compiled with non-empty donated buffers ...``), or, once that
check is switched off, the second backward silently reads overwritten activations.

Where the setting acts (read in torch 2.14's sources, and measured there):

* at **compile time**, which is the first forward through the region (inside the split's capture
  block), AOTAutograd decides which saved activations are donated. With static shapes the backward
  graph is only lowered at its first backward, and a first backward that keeps the graph lowers it
  without donation; with dynamic shapes (``dynamic=True``, or automatically after a batch of another
  size) it is lowered right away, with donation.
* at **backward time** torch checks ``donated_buffer`` again and raises for a graph kept alive, also for
  a region compiled without donation (its list of donated buffers is then unset, not empty).
* Inductor's on-disk FX graph cache does not key the backward graph on donation: a backward compiled
  with donation by another run (a plain baseline on the same model) is served to a compile that asked
  for none, and the second backward is silently wrong.

So :class:`RetainedGraphCompile` holds, around the forward and around the split's own graph-keeping
backward calls, ``donated_buffer=False`` and a suffix on ``torch.compiler.config.cache_key_tag`` (the
regions compiled there get cache entries of their own, all without donation, so a warm cache still
speeds up later runs), and restores both exactly afterwards. Lightning's ordinary backward, the
validation loop and everything else run under the user's settings. A region compiled with donation
*before* the fit (same process, same code) is refused by :func:`refuse_donated`, since only a fresh
compile can undo it.
"""

from __future__ import annotations

from types import TracebackType

from torch import nn

from mmpareto_lightning.engine.safeguards import GradientSplittingError

__all__ = [
    "CACHE_TAG",
    "RetainedGraphCompile",
    "has_compiled_modules",
    "is_compiled_region",
    "refuse_donated",
]

CACHE_TAG = "+mmpareto-lightning:retained-graph"


def has_compiled_modules(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule is compiled: an ``OptimizedModule`` (``torch.compile(m)``) or
    compiled in place (``m.compile()``)."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None or type(sub).__name__ == "OptimizedModule":
            return True
    return False


def is_compiled_region(node: object) -> bool:
    """Whether an autograd node is the backward of a region compiled by AOTAutograd."""
    return hasattr(getattr(node, "_forward_cls", None), "compiled_bw") and hasattr(
        getattr(node, "_forward_cls", None), "metadata"
    )


def refuse_donated(node: object, where: str) -> None:
    """Refuse a compiled region whose backward is already lowered with donated buffers.

    Raises:
        GradientSplittingError: naming ``where`` the region sits and the fix.
    """
    function = getattr(node, "_forward_cls", None)
    if getattr(function, "compiled_bw", None) is None:
        return  # not lowered yet: its first backward (the split's, keeping the graph) lowers it without
    if getattr(getattr(function, "metadata", None), "bw_donated_idxs", None):
        raise GradientSplittingError(
            f"A torch.compile'd region in {where} was compiled before this step with donated buffers "
            "(torch._functorch.config.donated_buffer=True, e.g. by a fit or loop without MMPareto in this "
            "process, on the same model code), so its backward cannot run twice as the per-loss split "
            "needs. Call torch._dynamo.reset() before the fit: MMPareto compiles the regions again on its "
            "first step, without donated buffers."
        )


class RetainedGraphCompile:
    """Context manager: ``torch.compile`` settings under which a region's backward can run twice.

    Sets ``torch._functorch.config.donated_buffer = False`` and appends :data:`CACHE_TAG` to
    ``torch.compiler.config.cache_key_tag``; restores both values exactly on exit. A no-op when
    ``enabled`` is false (no compiled region in the model), so models without ``torch.compile`` run
    entirely under the user's settings.

    Example::

        with RetainedGraphCompile(enabled=True):
            losses = model(batch)        # compiles here, without donated buffers
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        for config, name, value in _settings():
            self._saved.append((config, name, getattr(config, name)))
            setattr(config, name, value)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        while self._saved:
            config, name, value = self._saved.pop()
            setattr(config, name, value)


def _settings() -> list[tuple[object, str, object]]:
    """(config module, name, value) to set; settings an older torch lacks are left out (torch < 2.5 has
    no donated buffers)."""
    import torch._functorch.config as functorch_config

    out: list[tuple[object, str, object]] = []
    if hasattr(functorch_config, "donated_buffer"):
        out.append((functorch_config, "donated_buffer", False))
    try:
        import torch.compiler.config as compiler_config
    except ImportError:
        return out
    tag = getattr(compiler_config, "cache_key_tag", None)
    if isinstance(tag, str) and not tag.endswith(CACHE_TAG):  # nested blocks tag once
        out.append((compiler_config, "cache_key_tag", tag + CACHE_TAG))
    return out
