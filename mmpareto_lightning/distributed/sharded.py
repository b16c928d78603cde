"""Sharded data parallelism (FSDP2, ``fully_shard``): where each encoder's gradient shards live, and the
collectives the rule needs on top of FSDP's own.

Under FSDP2 an encoder's parameters are ``DTensor`` shards; in the autograd graph FSDP puts unsharded
copies it all-gathers before use, and after each backward it reduce-scatters (and averages) their
gradients into the shards' ``.grad``. The rule is a function of per-tensor Gram matrices, sums over a
tensor's entries, so it runs on shards: every rank computes the Gram matrices of its local shards, one
all-reduce (sum) of the small ``(T, K, K)`` array over the ranks holding the other shards gives the
exact matrices of the whole tensors, every rank takes the same decisions, and each writes its own
shard. No rank ever holds a whole encoder gradient.

:class:`ShardedEncoders` knows, per encoder, the sharded parameters, the unsharded copies FSDP puts in
the graph, the group to sum the Gram matrices over, and agrees with the other ranks, once per backward,
on which losses reach which encoder (every rank must run the same backward passes, since each one
reduce-scatters). FSDP2's per-parameter bookkeeping is read through its private ``FSDPParam`` objects,
in this module only (``_fsdp_params``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmpareto_lightning.distributed.collectives import HostExchange

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore[no-redef]
try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef]
    except ImportError:
        FSDPModule = None  # type: ignore[assignment,misc]

__all__ = [
    "AgreedStructure",
    "FSDPModule",
    "ShardedEncoders",
    "ShardingError",
    "is_dtensor",
    "keep_gathered",
    "local_tensors",
    "unsharded_names",
]

# Loss-reach masks travel as int64 bit fields.
_MAX_LOSSES = 62


class ShardingError(ValueError):
    """The encoders' sharding does not allow the exact sharded update (or the ranks disagree)."""


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded or replicated parameter or gradient)."""
    return isinstance(tensor, DTensor)


def unsharded_names(names: Sequence[str]) -> str:
    """The names of parameters that should be shards, for a refusal: the first five and how many more."""
    return f"{list(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """This rank's part of each tensor: ``to_local()`` of a ``DTensor`` (a view: writes reach the
    ``DTensor``), the tensor itself otherwise."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _fsdp_groups(module: nn.Module) -> Iterator[Any]:
    """FSDP2's ``FSDPParamGroup`` objects of every ``fully_shard``-ed module inside ``module`` (private
    API)."""
    if FSDPModule is None:
        return
    seen: set[int] = set()
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # older torch: one group per state
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            if id(group) not in seen:  # a state can serve several modules
                seen.add(id(group))
                yield group


def _fsdp_params(module: nn.Module) -> Iterator[Any]:
    """FSDP2's ``FSDPParam`` objects inside ``module`` (private API)."""
    for group in _fsdp_groups(module):
        yield from group.fsdp_params


def keep_gathered(modules: Iterable[nn.Module]) -> Callable[[], None]:
    """Keep the FSDP groups of ``modules`` that are gathered now gathered through the backward passes
    that follow, until the returned function is called (it restores FSDP's setting).

    After the forward, FSDP holds gathered the groups that do not reshard after forward (a root's, by
    default, or ``reshard_after_forward=False``); each backward pass would reshard them at its end and
    the next would gather them again. Kept, the split's extra passes gather nothing the forward did not
    already hold, and use no memory beyond it. The ordinary backward, after the restore, reshards.
    """
    groups = {id(g): g for m in modules for g in _fsdp_groups(m)}
    held = [(g, g.reshard_after_backward) for g in groups.values() if g.is_unsharded]
    for g, _ in held:
        g.reshard_after_backward = False

    def restore() -> None:
        for g, setting in held:
            g.reshard_after_backward = setting
        held.clear()

    return restore


def _variants(fsdp_param: Any) -> list[Tensor]:
    """The parameter objects FSDP registers on the module in its three states."""
    found = [fsdp_param.sharded_param]
    for attr in ("_unsharded_param", "_sharded_post_forward_param"):
        t = getattr(fsdp_param, attr, None)
        if isinstance(t, Tensor):
            found.append(t)
    return found


