"""Per-objective encoder gradients from one forward pass, at the cost of one extra encoder backward.

The scheme (``SPEC.md`` section 5):

1. The encoders' outputs are captured behind a fresh autograd boundary during the forward
   (:mod:`mmpareto_lightning.engine.capture`).
2. The head-level cotangents ``dL_j / dz_k`` of every loss are taken with ``torch.autograd.grad``; this
   only differentiates the heads, which is cheap, and tells which losses reach which encoder.
3. For every encoder, one objective (its own unimodal loss) is the *main* objective; the others (the
   multimodal loss, plus any extra loss that reaches it) are *extra* objectives. Their encoder gradients
   are vector-Jacobian products of ``z_k`` with their cotangents: one extra backward through the
   encoders per extra objective, batched over all encoders (the paper's setting needs exactly one).
   Autograd hands back one fresh tensor per parameter, exactly as the ordinary backward does for
   ``.grad``: no flat copy, no add.
4. The ordinary backward of the summed loss then runs unchanged (so DDP's gradient bucketing and AMP's
   loss scaling keep working) with a hook on each ``z_k`` that replaces its incoming gradient by the main
   objective's cotangent: the encoders' ``.grad`` become exactly the main objective's gradient, while the
   heads get the usual gradient of the summed loss.

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
from dataclasses import dataclass, field

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
from mmpareto_lightning.engine.capture import OutputCapture
from mmpareto_lightning.engine.compiled import (
    RetainedGraphCompile,
    has_compiled_modules,
    is_compiled_region,
    refuse_donated,
)
from mmpareto_lightning.engine.safeguards import (
    GradientSplittingError,
    buffers_kept,
    check_graph,
    check_strided,
    losses_reaching,
    post_accumulate_grad_hooks_held,
    reaches_parameters,
    run_post_accumulate_grad_hooks,
)

__all__ = ["RESERVED_LOSS_KEYS", "AgreeFn", "EncoderObjectives", "GradientSplitter", "GradientSplittingError"]

# "loss" is what Lightning users return for automatic optimization; here it would be one more objective
# (counting the others twice when it is their sum), so it is refused.
RESERVED_LOSS_KEYS: tuple[str, ...] = ("loss",)


@dataclass
class EncoderObjectives:
    """The gradient layout of one encoder in the current step (or accumulation window).

    Attributes:
        name: the encoder's name (also the key of its unimodal loss).
        params: the encoder's trainable parameters this step, in layout order.
        objectives: names of the losses that reach the encoder; ``objectives[0]`` is the multimodal loss,
            ``objectives[1]`` the encoder's own loss, then the others in the order the losses were given.
        grads: per objective, one gradient tensor per parameter, valid after
            :meth:`GradientSplitter.backward` until :meth:`GradientSplitter.close_window`. ``grads[1]``
            are the parameters' ``.grad`` tensors themselves.
        reached: per parameter, whether any loss reached it in the window (plain autograd leaves the
            others' ``.grad`` at ``None``, and so does the engine after the rule).
    """

    name: str
    params: list[nn.Parameter]
    objectives: list[str] = field(default_factory=list)
    grads: list[list[Tensor]] = field(default_factory=list)
    reached: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reached = [False] * len(self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


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
        losses = self.validate_losses(losses)
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
                self.sharded, losses, present, outputs, owner, self._capture.outputs, self._owner, trainable,
                self._describe,
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
            cot = self._cotangents(names, scaled, outputs)
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
                    self._extra_objectives(step_layouts, scaled, losses)
        if self.sharded is None:
            # The main objective's cotangents, for the ordinary backward's hooks: one call for every
            # encoder whose main loss reaches no other encoder (the usual unimodal losses).
            mains = {enc: encoder_loss or self.layouts[enc].objectives[1] for enc in present}
            cot = self._main_cotangents(mains, walked, scaled, outputs, owner)

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
            handles.append(out.register_hook(_Replace(replacement)))
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
    def validate_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the named losses (scalar, real floating point, with a graph, the keys required)."""
        if not isinstance(losses, Mapping):
            raise GradientSplittingError(
                f"Losses must be a mapping of name -> scalar loss tensor, got {type(losses).__name__}."
            )
        reserved = [k for k in RESERVED_LOSS_KEYS if k in losses]
        if reserved:
            raise GradientSplittingError(
                f"The loss key {reserved[0]!r} is reserved: every named loss is an objective, so a "
                f"{reserved[0]!r} that sums the others would count them twice. Return only the named "
                f"losses ({self.multimodal_key!r}, one per encoder, any extra ones); their sum is logged "
                "as `mmpareto/loss`."
            )
        if self.multimodal_key not in losses:
            raise GradientSplittingError(
                f"Missing loss {self.multimodal_key!r}: got keys {sorted(losses)}. The multimodal loss must "
                f"be under {self.multimodal_key!r} and each encoder's unimodal loss under the encoder's name."
            )
        checked: dict[str, Tensor] = {}
        for name, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
                raise GradientSplittingError(f"Loss {name!r} must be a scalar tensor, got {what}.")
            if not loss.is_floating_point():
                raise GradientSplittingError(
                    f"Loss {name!r} has dtype {loss.dtype}; a loss must be a real floating-point scalar "
                    "(integer and complex values have no gradient to integrate)."
                )
            if not loss.requires_grad:
                raise GradientSplittingError(
                    f"Loss {name!r} does not require grad: it was computed without gradients or detached."
                )
            checked[name] = loss.reshape(())
        return checked

    def _present_encoders(self, losses: Mapping[str, Tensor]) -> list[str]:
        """Encoders that take part in this step: trainable and called (their output captured)."""
        present = []
        for name in self.encoders:
            trainable = any(p.requires_grad for p in self._all_params(name))
            called = bool(self._capture.outputs[name])
            if trainable and called:
                present.append(name)
            elif trainable and name in losses:
                opaque = self._capture.opaque[name]
                if opaque:
                    raise GradientSplittingError(
                        f"Encoder {name!r} returned its output inside {_objects(opaque)}, which MMPareto "
                        "cannot look into: it captures the tensors an encoder's forward returns, alone or "
                        "in tuples, lists, dicts and dataclasses (ModelOutput included). Return the "
                        f"tensors (or make {opaque[0]} a dataclass or a NamedTuple) and compute the heads "
                        "from what the encoder returns."
                    )
                raise GradientSplittingError(
                    f"Encoder {name!r} produced no output that requires grad during the forward pass, but "
                    f"its loss {name!r} is there. Call the encoder module itself (its forward hook captures "
                    "the output; calling one of its methods, such as `forward_features`, bypasses the hook) "
                    "inside the training step, with gradients enabled (reentrant activation "
                    "checkpointing of inputs that do not require grad also drops the graph: use "
                    "checkpoint(..., use_reentrant=False)). For a missing modality, leave the encoder "
                    "uncalled and its loss out."
                )
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

    def _cotangents(
        self, names: Sequence[str], scaled: Mapping[str, Tensor], outputs: list[Tensor]
    ) -> dict[str, list[Tensor | None]]:
        """Every loss's cotangent at every captured output (one backward through the heads per loss)."""
        cot: dict[str, list[Tensor | None]] = {}
        with RetainedGraphCompile(self.compiled):
            for n in names:
                if outputs:
                    cot[n] = list(
                        torch.autograd.grad(scaled[n], outputs, retain_graph=True, allow_unused=True)
                    )
                else:
                    cot[n] = []
        return cot

    def _main_cotangents(
        self,
        mains: Mapping[str, str],
        walked: Mapping[str, list[str]],
        scaled: Mapping[str, Tensor],
        outputs: list[Tensor],
        owner: list[str],
    ) -> dict[str, list[Tensor | None]]:
        """The cotangents of each encoder's main loss at that encoder's outputs (None elsewhere).

        Main losses that reach only their own encoder are differentiated together, in one backward
        through the heads: each output then receives its own encoder's main loss alone. A main loss
        that reaches other encoders (a shared one) gets a backward of its own.
        """
        shared = {mains[enc] for enc in mains if sum(mains[enc] in walked[e] for e in walked) > 1}
        groups: list[list[str]] = []
        alone = [enc for enc in mains if mains[enc] not in shared]
        if alone:
            groups.append(alone)
        for name in dict.fromkeys(mains[enc] for enc in mains if mains[enc] in shared):
            groups.append([enc for enc in mains if mains[enc] == name])
        cot: dict[str, list[Tensor | None]] = {name: [None] * len(outputs) for name in set(mains.values())}
        with RetainedGraphCompile(self.compiled):
            for group in groups:
                index = [i for i, o in enumerate(owner) if o in group]
                roots = list(dict.fromkeys(mains[enc] for enc in group))
                grads = torch.autograd.grad(
                    [scaled[n] for n in roots],
                    [outputs[i] for i in index],
                    retain_graph=True,
                    allow_unused=True,
                )
                for i, g in zip(index, grads, strict=True):
                    cot[mains[owner[i]]][i] = g
        return cot

    def _extra_objectives(
        self,
        layouts: Mapping[str, EncoderObjectives],
        scaled: Mapping[str, Tensor],
        losses: Mapping[str, Tensor],
    ) -> None:
        """Every extra objective's gradient on the encoders it reaches, straight from the loss: round r
        differentiates, for every encoder that has one, its r-th extra objective, one backward per loss
        of the round (in the paper's setting: one, the multimodal loss over every encoder)."""
        extra_index = {name: [0, *range(2, len(layout.objectives))] for name, layout in layouts.items()}
        rounds = max((len(v) for v in extra_index.values()), default=0)
        for r in range(rounds):
            by_loss: dict[str, list[tuple[EncoderObjectives, int]]] = {}
            for enc, layout in layouts.items():
                if r < len(extra_index[enc]):
                    k = extra_index[enc][r]
                    by_loss.setdefault(layout.objectives[k], []).append((layout, k))
            for name, targets in by_loss.items():
                params = [p for layout, _ in targets for p in layout.params]
                grads = torch.autograd.grad(scaled[name], params, retain_graph=True, allow_unused=True)
                check_strided(grads, params, self._describe)
                start = 0
                for layout, k in targets:
                    own = grads[start : start + len(layout.params)]
                    start += len(layout.params)
                    if k == 0 and all(g is None for g in own):
                        # The graph reaches the encoder's output, but no gradient flows back (a custom
                        # function that returns none): as if the loss did not depend on the encoder.
                        raise GradientSplittingError(
                            self._not_reaching(layout.name, name, "multimodal", losses[name])
                        )
                    new = []
                    for i, (p, g) in enumerate(zip(layout.params, own, strict=True)):
                        if g is None:
                            g = torch.zeros_like(p)
                        else:
                            layout.reached[i] = True
                        new.append(g)
                    if not layout.grads:
                        layout.grads = [[] for _ in layout.objectives]
                    if layout.grads[k]:
                        torch._foreach_add_(layout.grads[k], new)
                    else:
                        layout.grads[k] = new

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

    def _not_reaching(self, enc: str, loss_name: str, role: str, loss: Tensor) -> str:
        """Why a required loss does not reach the captured output of ``enc`` (on the error path only)."""
        params = {id(p) for p in self.encoders[enc].parameters()}
        if not reaches_parameters(loss, params):
            return (
                f"The {role} loss {loss_name!r} does not depend on encoder {enc!r}, so there is nothing "
                "to integrate. Compute it from that encoder's output (for the unimodal loss: a unimodal "
                "head on the encoder's features)."
            )
        opaque = self._capture.opaque[enc]
        path = (
            f"the encoder returned part of its output inside {_objects(opaque)}, which MMPareto cannot "
            "look into, or "
            if opaque
            else ""
        )
        return (
            f"The {role} loss {loss_name!r} depends on encoder {enc!r}, but not through the output "
            f"MMPareto captured from the encoder's forward: {path}a head reads a tensor the encoder did "
            "not return (stashed on the module, e.g. `self.features = z` read as `encoder.features`, or "
            "an intermediate feature). The per-loss gradients are split at the tensors the encoder's "
            "forward returns (alone or in tuples, lists, dicts and dataclasses): return the features "
            "from `forward` and compute every head from that return value."
        )

    def _describe(self, parameter: Tensor) -> str:
        name = self._param_names.get(id(parameter))
        return f"{name!r} (shape {tuple(parameter.shape)})" if name else f"of shape {tuple(parameter.shape)}"


def _objects(type_names: Sequence[str]) -> str:
    listed = " / ".join(f"a {n}" for n in type_names)
    return f"{listed} object" if len(type_names) == 1 else f"{listed} objects"


class _Replace:
    """Tensor hook: hand autograd a fixed gradient instead of the incoming one."""

    def __init__(self, replacement: Tensor) -> None:
        self.replacement = replacement

    def __call__(self, grad: Tensor) -> Tensor:
        return self.replacement
