"""MMPareto for a hand-written PyTorch training loop: gradient splitting plus the rule.

:class:`MMParetoEngine` joins :class:`~mmpareto_lightning.engine.GradientSplitter` (the per-objective
encoder gradients) and :func:`~mmpareto_lightning.rule.integrate_tensor_lists` (the rule) and writes the
integrated gradients into ``.grad``. It knows nothing of Lightning; the Lightning callback is a thin
layer on top of it.

Example (plain PyTorch)::

    engine = MMParetoEngine({"audio": model.audio_net, "visual": model.visual_net})
    for audio, visual, label in loader:
        optimizer.zero_grad(set_to_none=True)
        with engine.capture():                       # records the encoders' outputs
            losses = model.losses(audio, visual, label)  # {"multimodal": ..., "audio": ..., "visual": ...}
        engine.backward(losses)                      # one forward, one backward + one encoder VJP
        stats = engine.integrate()                   # the MMPareto rule, written into .grad
        optimizer.step()

With a ``torch.amp.GradScaler``: ``engine.backward(losses, backward_fn=lambda t: scaler.scale(t).backward(),
scale_fn=scaler.scale)``, then ``engine.integrate()``, ``scaler.step(optimizer)``, ``scaler.update()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from mmpareto_lightning.distributed.sharded import ShardedEncoders, local_tensors
from mmpareto_lightning.engine.splitting import AgreeFn, GradientSplitter
from mmpareto_lightning.rule import RuleConfig, RuleStats, integrate_encoders, integrate_tensor_lists

__all__ = ["MMParetoEngine"]

ReduceFn = Callable[[Tensor], Tensor]


class MMParetoEngine:
    """Exact MMPareto gradient integration for encoders inside any PyTorch model.

    Args:
        encoders: name -> encoder module; each encoder's unimodal loss is the loss of the same name.
        config: the rule's settings (default: the authors' MMPareto, per-tensor rescale, gamma 1.5).
        multimodal_key: name of the multimodal loss.
        param_names: ``id(parameter)`` -> its name in the model, for error messages.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        config: RuleConfig | None = None,
        multimodal_key: str = "multimodal",
        param_names: Mapping[int, str] | None = None,
    ) -> None:
        self.config = config or RuleConfig()
        self.splitter = GradientSplitter(encoders, multimodal_key=multimodal_key, param_names=param_names)
        self._reduce_buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    @property
    def encoder_names(self) -> list[str]:
        return list(self.splitter.encoders)

    @property
    def sharded(self) -> ShardedEncoders | None:
        """The encoders' FSDP2 sharding (``None``: not sharded). Sharded encoders need nothing else:
        FSDP averages every gradient over the ranks, and :meth:`integrate` sums the rule's Gram matrices
        over the shards."""
        return self.splitter.sharded

    def capture(self) -> AbstractContextManager[None]:
        """Context manager around the forward pass whose losses go to :meth:`backward`."""
        return self.splitter.capture()

    def backward(
        self,
        losses: Mapping[str, Tensor],
        backward_fn: Callable[[Tensor], None] | None = None,
        scale_fn: Callable[[Tensor], Tensor] | None = None,
        accumulate: bool = False,
        encoder_loss: str | None = None,
        agree: AgreeFn | None = None,
    ) -> None:
        """Per-objective encoder gradients plus the ordinary backward of the summed loss.

        See :meth:`GradientSplitter.backward` for the arguments. With ``accumulate=True`` the gradients
        add up over calls until :meth:`integrate` closes the window. Data parallel: pass ``agree`` on the
        window's last call, so that every rank integrates the same encoders and objectives.
        """
        self.splitter.backward(
            losses,
            backward_fn=backward_fn,
            scale_fn=scale_fn,
            accumulate=accumulate,
            encoder_loss=encoder_loss,
            agree=agree,
        )

    def integrate(self, reduce_fn: ReduceFn | None = None, run_hooks: bool = True) -> dict[str, RuleStats]:
        """Apply the rule to every encoder of the window and write the result into ``.grad``.

        Args:
            reduce_fn: averages a tensor across processes (data parallel); it receives one flat tensor
                with every extra objective's gradient of every encoder, so a run makes one collective.
                The main objective's gradient is in ``.grad`` and is averaged by DDP's own backward.
            run_hooks: run the encoder parameters' post-accumulate-grad hooks, held during the
                backward, on the integrated gradients now (``False``: the caller runs them with
                ``engine.splitter.run_post_accumulate_grad_hooks()``, e.g. after a finite check).
                ``reduce_fn`` is not for encoders sharded with FSDP2, whose gradients FSDP averages:
                there each encoder's Gram matrices are summed over its shards (one all-reduce of
                ``T * K * K`` numbers).

        Returns:
            encoder name -> the step's :class:`RuleStats`, for the encoders that took part.
        """
        layouts = self.splitter.layouts
        sharded = self.splitter.sharded
        if reduce_fn is not None and sharded is not None:
            raise ValueError(
                "`reduce_fn` averages the extra objectives' gradients across processes, but the encoders "
                "are sharded with FSDP, whose reduce-scatter already averages them: call integrate() "
                "without it."
            )
        if reduce_fn is not None:
            self._reduce_extras(reduce_fn)
        names = list(layouts)
        if sharded is None:
            # Every encoder in one call of the rule: its operations are shared, not repeated per encoder.
            _, decided = integrate_encoders(
                [layouts[n].grads for n in names], self.config, [layouts[n].grads[1] for n in names]
            )
            stats = dict(zip(names, decided, strict=True))
        else:
            # Each encoder's Gram matrices are summed over the ranks that hold its other shards.
            stats = {}
            for name in names:
                _, stats[name] = integrate_tensor_lists(
                    layouts[name].grads,
                    self.config,
                    out=layouts[name].grads[1],
                    gram_reduce=sharded.gram_reduce(name),
                )
        for layout in layouts.values():
            if not self.splitter.zero_absent:
                # As plain autograd: a parameter no loss reached has no gradient (an optimizer then
                # leaves it alone: no weight decay, no momentum).
                for p, reached in zip(layout.params, layout.reached, strict=True):
                    if not reached:
                        p.grad = None
        self.splitter.close_window()
        if run_hooks:
            self.splitter.run_post_accumulate_grad_hooks()
        return stats

    def _reduce_extras(self, reduce_fn: ReduceFn) -> None:
        extras = [
            (layout, k)
            for layout in self.splitter.layouts.values()
            for k in range(len(layout.objectives))
            if k != 1
        ]
        tensors = [g for layout, k in extras for g in layout.grads[k]]
        if not tensors:
            return
        # One flat buffer per real dtype and device (one collective in the usual case of a single dtype):
        # a complex gradient travels as its real view, so one buffer never mixes dtypes.
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        real = [_real(t) for t in tensors]
        for i, t in enumerate(real):
            groups.setdefault((t.dtype, t.device), []).append(i)
        reduced: list[Tensor] = list(tensors)
        for key, members in groups.items():
            size = sum(real[i].numel() for i in members)
            buffer = self._reduce_buffers.get(key)
            if buffer is None or buffer.numel() != size:
                buffer = self._reduce_buffers[key] = torch.empty(size, dtype=key[0], device=key[1])
            torch.cat([real[i].reshape(-1) for i in members], out=buffer)
            views = torch.split(reduce_fn(buffer), [real[i].numel() for i in members])
            for i, view in zip(members, views, strict=True):
                shaped = view.view(real[i].shape)
                reduced[i] = torch.view_as_complex(shaped) if tensors[i].is_complex() else shaped
        flat = iter(reduced)
        for layout, k in extras:
            layout.grads[k] = [next(flat) for _ in layout.grads[k]]

    def all_finite(self, stats: Mapping[str, RuleStats], parameters: Iterable[nn.Parameter] = ()) -> Tensor:
        """0-d bool tensor: every loss of the window, every encoder gradient (before and after the rule) and
        ``parameters``' gradients are finite.

        The encoders' gradients are not read again: a non-finite entry makes the rule's Gram entries
        non-finite (``RuleStats.finite``). ``parameters`` are the others (heads, fusion), read once.
        Stays on the device; reading it (``bool(...)``) is the caller's one host synchronisation.
        """
        # `fits`: finite inputs whose integrated gradient would not fit the dtype (it was written as inf).
        flags = [s.finite & s.fits for s in stats.values()]
        if self.splitter.loss_finite is not None:
            flags.append(self.splitter.loss_finite.all())
        grads = local_tensors([p.grad for p in parameters if p.grad is not None])
        if grads:
            flags.append(_all_finite(grads))
        if not flags:
            return torch.tensor(True)
        return torch.stack([f.to(flags[0].device) for f in flags]).all()

    def non_finite_losses(self) -> list[str]:
        """Names of the losses that were not finite in the current window (reads the host)."""
        flags = self.splitter.loss_finite
        if flags is None:
            return []
        names = self.splitter.loss_names
        return [n for n, ok in zip(names, flags.tolist(), strict=True) if not ok]


def _real(t: Tensor) -> Tensor:
    """A complex tensor's real view (``view_as_real``: no copy); any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """0-d bool tensor: every entry of ``tensors`` is finite, in one read (and write) pass.

    GradScaler's fused check (with a scale of 1, which leaves every value as it is) flags inf and NaN
    exactly, unlike a 2-norm or a sum, which overflow for large finite values, and is several times
    faster on CPU than a max-abs norm. It takes neither complex nor sparse tensors: a complex tensor is
    checked through its real view (no copy), a sparse one through its coalesced values (coalescing sums
    duplicate entries, as the optimizer's update will).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.layout != torch.strided:
            t = t.coalesce().values() if t.layout == torch.sparse_coo else t.values()
        t = _real(t)
        groups.setdefault((t.device, t.dtype), []).append(t)
    found = []
    for (device, _), group in groups.items():
        # float32 whatever the default dtype (Lightning's "bf16-true" makes it bfloat16 in the step).
        found_inf = torch.zeros(1, device=device, dtype=torch.float32)
        ones = torch.ones(1, device=device, dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, ones)
        found.append(found_inf.to(tensors[0].device))
    return torch.cat(found).sum() == 0