def _shard_dim(param: DTensor, name: str, encoder: str) -> int:
    """The mesh dimension ``param`` is sharded over (FSDP: the only ``Shard``; HSDP: the last one)."""
    shard = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    others = [p for p in param.placements if not isinstance(p, (Shard, Replicate))]
    if len(shard) != 1 or others:
        raise ShardingError(
            f"Parameter {name!r} of encoder {encoder!r} has placements {param.placements}; MMPareto's "
            "sharded update supports FSDP2 (one Shard placement) and HSDP (Replicate, Shard), not "
            "tensor parallelism. Shard the encoder with `fully_shard` only (tensor_parallel_size=1)."
        )
    return shard[0]


def _nonempty_shards(param: DTensor) -> int:
    """On how many ranks of its shard group ``param``'s local shard is non-empty (``torch.chunk``)."""
    placement = next(p for p in param.placements if isinstance(p, Shard))
    mesh_dim = next(i for i, p in enumerate(param.placements) if isinstance(p, Shard))
    size, ranks = param.shape[placement.dim], param.device_mesh.size(mesh_dim)
    if size == 0:
        return 0
    chunk = -(-size // ranks)
    return -(-size // chunk)


def _mesh_key(mesh: Any) -> tuple[Any, ...]:
    """Meshes made by separate ``fully_shard`` calls are separate objects over the same ranks."""
    return (
        mesh.device_type,
        tuple(mesh.mesh.shape),
        tuple(mesh.mesh.flatten().tolist()),
        mesh.mesh_dim_names,
    )


@dataclass
class AgreedStructure:
    """What every rank agreed on for one backward: the encoders taking part (called and trainable) and,
    per encoder, the losses that reach it on at least one rank, in the order of the losses."""

    present: list[str]
    reach: dict[str, list[str]]


class ShardedEncoders:
    """The FSDP2 sharding of the encoders, and the collectives of the sharded update.

    Args:
        encoders: name -> encoder module, every parameter sharded by ``fully_shard`` (the encoder itself
            or its submodules).

    Raises:
        ShardingError: some encoder parameters are sharded and others not, a placement is not FSDP's
            (tensor parallelism), or the shard groups do not span every process.

    Use :meth:`detect`, which returns ``None`` for encoders without sharded parameters.
    """

    def __init__(self, encoders: Mapping[str, nn.Module]) -> None:
        self.encoders = dict(encoders)
        self._groups: dict[str, Any] = {}
        self._device_types: dict[str, str] = {}
        # Between begin() and agree() / abandon(): the other ranks wait for this rank's row.
        self.pending = False
        self._host: HostExchange | None = None  # made at the first sharded step, on every rank
        mesh_ranks: set[tuple[int, ...]] = set()
        for enc in self.encoders:
            params = self._named(enc)
            plain = [n for n, p in params if not isinstance(p, DTensor)]
            if plain:
                raise ShardingError(
                    f"Encoder {enc!r} has parameters that are not sharded: {unsharded_names(plain)}. "
                    "Under FSDP nothing averages an unsharded parameter's gradient across ranks. "
                    "Apply `fully_shard` to every encoder module itself (after its submodules), and to "
                    "every head."
                )
            dims = {_shard_dim(p, n, enc) for n, p in params}  # type: ignore[arg-type]
            meshes = {_mesh_key(p.device_mesh) for _, p in params}  # type: ignore[union-attr]
            if len(dims) > 1 or len(meshes) > 1:
                raise ShardingError(
                    f"The parameters of encoder {enc!r} are sharded over different device meshes; shard "
                    "the encoder's submodules with the same mesh."
                )
            if params:
                mesh = params[0][1].device_mesh  # type: ignore[union-attr]
                self._groups[enc] = mesh.get_group(dims.pop())
                self._device_types[enc] = mesh.device_type
                mesh_ranks.add(tuple(sorted(mesh.mesh.flatten().tolist())))
        world = dist.get_world_size() if dist.is_initialized() else 1
        if len(mesh_ranks) > 1 or any(len(r) != world for r in mesh_ranks):
            raise ShardingError(
                "The encoders' device meshes must span every process (data parallelism only: FSDP or "
                f"HSDP over all {world} ranks); got meshes over ranks {sorted(mesh_ranks)}."
            )

    @classmethod
    def detect(cls, encoders: Mapping[str, nn.Module]) -> ShardedEncoders | None:
        """A :class:`ShardedEncoders` when some encoder parameter is a ``DTensor``, else ``None``."""
        for module in encoders.values():
            if any(isinstance(p, DTensor) for p in module.parameters()) or next(_fsdp_params(module), None):
                return cls(encoders)
        return None

    # ------------------------------------------------------------------ parameters
    def _named(self, enc: str) -> list[tuple[str, Tensor]]:
        """``(name, sharded parameter)`` of encoder ``enc``, whatever state FSDP left the module in."""
        to_sharded = {
            id(v): fp.sharded_param for fp in _fsdp_params(self.encoders[enc]) for v in _variants(fp)
        }
        return [(n, to_sharded.get(id(p), p)) for n, p in self.encoders[enc].named_parameters()]

    def parameters(self, enc: str) -> list[nn.Parameter]:
        """The sharded parameters of encoder ``enc``, the same order on every rank.

        The first is one whose local shard is non-empty on as many ranks as any (on a rank where it is
        empty, every shard of the encoder is): the rule recognises its output list by its first tensor.
        """
        params = [p for _, p in self._named(enc)]
        if params:
            first = max(range(len(params)), key=lambda i: (_nonempty_shards(params[i]), -i))  # type: ignore[arg-type]
            params.insert(0, params.pop(first))
        return params  # type: ignore[return-value]

    def graph_owners(self) -> dict[int, str]:
        """``id`` of every parameter object FSDP may put in the autograd graph -> its encoder."""
        return {
            id(v): enc for enc, m in self.encoders.items() for fp in _fsdp_params(m) for v in _variants(fp)
        }

    def graph_tensors(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The unsharded copies FSDP put in this step's graph for the sharded ``params`` (a backward
        that accumulates into them runs FSDP's reduce-scatter into the shards' ``.grad``)."""
        unsharded = {
            id(fp.sharded_param): fp._unsharded_param
            for m in self.encoders.values()
            for fp in _fsdp_params(m)
            if isinstance(getattr(fp, "_unsharded_param", None), Tensor)
        }
        return [unsharded[id(p)] for p in params if id(p) in unsharded]

    # ------------------------------------------------------------------ collectives
    def gram_reduce(self, enc: str) -> Callable[[Tensor], Tensor]:
        """The ``gram_reduce`` of :func:`~mmpareto_lightning.rule.integrate_tensor_lists` for encoder
        ``enc``: sums the Gram matrices of the local shards over the ranks holding the other shards (one
        all-reduce of ``T * K * K`` float64 numbers). Replicas of HSDP hold equal shards and are not
        summed over."""
        group, device_type = self._groups[enc], self._device_types[enc]

        def reduce(grams: Tensor) -> Tensor:
            # Gradients offloaded to the CPU under an accelerator's group travel on the accelerator.
            moved = grams.device.type != device_type
            buffer = grams.to(device_type) if moved else grams.contiguous()
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            return buffer.to(grams.device) if moved else buffer

        return reduce

    def check_gradient_sync(self) -> None:
        """Refuse gradients kept unsharded across backward passes (``set_requires_gradient_sync(False)``,
        or ``set_requires_all_reduce(False)`` under HSDP): FSDP would then add the next pass's gradient
        to them, mixing the objectives before any shard exists."""
        for enc, module in self.encoders.items():
            for group in _fsdp_groups(module):
                hsdp = group.mesh_info.mesh.ndim > 1 if hasattr(group, "mesh_info") else False
                if not getattr(group, "reduce_grads", True) or (
                    hsdp and not getattr(group, "all_reduce_grads", True)
                ):
                    raise ShardingError(
                        f"Gradient synchronisation is off in encoder {enc!r} (`set_requires_gradient_sync("
                        "False)` or `set_requires_all_reduce(False)`): FSDP would keep the gradients "
                        "unsharded and add every backward pass to them, mixing the objectives MMPareto "
                        "takes apart. Leave it on; accumulate with the callback's (or the Trainer's) "
                        "`accumulate_grad_batches` or the engine's `backward(..., accumulate=True)`."
                    )

    def agree(
        self,
        names: Sequence[str],
        called: Sequence[str],
        reach: Mapping[str, Sequence[str]],
        trainable: Mapping[str, int],
    ) -> AgreedStructure:
        """Agree with every rank on the structure of this backward (one all-gather of a few integers
        over a CPU group: no device synchronisation).

        Every rank runs the same backward passes (each reduce-scatters), so the losses, the encoders
        called and their trainable parameters must be the same on every rank; the losses that reach an
        encoder may differ (a missing modality), and the union is taken: where a loss does not reach an
        encoder on this rank, its gradient there is zero.

        Args:
            names: this rank's loss names, in order.
            called: the encoders that produced an output that requires grad.
            reach: encoder -> the losses whose graph reaches its outputs on this rank.
            trainable: encoder -> number of parameters that require grad.

        Raises:
            ShardingError: the ranks disagree on the losses, the encoders called or the trainable
                parameters.
        """
        if len(names) > _MAX_LOSSES:
            self.abandon()
            raise ShardingError(
                f"At most {_MAX_LOSSES} named losses are supported under FSDP, got {len(names)}."
            )
        self.pending = False
        index = {n: i for i, n in enumerate(names)}
        row = [1, zlib.crc32("\0".join(names).encode())]
        for enc in self.encoders:
            mask = sum(1 << index[n] for n in reach.get(enc, ()))
            row += [int(enc in called), trainable.get(enc, 0), mask]
        table = self._all_gather(torch.tensor(row, dtype=torch.int64))
        refused = [r for r, status in enumerate(table[:, 0].tolist()) if not status]
        if refused:
            raise ShardingError(
                f"Rank(s) {refused} refused this training step (their error says why); it stops on every "
                "rank, so that none waits for the others in a collective."
            )
        table = table[:, 1:]
        if (table[:, 0] != table[0, 0]).any():
            every = self._all_gather_object(list(names))
            raise ShardingError(
                "The ranks returned different losses from the training step (rank: names): "
                + "; ".join(f"{r}: {n}" for r, n in enumerate(every))
                + ". Under FSDP every rank runs the same backward passes, so every rank must return the "
                "same named losses in the same order. For a modality missing on a rank, call its encoder "
                "and head on the empty batch and return its loss as a sum over the samples divided by "
                "max(count, 1), which is 0 there."
            )
        present, agreed = [], {}
        for e, enc in enumerate(self.encoders):
            col = table[:, 1 + 3 * e : 4 + 3 * e]
            was_called, counts, masks = col[:, 0].tolist(), col[:, 1].tolist(), col[:, 2].tolist()
            if len(set(counts)) > 1:
                raise ShardingError(
                    f"Encoder {enc!r} has different numbers of trainable parameters on the ranks "
                    f"({counts}); freeze and unfreeze the same parameters on every rank."
                )
            if not counts[0] or not any(was_called):
                continue
            if not all(was_called):
                missing = [r for r, c in enumerate(was_called) if not c]
                raise ShardingError(
                    f"Encoder {enc!r} was not called on rank(s) {missing}. Under FSDP every rank must call "
                    "every sharded module in every step (its parameters are gathered and its gradients "
                    "reduce-scattered collectively): for a missing modality, call the encoder on the "
                    "empty batch."
                )
            union = 0
            for m in masks:
                union |= m
            present.append(enc)
            agreed[enc] = [n for n in names if union >> index[n] & 1]
        return AgreedStructure(present, agreed)

    def begin(self) -> None:
        """A step starts: until :meth:`agree` or :meth:`abandon`, the other ranks wait for this rank."""
        self.pending = True

    def abandon(self) -> None:
        """This rank refuses the step before agreeing on it: it tells the others (one row of zeros in
        the agreement), which then refuse it too instead of waiting in a collective. A no-op once the
        step was agreed on."""
        if self.pending:
            self.pending = False
            self._all_gather(torch.zeros(2 + 3 * len(self.encoders), dtype=torch.int64))

    def _exchange(self) -> HostExchange:
        """Exchanges of CPU tensors and host values over all ranks (a gloo group), made once: every rank
        makes it at the same point, the first sharded step."""
        if self._host is None:
            self._host = HostExchange()
        return self._host

    def _all_gather(self, row: Tensor) -> Tensor:
        if not dist.is_initialized():
            return row[None]
        group = self._exchange().group
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        return torch.stack(rows)

    def _all_gather_object(self, obj: Any) -> list[Any]:
        if not dist.is_initialized():
            return [obj]
        return self._exchange().gather(obj)
