"""Per-objective encoder gradients from one forward pass, at the cost of one extra encoder backward.

The scheme (``SPEC.md`` section 5):

1. The encoders' outputs are captured behind a fresh autograd boundary during the forward
   (:mod:`mmpareto_lightning.engine.capture`).
2. A walk of the heads' autograd nodes (no backward) tells which losses reach which encoder's outputs.
3. For every encoder, one objective (its own unimodal loss) is the *main* objective; the others (the
   multimodal loss, plus any extra loss that reaches it) are *extra* objectives. Their encoder gradients
   come straight from their losses (:mod:`.backward_calls`): one backward per extra loss, over every
   encoder it reaches (the paper's setting needs exactly one), each gradient exactly what plain
   ``torch.autograd.grad`` of that loss gives. Autograd hands back one fresh tensor per parameter: no
   flat copy, no add.
4. One backward through the heads alone gives every encoder's main cotangent ``dL_k / dz_k`` at its
   outputs. The ordinary backward of the summed loss then runs unchanged (so DDP's gradient bucketing
   and AMP's loss scaling keep working) with a hook on each ``z_k`` that replaces its incoming gradient by
   that cotangent: the encoders' ``.grad`` become exactly the main objective's gradient, while the heads
   get the usual gradient of the summed loss.

Under FSDP2 the extra objectives' gradients come from real backward passes that FSDP reduce-scatters
(:mod:`.sharded_split`).

The layout follows the model as it changes: an encoder's trainable parameters are read every step (so
freezing and unfreezing during a fit work), a fully frozen encoder is skipped, and an encoder that was
not called in a step (a missing modality, its unimodal loss absent) gets no gradient, as plain autograd
would give.

Data-parallel ranks must integrate the same encoders with the same objectives, in the same order, even
when they saw different data: ``backward(agree=...)`` hands the caller this rank's objectives before the
ordinary backward, and the caller returns the union over the ranks. An encoder or objective this rank
lacks then enters with zero gradients, which is what the rank contributes to the average the rule sees.

Nothing here knows Lightning: ``backward_fn`` and ``scale_fn`` let the caller plug in
``LightningModule.manual_backward`` and a ``GradScaler``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmpareto_lightning.distributed.sharded import (
    ShardedEncoders,
    ShardingError,
    keep_gathered,
    local_tensors,
)
from mmpareto_lightning.engine import sharded_split
from mmpareto_lightning.engine.backward_calls import Replace, cotangents, extra_objectives, main_cotangents
from mmpareto_lightning.engine.capture import OutputCapture
from mmpareto_lightning.engine.compiled import (
    RetainedGraphCompile,
    has_compiled_modules,
    is_compiled_region,
    refuse_donated,
)
from mmpareto_lightning.engine.objectives import (
    RESERVED_LOSS_KEYS,
    EncoderObjectives,
    no_output_message,
    not_reaching_message,
    validate_losses,
)
from mmpareto_lightning.engine.safeguards import (
    GradientSplittingError,
    buffers_kept,
    check_graph,
    check_strided,
    losses_reaching,
    post_accumulate_grad_hooks_held,
    run_post_accumulate_grad_hooks,
)

__all__ = ["RESERVED_LOSS_KEYS", "AgreeFn", "EncoderObjectives", "GradientSplitter", "GradientSplittingError"]

_BackwardFn = Callable[[Tensor], None]
_ScaleFn = Callable[[Tensor], Tensor]
# (this rank's objectives per encoder of the window, in encoder order; trainable encoders not called in
# this step) -> the objectives of every encoder that takes part on some rank, in an order every rank shares.
AgreeFn = Callable[[dict[str, list[str]], list[str]], Mapping[str, Sequence[str]]]


def _default_backward(loss: Tensor) -> None:
    loss.backward()


def _identity(loss: Tensor) -> Tensor:
    return loss


class GradientSplitter:
    """Computes, in one training step, each objective's exact gradient on each encoder.

    Args:
        encoders: name -> encoder module. Each encoder's unimodal loss is the loss with the same name.
        multimodal_key: name of the multimodal loss.
        param_names: ``id(parameter)`` -> its name in the model, for error messages.

    Raises:
        GradientSplittingError: no encoders, a name equal to ``multimodal_key`` or reserved, or a
            parameter shared by two encoders.

    Example::

        splitter = GradientSplitter({"audio": net.audio, "visual": net.visual})
        with splitter.capture():
            losses = compute_losses(net, batch)    # {"multimodal": ..., "audio": ..., "visual": ...}
        layouts = splitter.backward(losses)        # also runs the ordinary backward of the sum
        g_mm, g_audio = layouts["audio"].grads     # per-parameter gradients of the audio encoder
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        multimodal_key: str = "multimodal",
        param_names: Mapping[int, str] | None = None,
    ) -> None:
        if not encoders:
            raise GradientSplittingError("At least one encoder is needed; got an empty mapping.")
        for name in (multimodal_key, *RESERVED_LOSS_KEYS):
            if name in encoders:
                raise GradientSplittingError(
                    f"An encoder is named {name!r}, which is also "
                    + ("the multimodal loss's key" if name == multimodal_key else "a reserved loss key")
                    + "; rename the encoder"
                    + (" or pass another `multimodal_key`." if name == multimodal_key else ".")
                )
        owner: dict[int, str] = {}
        for name, module in encoders.items():
            if not isinstance(module, nn.Module):
                raise GradientSplittingError(
                    f"Encoder {name!r} must be an nn.Module, got {type(module).__name__}."
                )
            for p in module.parameters():
                if id(p) in owner:
                    raise GradientSplittingError(
                        f"A parameter of shape {tuple(p.shape)} belongs to both encoder {owner[id(p)]!r} "
                        f"and encoder {name!r}; encoders must not share parameters (nested or tied "
                        "modules). Give each encoder its own parameters."
                    )
                owner[id(p)] = name
        self.multimodal_key = multimodal_key
        self.encoders = dict(encoders)
        # Encoders sharded with FSDP2 (``fully_shard``): see mmpareto_lightning.engine.sharded_split.
        try:
            self.sharded = ShardedEncoders.detect(self.encoders)
        except ShardingError as err:
            raise GradientSplittingError(str(err)) from err
        if self.sharded is not None:
            owner = {id(p): name for name in self.encoders for p in self.sharded.parameters(name)}
        # Sharded: the FSDP modules that ran forward in the step, and how to let them reshard again.
        self._fsdp_modules: dict[int, nn.Module] = {}
        self._release_gathered: Callable[[], None] = sharded_split.nothing
        # Each encoder's modules, listed once: its parameters and buffers are then read from their own
        # dicts every step (a module walk per step costs milliseconds on a ResNet; reading the dicts
        # still sees a parameter or buffer reassigned or registered later).
        self._modules = {name: list(module.modules()) for name, module in self.encoders.items()}
        self._params = {name: self._all_params(name) for name in self.encoders}
        # Encoder parameters whose post-accumulate-grad hooks were held in this window's backward passes.
        self._held_hooks: dict[int, Tensor] = {}
        self._param_names = dict(param_names or {})
        self._owner = owner
        # Encoder buffers as they were before the extra backward, restored if it changed them.
        self._snapshots: dict[str, list[Tensor]] = {}
        self._filled: set[int] = set()
        self._capture = OutputCapture(self.encoders)
        self.layouts: dict[str, EncoderObjectives] = {}
        self._window_open = False
        # Data parallel: a parameter no loss reached keeps a zero gradient (the same on every rank) instead
        # of None, since a rank cannot tell without a collective whether another rank reached it.
        self.zero_absent = False
        self.loss_finite: Tensor | None = None
        self.loss_names: list[str] = []
        # torch.compile'd regions in the model (encoders here; the caller may add heads, and the graph
        # walk adds any it meets): the forward and the graph-keeping backward calls then run under
        # RetainedGraphCompile, so that their backward can run twice.
        self.compiled = any(has_compiled_modules(m) for m in self.encoders.values())

    # ------------------------------------------------------------------ capture
    def capture(self) -> AbstractContextManager[None]:
        """Record the encoders' outputs during the forward pass run inside this block.

        With compiled regions in the model (:attr:`compiled`), the block also holds the compile settings
        of :class:`~mmpareto_lightning.engine.compiled.RetainedGraphCompile`, since compiling happens at
        the first forward.
        """
        return self._capture_block()

    @contextmanager
    def _capture_block(self) -> Iterator[None]:
        capture = self._capture.capture()
        if self.sharded is not None:
            capture = sharded_split.capture_recording_fsdp_modules(capture, self._fsdp_modules)
        with RetainedGraphCompile(self.compiled), capture:
            yield

    @property
    def encoder_of(self) -> Mapping[int, str]:
        """``id(parameter)`` -> the name of the encoder that owns it (every encoder parameter)."""
        return self._owner

    def trainable_params(self, name: str) -> list[nn.Parameter]:
        """The parameters of encoder ``name`` that require grad now (sharded: the shards)."""
        return [p for p in self._all_params(name) if p.requires_grad]

    def _all_params(self, name: str) -> list[nn.Parameter]:
        """Every parameter of encoder ``name`` in ``module.parameters()``'s order (sharded: the shards)."""
        if self.sharded:
            return list(self.sharded.parameters(name))
        seen: dict[int, nn.Parameter] = {}
        for module in self._modules[name]:
            for p in module._parameters.values():
                if p is not None:
                    seen.setdefault(id(p), p)  # type: ignore[arg-type]
        return list(seen.values())

    def _all_buffers(self, name: str) -> list[Tensor]:
        """Every buffer of encoder ``name`` now, in ``module.buffers()``'s order."""
        seen: dict[int, Tensor] = {}
        for module in self._modules[name]:
            for b in module._buffers.values():
                if b is not None:
                    seen.setdefault(id(b), b)
        return list(seen.values())

    def holding_post_accumulate_grad_hooks(self) -> AbstractContextManager[None]:
        """Hold the post-accumulate-grad hooks of the encoders' trainable parameters during a backward
        the caller runs itself (a plain summed-loss step); :meth:`run_post_accumulate_grad_hooks` runs
        them once ``.grad`` holds the gradient to apply."""
        params = (p for params in self._params.values() for p in params if p.requires_grad)
        return post_accumulate_grad_hooks_held(params, self._held_hooks)

    def run_post_accumulate_grad_hooks(self) -> None:
        """Run the post-accumulate-grad hooks held during the window's backward passes (once per
        parameter, on the gradient ``.grad`` holds now: after the rule, the integrated one)."""
        held, self._held_hooks = self._held_hooks, {}
        run_post_accumulate_grad_hooks(held.values())

    def discard_post_accumulate_grad_hooks(self) -> None:
        """Forget the hooks held in this window without running them (a skipped optimizer step)."""
        self._held_hooks = {}

    def release_outputs(self) -> None:
        """Let go of the captured outputs (and the graph they hold) without a backward."""
        self._capture.clear()

    @property
    def window_open(self) -> bool:
        """Whether gradients of earlier calls are waiting for :meth:`close_window`."""
        return self._window_open

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        losses: Mapping[str, Tensor],
        backward_fn: _BackwardFn | None = None,
        scale_fn: _ScaleFn | None = None,
        accumulate: bool = False,
        encoder_loss: str | None = None,
        agree: AgreeFn | None = None,
    ) -> dict[str, EncoderObjectives]:
        """Split the encoder gradients per objective and run the ordinary backward of the summed loss.

        Args:
            losses: name -> scalar loss, from a forward run inside :meth:`capture`.
            backward_fn: runs the ordinary backward of a loss (default ``loss.backward()``; Lightning
                passes ``manual_backward``, a GradScaler user ``lambda t: scaler.scale(t).backward()``).
            scale_fn: the loss scaling ``backward_fn`` applies (e.g. ``scaler.scale``), so that the
                per-objective gradients carry the same scale as ``.grad``.
            accumulate: add to the gradients of the previous calls instead of starting a new window.
            encoder_loss: skip the split and give the encoders only this loss's gradient in ``.grad``
                (the heads still get the summed loss's): the one-joint-loss baseline at the cost of a
                plain step. No layouts are returned then.
            agree: data parallel, on the step that closes the window: called once, before the ordinary
                backward, with this rank's objectives per encoder of the window and the trainable
                encoders not called in this step; it returns the union over the ranks (see
                :data:`AgreeFn`), which the window's layouts then follow, in encoder order. Raising in it
                stops the step before any gradient is communicated.

        Returns:
            The layout of every encoder that takes part in the window (trainable, and called in at
            least one step of it), whose ``grads`` now hold the per-objective gradients (summed over the
            window when accumulating). ``.grad`` of the encoder parameters is ``grads[1]``, the
            unimodal gradient, until the rule overwrites it.

        Raises:
            GradientSplittingError: for losses or encoder outputs that do not allow the exact split.
        """
        backward_fn = backward_fn or _default_backward
        scale_fn = scale_fn or _identity
        try:
            return self._backward(losses, backward_fn, scale_fn, accumulate, encoder_loss, agree)
        except Exception:
            if self.sharded is not None:
                self.sharded.abandon()  # the other ranks refuse the step too, rather than hang
            raise
        finally:
            # The captured aliases hold the step's graph: nothing is kept past the backward.
            self._capture.clear()
            self._release_gathered()
            self._release_gathered = sharded_split.nothing

    def _backward(
        self,
        losses: Mapping[str, Tensor],
        backward_fn: _BackwardFn,
        scale_fn: _ScaleFn,
        accumulate: bool,
        encoder_loss: str | None,
        agree: AgreeFn | None,
    ) -> dict[str, EncoderObjectives]:
        if self.sharded is not None:
            self.sharded.begin()
        losses = validate_losses(losses, self.multimodal_key)
        modified = self._capture.modified_in_place()
        if modified:
            raise GradientSplittingError(
                f"An output of encoder(s) {modified} was modified in place after the encoder returned it "
                "(e.g. `nn.ReLU(inplace=True)` or `x.relu_()` as the first layer of a head), so the "
                "per-loss gradients cannot be taken at the encoder's output. Use the out-of-place "
                "version in the heads (`nn.ReLU()`, `x.relu()`)."
            )
        present = self._present_encoders(losses)
        names = list(losses)
        outputs, owner = self._capture.tensors(present)
        reach = None
        if self.sharded is not None:
            # Before the cotangents: each of them is a backward through sharded heads.
            trainable = {enc: len(self.trainable_params(enc)) for enc in self.encoders}
            present, reach = sharded_split.agree_on_step(
                self.sharded, losses, present, self._capture.outputs, self._owner, trainable, self._describe,
            )  # fmt: skip
            outputs, owner = self._capture.tensors(present)
            # Through the heads' and the extra passes: released before the ordinary backward.
            self._release_gathered = keep_gathered(self._fsdp_modules.values())

        scaled = {n: scale_fn(loss) for n, loss in losses.items()}
        new_window = not (accumulate and self._window_open)
        if new_window:
            self.layouts = {}
        if self.sharded is not None:
            # Head-level cotangents of every loss: cot[loss][i] is d(scaled loss)/d(output i).
            cot = cotangents(names, scaled, outputs, self.compiled)
            step_layouts = self._assign_objectives(present, losses, cot, owner, new_window, reach)
        else:
            # Which losses reach which encoder, from a walk of the heads' nodes (no backward needed).
            walked = losses_reaching(losses, {enc: self._capture.outputs[enc] for enc in present})
            step_layouts = self._assign_objectives(present, losses, None, owner, new_window, walked)
            check_graph(
                losses, self._capture.outputs, step_layouts, self._owner, self._describe, self._inspect
            )
        agreed = None
        if agree is not None and self.sharded is None:
            mine = {enc: list(self.layouts[enc].objectives) for enc in self.encoders if enc in self.layouts}
            agreed = agree(mine, self.absent_encoders())
        if encoder_loss is None:
            with (
                buffers_kept({enc: self._all_buffers(enc) for enc in step_layouts}, self._snapshots),
                RetainedGraphCompile(self.compiled),
            ):
                if self.sharded is not None:
                    sharded_split.extra_backward_passes(
                        step_layouts, cot, owner, outputs, self.sharded.graph_tensors
                    )
                else:
                    extra_objectives(step_layouts, scaled, losses, self._describe, self._not_reaching)
        if self.sharded is None:
            # The main objective's cotangents, for the ordinary backward's hooks: one call for every
            # encoder whose main loss reaches no other encoder (the usual unimodal losses).
            mains = {enc: encoder_loss or self.layouts[enc].objectives[1] for enc in present}
            cot = main_cotangents(mains, walked, scaled, outputs, owner, self.compiled)

        finite = torch.stack([torch.isfinite(losses[n].detach()).all() for n in names])
        if new_window or self.loss_finite is None or names != self.loss_names:
            self.loss_finite, self.loss_names = finite, names
        else:
            self.loss_finite = self.loss_finite & finite

        if new_window:
            self._filled = set()
            self._held_hooks = {}
        for layout in self.layouts.values():
            for p in layout.params:
                if id(p) in self._filled:  # zeros filled in by the splitter carry no information
                    p.grad = None
        self._release_gathered()
        handles: list[RemovableHandle] = []
        for i, (out, enc) in enumerate(zip(outputs, owner, strict=True)):
            main = cot[encoder_loss or self.layouts[enc].objectives[1]][i]
            replacement = main if main is not None else torch.zeros_like(out)
            handles.append(out.register_hook(Replace(replacement)))
        params = [p for layout in self.layouts.values() for p in layout.params]
        total = sum(losses.values())
        if self.sharded is not None:
            total = sum(sharded_split.untouched_terms(outputs, owner, cot, present), total)
        try:
            with post_accumulate_grad_hooks_held(params, self._held_hooks):
                backward_fn(total)  # type: ignore[arg-type]
        finally:
            for h in handles:
                h.remove()
        if encoder_loss is not None:
            self.layouts = {}
            return self.layouts
        for layout in self.layouts.values():
            check_strided([p.grad for p in layout.params], layout.params, self._describe)
            for i, p in enumerate(layout.params):
                if p.grad is None:  # the main objective does not reach this parameter
                    p.grad = torch.zeros_like(p)
                    self._filled.add(id(p))
                elif layout.name in step_layouts:
                    layout.reached[i] = True
            # Read after the backward: DDP may have replaced the .grad tensors with bucket views.
            layout.grads[1] = local_tensors([p.grad for p in layout.params])  # type: ignore[misc]
        if agreed is not None:
            self._conform(agreed)
        self._window_open = True
        return self.layouts

    def close_window(self) -> None:
        """Mark the end of an accumulation window: the next :meth:`backward` starts from zero."""
        self._window_open = False
        self.layouts = {}

    def absent_encoders(self) -> list[str]:
        """Trainable encoders whose output was not captured in the current step (a missing modality)."""
        return [
            name
            for name, module in self.encoders.items()
            if not self._capture.outputs[name] and any(p.requires_grad for p in self._all_params(name))
        ]

    # ------------------------------------------------------------------ internals
    def _present_encoders(self, losses: Mapping[str, Tensor]) -> list[str]:
        """Encoders that take part in this step: trainable and called (their output captured)."""
        present = []
        for name in self.encoders:
            trainable = any(p.requires_grad for p in self._all_params(name))
            called = bool(self._capture.outputs[name])
            if trainable and called:
                present.append(name)
            elif trainable and name in losses:
                raise GradientSplittingError(no_output_message(name, self._capture.opaque[name]))
        return present

    def _assign_objectives(
        self,
        present: Sequence[str],
        losses: Mapping[str, Tensor],
        cot: Mapping[str, list[Tensor | None]],
        owner: list[str],
        new_window: bool,
        reach: Mapping[str, list[str]] | None = None,
    ) -> dict[str, EncoderObjectives]:
        """This step's layout of every present encoder; they must match the window's earlier steps.

        ``reach`` (encoder -> losses that reach it) replaces the cotangents' own answer when given: under
        FSDP, the losses that reach the encoder on any rank.
        """
        names = list(losses)
        step: dict[str, EncoderObjectives] = {}
        for enc in present:
            idx = [i for i, o in enumerate(owner) if o == enc]
            if reach is not None:
                reaching = list(reach.get(enc, []))
            else:
                reaching = [n for n in names if any(cot[n][i] is not None for i in idx)]
            if enc not in names:
                raise GradientSplittingError(
                    f"Missing loss {enc!r}: encoder {enc!r} was called but no loss is under its name (got "
                    f"keys {sorted(names)}). Return its unimodal loss under {enc!r}; for a missing modality, "
                    "do not call the encoder on that batch."
                )
            for required, role in ((self.multimodal_key, "multimodal"), (enc, "unimodal")):
                if required not in reaching:
                    raise GradientSplittingError(self._not_reaching(enc, required, role, losses[required]))
            others = [n for n in reaching if n not in (self.multimodal_key, enc)]
            layout = EncoderObjectives(enc, self.trainable_params(enc), [self.multimodal_key, enc, *others])
            earlier = None if new_window else self.layouts.get(enc)
            if earlier is not None and (
                earlier.objectives != layout.objectives
                or [id(p) for p in earlier.params] != [id(p) for p in layout.params]
            ):
                raise GradientSplittingError(
                    f"The losses that reach encoder {enc!r}, or its trainable parameters, changed within an "
                    f"accumulation window (objectives {earlier.objectives} -> {layout.objectives}); every "
                    "accumulated batch must return the same named losses, and freezing must happen "
                    "between optimizer steps."
                )
            step[enc] = earlier if earlier is not None else layout
            self.layouts.setdefault(enc, step[enc])
        return step

    def _conform(self, agreed: Mapping[str, Sequence[str]]) -> None:
        """Make the window's layouts the agreed ones: every encoder that takes part on some rank, with the
        union of the ranks' objectives, in encoder order. What this rank lacks enters with zeros, its
        share of the ranks' average; ``.grad`` of an encoder this rank did not call already holds the
        other ranks' average of the main objective (DDP wrote it), or nothing if no rank reached it."""
        layouts: dict[str, EncoderObjectives] = {}
        for enc in self.encoders:
            if enc not in agreed:
                continue
            objectives = list(agreed[enc])
            layout = self.layouts.get(enc)
            if layout is None:
                params = self.trainable_params(enc)
                layout = EncoderObjectives(enc, params, objectives)
                layout.reached = [True] * len(params)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                        self._filled.add(id(p))
                layout.grads = [[torch.zeros_like(p) for p in params] for _ in objectives]
                layout.grads[1] = [p.grad for p in params]  # type: ignore[misc]
            elif layout.objectives != objectives:
                mine = dict(zip(layout.objectives, layout.grads, strict=True))
                layout.grads = [
                    mine[o] if o in mine else [torch.zeros_like(p) for p in layout.params] for o in objectives
                ]
                layout.objectives = objectives
            layouts[enc] = layout
        self.layouts = layouts

    def _inspect(self, node: object, where: str) -> None:
        if is_compiled_region(node):
            refuse_donated(node, where)
            self.compiled = True

    def validate_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the named losses (scalar, real floating point, with a graph, the keys required)."""
        return validate_losses(losses, self.multimodal_key)

    def _not_reaching(self, enc: str, loss_name: str, role: str, loss: Tensor) -> str:
        """Why a required loss does not reach the captured output of ``enc`` (on the error path only)."""
        return not_reaching_message(enc, loss_name, role, loss, self.encoders[enc], self._capture.opaque[enc])

    def _describe(self, parameter: Tensor) -> str:
        name = self._param_names.get(id(parameter))
        return f"{name!r} (shape {tuple(parameter.shape)})" if name else f"of shape {tuple(parameter.shape)}"
