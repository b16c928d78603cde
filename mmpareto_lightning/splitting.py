"""Per-objective encoder gradients from one forward pass, at the cost of one extra encoder backward.

The scheme (``SPEC.md`` section 5):

1. Forward hooks on the encoder modules capture each encoder's output ``z_k`` during the forward.
2. The head-level cotangents ``dL_j / dz_k`` of every loss are taken with ``torch.autograd.grad``; this
   only differentiates the heads, which is cheap, and tells which losses reach which encoder.
3. For every encoder, one objective (its own unimodal loss) is the *main* objective; the others (the
   multimodal loss, plus any extra loss that reaches it) are *extra* objectives. Their encoder gradients
   are vector-Jacobian products of ``z_k`` with their cotangents: one extra backward through the
   encoders per extra objective, batched over all encoders (the paper's setting needs exactly one).
4. The ordinary backward of the summed loss then runs unchanged (so DDP's gradient bucketing and AMP's
   loss scaling keep working) with a hook on each ``z_k`` that replaces its incoming gradient by the main
   objective's cotangent: the encoders' ``.grad`` become exactly the main objective's gradient, while the
   heads get the usual gradient of the summed loss.

Encoder ``.grad`` tensors are views into one flat buffer per encoder and the extra objectives' gradients
live in one flat buffer for all encoders, so the rule runs on contiguous memory without copies and a
distributed run averages all extra gradients with a single collective.

Nothing here knows Lightning: ``backward_fn`` and ``scale_fn`` let the caller plug in
``LightningModule.manual_backward`` and a ``GradScaler``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["EncoderObjectives", "GradientSplitter", "GradientSplittingError"]


class GradientSplittingError(ValueError):
    """The losses or the encoders do not allow an exact per-objective split of the gradients."""


@dataclass
class EncoderObjectives:
    """The gradient layout of one encoder.

    Attributes:
        name: the encoder's name (also the key of its unimodal loss).
        params: the encoder's trainable parameters, in layout order.
        segments: number of elements of each parameter in the flat layout.
        objectives: names of the losses that reach the encoder; ``objectives[0]`` is the multimodal loss,
            ``objectives[1]`` the encoder's own loss, then the others in the order the losses were given.
        grads: one flat gradient per objective (views into the splitter's buffers), valid after
            :meth:`GradientSplitter.backward` until :meth:`GradientSplitter.close_window`.
    """

    name: str
    params: list[nn.Parameter]
    segments: list[int]
    objectives: list[str] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(self.segments)


_BackwardFn = Callable[[Tensor], None]
_ScaleFn = Callable[[Tensor], Tensor]


def _default_backward(loss: Tensor) -> None:
    loss.backward()


def _identity(loss: Tensor) -> Tensor:
    return loss


def _accumulate_into(view: Tensor, zero: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        view.add_(grad.reshape(-1))
        return zero.expand_as(grad)

    return hook


def _flatten_tensors(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _flatten_tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _flatten_tensors(v)]
    return []


class GradientSplitter:
    """Computes, in one training step, each objective's exact gradient on each encoder.

    Args:
        encoders: name -> encoder module. Each encoder's unimodal loss is the loss with the same name.
        multimodal_key: name of the multimodal loss.

    Raises:
        GradientSplittingError: no encoders, a name equal to ``multimodal_key``, an encoder without
            trainable parameters, or a parameter shared by two encoders.

    Example::

        splitter = GradientSplitter({"audio": net.audio, "visual": net.visual})
        with splitter.capture():
            losses = compute_losses(net, batch)    # {"multimodal": ..., "audio": ..., "visual": ...}
        layouts = splitter.backward(losses)        # also runs the ordinary backward of the sum
        g_mm, g_audio = layouts["audio"].grads     # flat gradients of the audio encoder
    """

    def __init__(self, encoders: Mapping[str, nn.Module], multimodal_key: str = "multimodal") -> None:
        if not encoders:
            raise GradientSplittingError("At least one encoder is needed; got an empty mapping.")
        if multimodal_key in encoders:
            raise GradientSplittingError(
                f"An encoder is named {multimodal_key!r}, which is also the multimodal loss's key; rename "
                "the encoder or pass another `multimodal_key`."
            )
        owner: dict[int, str] = {}
        self.layouts: dict[str, EncoderObjectives] = {}
        for name, module in encoders.items():
            if not isinstance(module, nn.Module):
                raise GradientSplittingError(
                    f"Encoder {name!r} must be an nn.Module, got {type(module).__name__}."
                )
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise GradientSplittingError(f"Encoder {name!r} has no parameter that requires grad.")
            for p in params:
                if id(p) in owner:
                    raise GradientSplittingError(
                        f"A parameter of shape {tuple(p.shape)} belongs to both encoder {owner[id(p)]!r} "
                        f"and encoder {name!r}; encoders must not share parameters (nested or tied "
                        "modules). Give each encoder its own parameters."
                    )
                owner[id(p)] = name
            self.layouts[name] = EncoderObjectives(name, params, [p.numel() for p in params])
        self.multimodal_key = multimodal_key
        self._encoders = dict(encoders)
        self._outputs: dict[str, list[Tensor]] = {name: [] for name in encoders}
        self._capturing = False
        self._handles = [
            module.register_forward_hook(self._make_capture_hook(name)) for name, module in encoders.items()
        ]
        self._extra_offsets: dict[str, int] = {}
        self._extra_buffer: Tensor | None = None
        self._checked_graph = False
        self._window_open = False
        self.loss_finite: Tensor | None = None
        self.loss_names: list[str] = []

    # ------------------------------------------------------------------ capture
    def _make_capture_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if self._capturing and torch.is_grad_enabled():
                self._outputs[name].extend(t for t in _flatten_tensors(output) if t.requires_grad)

        return hook

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the encoders' outputs during the forward pass run inside this block."""
        for outputs in self._outputs.values():
            outputs.clear()
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the encoders."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def extra_buffer(self) -> Tensor | None:
        """Flat buffer with every extra objective's gradient of every encoder (for one all-reduce)."""
        return self._extra_buffer

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        losses: Mapping[str, Tensor],
        backward_fn: _BackwardFn | None = None,
        scale_fn: _ScaleFn | None = None,
        accumulate: bool = False,
    ) -> dict[str, EncoderObjectives]:
        """Split the encoder gradients per objective and run the ordinary backward of the summed loss.

        Args:
            losses: name -> scalar loss, from a forward run inside :meth:`capture`.
            backward_fn: runs the ordinary backward of a loss (default ``loss.backward()``; Lightning
                passes ``manual_backward``, a GradScaler user ``lambda t: scaler.scale(t).backward()``).
            scale_fn: the loss scaling ``backward_fn`` applies (e.g. ``scaler.scale``), so that the
                per-objective gradients carry the same scale as ``.grad``.
            accumulate: add to the gradients of the previous calls instead of starting a new window.

        Returns:
            The layout of every encoder, whose ``grads`` now hold the per-objective gradients (summed
            over the window when accumulating). ``.grad`` of the encoder parameters is
            ``grads[1]``, the unimodal gradient, until the rule overwrites it.

        Raises:
            GradientSplittingError: for losses or encoder outputs that do not allow the exact split.
        """
        backward_fn = backward_fn or _default_backward
        scale_fn = scale_fn or _identity
        losses = self._validate_losses(losses)
        names = list(losses)
        all_outputs: list[Tensor] = []
        owner: list[str] = []
        for enc, outs in self._outputs.items():
            if not outs:
                raise GradientSplittingError(
                    f"Encoder {enc!r} produced no output that requires grad during the forward pass. Call "
                    "the encoder module itself (its forward hooks capture the output) inside the training "
                    "step, with gradients enabled (reentrant activation checkpointing of inputs that do not "
                    "require grad also drops the graph: use checkpoint(..., use_reentrant=False))."
                )
            all_outputs.extend(outs)
            owner.extend([enc] * len(outs))

        # Head-level cotangents: cot[loss][i] is d(scaled loss)/d(output i), None if it does not depend.
        scaled = {n: scale_fn(loss) for n, loss in losses.items()}
        cot: dict[str, list[Tensor | None]] = {}
        for n in names:
            if scaled[n].requires_grad:
                cot[n] = list(
                    torch.autograd.grad(scaled[n], all_outputs, retain_graph=True, allow_unused=True)
                )
            else:
                cot[n] = [None] * len(all_outputs)

        changed = self._assign_objectives(names, cot, owner)
        if not self._checked_graph:
            self._check_graph(losses, all_outputs)
            self._checked_graph = True

        new_window = not (accumulate and self._window_open)
        if changed and not new_window:
            raise GradientSplittingError(
                "The losses that reach the encoders changed within an accumulation window "
                f"(now {[layout.objectives for layout in self.layouts.values()]}); every accumulated batch "
                "must return the same named losses."
            )
        self._ensure_buffers()
        if new_window:
            assert self._extra_buffer is not None
            # One fill for all encoders; parameters an objective does not reach keep a zero gradient.
            self._extra_buffer.zero_()
        self._extra_vjps(cot, owner, all_outputs)

        finite = torch.stack([torch.isfinite(losses[n].detach()).all() for n in names])
        if new_window or self.loss_finite is None or names != self.loss_names:
            self.loss_finite, self.loss_names = finite, names
        else:
            self.loss_finite = self.loss_finite & finite

        if new_window:
            # The main objective's buffer is allocated only now, after the extra backward: at that
            # memory peak (the whole graph retained) it does not exist yet, as .grad does not in a plain
            # step. The splitter lets go of it when the window closes; .grad keeps it until zero_grad.
            for layout in self.layouts.values():
                main = torch.zeros(layout.numel, dtype=layout.params[0].dtype, device=layout.params[0].device)
                extras = self._extra_views(layout)
                layout.grads = [extras[0], main, *extras[1:]]
        # A stale .grad from before the window is replaced, not kept: the buffer starts at zero.
        self._bind_grads(keep_values=False)

        handles: list[RemovableHandle] = []
        for i, (out, enc) in enumerate(zip(all_outputs, owner, strict=True)):
            main = cot[self.layouts[enc].objectives[1]][i]
            replacement = main if main is not None else torch.zeros_like(out)
            handles.append(out.register_hook(lambda _grad, r=replacement: r))
        try:
            backward_fn(sum(losses.values()))  # type: ignore[arg-type]
        finally:
            for h in handles:
                h.remove()
        # Something may have replaced a .grad (DDP with gradient_as_bucket_view=True): copy it back in.
        self._bind_grads(keep_values=True)
        self._window_open = True
        return self.layouts

    def close_window(self) -> None:
        """Mark the end of an accumulation window: the next :meth:`backward` starts from zero."""
        self._window_open = False
        for layout in self.layouts.values():
            layout.grads = []

    # ------------------------------------------------------------------ internals
    def _validate_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(losses, Mapping):
            raise GradientSplittingError(
                f"Losses must be a mapping of name -> scalar loss tensor, got {type(losses).__name__}."
            )
        required = [self.multimodal_key, *self.layouts]
        missing = [k for k in required if k not in losses]
        if missing:
            raise GradientSplittingError(
                f"Missing loss(es) {missing}: got keys {sorted(losses)}. The multimodal loss must be under "
                f"{self.multimodal_key!r} and each encoder's unimodal loss under the encoder's name."
            )
        checked: dict[str, Tensor] = {}
        for name, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
                raise GradientSplittingError(f"Loss {name!r} must be a scalar tensor, got {what}.")
            if not loss.requires_grad:
                raise GradientSplittingError(
                    f"Loss {name!r} does not require grad: it was computed without gradients or detached."
                )
            checked[name] = loss.reshape(())
        return checked

    def _assign_objectives(
        self, names: Sequence[str], cot: Mapping[str, list[Tensor | None]], owner: list[str]
    ) -> bool:
        """Objectives of every encoder from which losses reach it; returns whether any changed."""
        changed = False
        for enc, layout in self.layouts.items():
            idx = [i for i, o in enumerate(owner) if o == enc]
            reaching = [n for n in names if any(cot[n][i] is not None for i in idx)]
            for required, role in ((self.multimodal_key, "multimodal"), (enc, "unimodal")):
                if required not in reaching:
                    raise GradientSplittingError(
                        f"The {role} loss {required!r} does not depend on the output of encoder {enc!r}, so "
                        "there is nothing to integrate. Compute it from that encoder's output (for the "
                        "unimodal loss: a unimodal head on the encoder's features)."
                    )
            others = [n for n in reaching if n not in (self.multimodal_key, enc)]
            objectives = [self.multimodal_key, enc, *others]
            if objectives != layout.objectives:
                layout.objectives = objectives
                self._extra_buffer = None  # the layout changed: buffers are rebuilt
                changed = True
        return changed

    def _ensure_buffers(self) -> None:
        """Allocate the persistent flat buffer of the extra objectives (again if the layout changed)."""
        first = next(iter(self.layouts.values())).params[0]
        if self._extra_buffer is not None and self._extra_buffer.device == first.device:
            return
        for layout in self.layouts.values():
            dtypes = {p.dtype for p in layout.params}
            if len(dtypes) != 1:
                raise GradientSplittingError(
                    f"Encoder {layout.name!r} mixes parameter dtypes {sorted(map(str, dtypes))}; the "
                    "flat gradient buffers need one dtype per encoder."
                )
        offset = 0
        for layout in self.layouts.values():
            self._extra_offsets[layout.name] = offset
            offset += layout.numel * (len(layout.objectives) - 1)  # every objective but the main one
        self._extra_buffer = torch.zeros(offset, dtype=first.dtype, device=first.device)

    def _extra_views(self, layout: EncoderObjectives) -> list[Tensor]:
        """Flat views of the extra buffer for ``layout``'s objectives 0, 2, 3, ... (not the main one)."""
        assert self._extra_buffer is not None
        start = self._extra_offsets[layout.name]
        return list(
            self._extra_buffer[start : start + layout.numel * (len(layout.objectives) - 1)].split(
                layout.numel
            )
        )

    def _extra_vjps(
        self,
        cot: Mapping[str, list[Tensor | None]],
        owner: list[str],
        outputs: list[Tensor],
    ) -> None:
        # Round r differentiates, for every encoder that has one, its r-th extra objective: all encoders
        # go through a single autograd call, so the paper's setting costs one extra encoder backward.
        extra_index = {name: [0, *range(2, len(layout.objectives))] for name, layout in self.layouts.items()}
        rounds = max(len(v) for v in extra_index.values())
        for r in range(rounds):
            outs, cots, params, targets = [], [], [], []
            for enc, layout in self.layouts.items():
                if r >= len(extra_index[enc]):
                    continue
                k = extra_index[enc][r]
                objective = layout.objectives[k]
                target = self._extra_views(layout)[0 if k == 0 else k - 1]
                for i, o in enumerate(owner):
                    c = cot[objective][i]
                    if o == enc and c is not None:
                        outs.append(outputs[i])
                        cots.append(c)
                params.extend(layout.params)
                targets.extend(target.split(layout.segments))
            zero = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
            # Each parameter's gradient is added into its flat view by a hook as soon as autograd has
            # it, and the hook hands autograd back an expanded zero: the results of autograd.grad hold
            # no memory, so no second copy of the encoder gradients exists at any point.
            handles = [
                p.register_hook(_accumulate_into(view, zero)) for p, view in zip(params, targets, strict=True)
            ]
            try:
                torch.autograd.grad(outs, params, cots, retain_graph=True, allow_unused=True)
            finally:
                for handle in handles:
                    handle.remove()

    def _bind_grads(self, keep_values: bool) -> None:
        """Point each encoder parameter's ``.grad`` at its view of the main objective's flat buffer."""
        for layout in self.layouts.values():
            views = layout.grads[1].split(layout.segments)
            for p, view in zip(layout.params, views, strict=True):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    if keep_values and p.grad is not None:
                        view.copy_(p.grad.reshape(-1))
                    p.grad = view.view_as(p)

    def _check_graph(self, losses: Mapping[str, Tensor], outputs: list[Tensor]) -> None:
        # One walk of the autograd graph on the first step: a loss that reaches encoder parameters other
        # than through the captured outputs would make the split silently wrong.
        stops = {o.grad_fn for o in outputs if o.grad_fn is not None}
        param_owner = {id(p): layout.name for layout in self.layouts.values() for p in layout.params}
        for name, loss in losses.items():
            seen: set[object] = set()
            stack = [loss.grad_fn]
            while stack:
                node = stack.pop()
                if node is None or node in seen or node in stops:
                    continue
                seen.add(node)
                variable = getattr(node, "variable", None)
                if variable is not None and id(variable) in param_owner:
                    raise GradientSplittingError(
                        f"Loss {name!r} reaches a parameter of encoder {param_owner[id(variable)]!r} "
                        f"(shape {tuple(variable.shape)}) without passing through the encoder's output, so "
                        "its gradient cannot be split exactly. Compute losses only from the encoders' "
                        "outputs (no losses on intermediate features or parameters shared with a head)."
                    )
                stack.extend(next_node for next_node, _ in node.next_functions)
        # Reentrant checkpointing hides the encoder's parameters from the graph (its node only links
        # to the inputs), so a vector-Jacobian product would silently return no gradient.
        seen = set()
        stack = [o.grad_fn for o in outputs]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "CheckpointFunctionBackward":
                raise GradientSplittingError(
                    "Reentrant activation checkpointing inside an encoder hides its parameters from "
                    "torch.autograd.grad, so the per-loss gradients would be lost. Use "
                    "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
                )
            stack.extend(next_node for next_node, _ in node.next_functions)
