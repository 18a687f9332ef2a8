"""Track parallelism for the PT-MoE server model, the tensor-parallel baseline, and the plan at scale.

The 2025 server model (:mod:`mmafm.models.ptmoe`; ``../shared/REFERENCE.md`` "2025 server PT-MoE")
is ``num_tracks`` smaller transformers that exchange state only at the boundaries of their track
blocks of D layers. Run with each track on its own ranks, one forward needs L/D collectives
instead of tensor parallelism's 2L. This module makes that real on torch.distributed:

- a :class:`~torch.distributed.device_mesh.DeviceMesh` of two dimensions, ``("dp", "track")``
  (:func:`track_mesh`): the ranks of one ``track`` group split the tracks between them (rank r
  holds tracks ``r*T/P .. (r+1)*T/P - 1`` and nothing of the others), the ``dp`` dimension holds
  copies of that split, each FSDP2-sharded over ``dp`` and fed its own share of the data;
- :func:`shard_tracks` turns a plain :class:`~mmafm.models.ptmoe.PTMoEModel` into a
  :class:`TrackParallelPTMoE` in place (as FSDP2 shards in place): the other ranks' tracks are
  dropped, parameter names stay those of the plain model (``tracks.{t}.layers.{i}.*``), the
  embedding, final norm and head stay on every rank and compute the same values there;
- at each track-block boundary the ranks exchange state with ONE all-reduce of the sum of their
  tracks' residual streams (``track_exchange="mean"``: every block; ``"final"``: only at the
  end); the MoE experts live inside their track's layers, so routing never leaves the rank (no
  all-to-all). The backward pass mirrors it with one all-reduce per block (Megatron's f/g pair:
  entering the tracks all-reduces gradients, leaving them all-reduces values);
- checkpoints stay the full state dicts of the plain model (:func:`gather_track_state`,
  :func:`load_track_state`), so a track-parallel run resumes in one process and back.

The tensor-parallel baseline (:func:`tensor_parallelize`) is PyTorch's own
``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` on the dense decoder
(Megatron-LM's layout): 2 all-reduces per layer forward, 2 backward. :class:`CollectiveCounter`
counts the collectives of a region and their payload bytes (checked against
``torch.distributed.tensor.debug.CommDebugMode`` in the tests), and :func:`track_plan` sizes the
full ``afm_2025_server`` on a track x FSDP mesh (docs/distributed.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmafm.models.ptmoe import PTMoEModel
from mmafm.models.text import AttentionContext, TextConfig, TextModel, layer_is_moe, run_blocks

__all__ = [
    "MESH_DIMS",
    "mesh_shape",
    "track_mesh",
    "local_track_ids",
    "TrackParallelPTMoE",
    "shard_tracks",
    "is_track_parallel",
    "gather_track_state",
    "load_track_state",
    "TrackDataShare",
    "tensor_parallelize",
    "CollectiveCounter",
    "text_param_counts",
    "TrackPlan",
    "track_plan",
    "plan_table",
]

MESH_DIMS = ("dp", "track")  # outer: FSDP / data parallel; inner: tracks (neighbouring ranks, fastest links)


# ------------------------------------------------------------------------------------ the mesh
def mesh_shape(world_size: int, num_tracks: int, track_degree: int | None = None) -> tuple[int, int]:
    """``(dp, track)`` sizes of the mesh for ``world_size`` ranks and a model of ``num_tracks``.

    Args:
        world_size: ranks in the run.
        num_tracks: tracks of the model (T).
        track_degree: ranks the tracks are split over (P); ``None`` = ``gcd(world_size, T)``, as
            many as both allow (4 tracks on 8 GPUs: 4 x 2).

    Raises:
        ValueError: P does not divide both the tracks and the ranks.
    """
    if track_degree is None:
        track_degree = math.gcd(world_size, num_tracks)
    if track_degree < 1 or num_tracks % track_degree or world_size % track_degree:
        raise ValueError(
            f"track_degree={track_degree} must divide both num_tracks={num_tracks} and the "
            f"world size {world_size}"
        )
    return world_size // track_degree, track_degree


def track_mesh(num_tracks: int, track_degree: int | None = None, device_type: str | None = None):
    """The ``("dp", "track")`` :class:`DeviceMesh` over every rank of the process group.

    Ranks are laid out row-major, so a track group is ``track_degree`` neighbouring ranks (one
    node's GPUs): the per-block exchange runs over the fastest links, FSDP across nodes.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("track_mesh needs a process group: launch with torchrun and call init_distributed()")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    shape = mesh_shape(dist.get_world_size(), num_tracks, track_degree)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def local_track_ids(num_tracks: int, track_degree: int, track_rank: int) -> tuple[int, ...]:
    """The tracks rank ``track_rank`` of the track dimension holds: a contiguous run of T/P."""
    per_rank = num_tracks // track_degree
    return tuple(range(track_rank * per_rank, (track_rank + 1) * per_rank))


# ------------------------------------------------------------------------- the exchange (autograd)
def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` into a new contiguous tensor (the input is left alone)."""
    summed = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed


class _EnterTracks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the track group (each rank's tracks
    consumed the replicated input, so each holds part of its gradient)."""

    @staticmethod
    def forward(ctx, group, hidden):  # (B, T, dim)
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return None, _all_reduce(grad, ctx.group)


class _ExchangeTracks(torch.autograd.Function):
    """A block boundary between two blocks: the sum of every rank's tracks (one all-reduce), which
    every track continues from; the backward pass sums the continuing tracks' gradients (one)."""

    @staticmethod
    def forward(ctx, group, local_sum):  # (B, T, dim)
        ctx.group = group
        return _all_reduce(local_sum, group)

    @staticmethod
    def backward(ctx, grad):
        return None, _all_reduce(grad, ctx.group)


class _LeaveTracks(torch.autograd.Function):
    """The last boundary: the sum of every rank's tracks (and of their MoE balance losses, in the
    same all-reduce), consumed by the replicated norm / head / loss, so the backward pass needs no
    collective: every rank already holds the whole gradient."""

    @staticmethod
    def forward(ctx, group, local_sum, aux_sum):  # (B, T, dim), scalar or None
        if aux_sum is None:
            return _all_reduce(local_sum, group), None
        ctx.aux_dtype = aux_sum.dtype
        flat = torch.cat([local_sum.reshape(-1), aux_sum.reshape(1).to(local_sum.dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        return flat[:-1].view_as(local_sum), flat[-1].to(aux_sum.dtype)

    @staticmethod
    def backward(ctx, grad_hidden, grad_aux):
        grad_aux = None if grad_aux is None else grad_aux.to(getattr(ctx, "aux_dtype", grad_aux.dtype))
        return None, grad_hidden, grad_aux


# --------------------------------------------------------------------------- the model, sliced
class TrackParallelPTMoE(PTMoEModel):
    """A :class:`PTMoEModel` holding only this rank's tracks; made by :func:`shard_tracks`.

    ``tracks`` is an ``nn.ModuleDict`` keyed by the global track index, so parameter names are
    those of the plain model. Attributes set by :func:`shard_tracks`: ``track_group`` (the process
    group of the track dimension), ``dp_group`` (that of ``dp`` when FSDP2 shards over it, else
    None), ``track_degree`` (P), ``track_ids`` (this rank's tracks) and ``full_state_keys`` (the
    plain model's state-dict keys, in order).
    """

    track_group: Any
    dp_group: Any
    track_degree: int
    track_ids: tuple[int, ...]
    full_state_keys: list[str]

    def __init__(self, *args, **kwargs):
        raise TypeError("build a PTMoEModel and slice it with mmafm.train.parallel.shard_tracks(model, mesh)")

    def _local_tracks(self) -> list[tuple[int, nn.Module]]:
        return [(t, self.tracks[str(t)]) for t in self.track_ids]

    def _trunk(self, h: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, list]:  # (B, T, dim)
        if ctx.cache is not None:
            raise RuntimeError(
                "a track-parallel model trains and evaluates without a KV cache; decode with the "
                "plain model (mmafm.load_model of the checkpoint it saves)"
            )
        config, depth = self.config, self.config.track_block_depth
        group, split = self.track_group, self.track_degree > 1
        tracks = self._local_tracks()
        aux_losses: list[torch.Tensor] = []
        kv_stores: dict[int, dict] = {t: {} for t, _ in tracks}
        if split:
            h = _EnterTracks.apply(group, h)
        states = {t: h for t, _ in tracks}
        for start in range(0, config.n_layers, depth):
            for t, track in tracks:
                blocks = [(i, track.layers[i]) for i in range(start, start + depth)]
                states[t] = run_blocks(blocks, states[t], ctx, config, kv_stores[t], aux_losses,
                                       self.grad_checkpointing)
            last = start + depth == config.n_layers
            if config.track_exchange == "mean" and not last:  # a block boundary: one all-reduce
                local_sum = torch.stack(list(states.values())).sum(dim=0)
                merged = (_ExchangeTracks.apply(group, local_sum) if split else local_sum) / config.num_tracks
                states = {t: merged for t in states}
        local_sum = torch.stack(list(states.values())).sum(dim=0)
        aux_sum = torch.stack(aux_losses).sum() if aux_losses else None
        if split:
            local_sum, aux_sum = _LeaveTracks.apply(group, local_sum, aux_sum)
        merged = local_sum / config.num_tracks
        if aux_sum is None:
            return merged, []
        moe_layers = sum(layer_is_moe(config, i) for i in range(config.n_layers))
        return merged, [aux_sum / (config.num_tracks * moe_layers)]  # the mean over every MoE layer of every track

    def fsdp_units(self) -> list[nn.Module]:
        """The decoder layers of this rank's tracks."""
        return [layer for _, track in self._local_tracks() for layer in track.layers]

    def new_cache(self, *args, **kwargs):
        raise RuntimeError("a track-parallel model has no KV cache; decode with the plain model")

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip every gradient to a global norm of ``max_norm``; returns the norm before clipping.

        The global norm counts the replicated parameters (embedding, final norm, head) once and
        every track once: two scalar all-reduces (FSDP2 shards over ``dp``, tracks over ``track``),
        instead of one per parameter.
        """
        shared, own = [], []
        for name, param in self.named_parameters():
            if param.grad is not None:
                (own if name.startswith("tracks.") else shared).append(param.grad)
        device = self.embed.weight.device
        squares = torch.stack([_local_squares(shared, device), _local_squares(own, device)])  # (2,)
        if self.dp_group is not None:  # FSDP2 shards are disjoint: their squares add up over dp
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self.dp_group)
        if self.track_degree > 1:  # every track once; the replicated weights are alike on every rank
            own_squares = squares[1:].clone()
            dist.all_reduce(own_squares, op=dist.ReduceOp.SUM, group=self.track_group)
            squares = torch.cat([squares[:1], own_squares])
        total = squares.sum().sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        if coef.device.type == "cpu" and float(coef) == 1.0:  # nothing to clip: no pass over the gradients
            return total  # (the same number on every rank: the squares were all-reduced)
        for grad in shared + own:
            if _is_dtensor(grad):
                grad.to_local().mul_(coef)
            else:
                grad.mul_(coef)
        return total


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")


def _local_squares(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of this rank's part of ``grads`` (a DTensor's local shard), float32 scalar."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        local = grad.to_local() if _is_dtensor(grad) else grad
        total = total + local.float().pow(2).sum()
    return total


def is_track_parallel(model: nn.Module) -> bool:
    """Whether ``model`` was sliced by :func:`shard_tracks`."""
    return isinstance(model, TrackParallelPTMoE)


def shard_tracks(model: PTMoEModel, mesh) -> TrackParallelPTMoE:
    """Keep this rank's tracks of ``model`` (in place) and FSDP2-shard the rest over ``dp``.

    Args:
        model: a plain PT-MoE model, the same (same seed / weights) on every rank.
        mesh: the ``("dp", "track")`` mesh of :func:`track_mesh`.

    Returns:
        ``model`` itself, now a :class:`TrackParallelPTMoE` (and an FSDP2 module when ``dp > 1``:
        each of its layers, then the whole, sharded over ``dp``).
    """
    if not isinstance(model, PTMoEModel) or is_track_parallel(model):
        raise TypeError(
            f"parallel='track' needs a plain PT-MoE model (an afm_2025_server* preset), got "
            f"{type(model).__name__}"
        )
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"shard_tracks needs a mesh with dimensions {MESH_DIMS}, got {mesh.mesh_dim_names}")
    num_tracks = model.config.num_tracks
    track_degree = mesh["track"].size()
    if num_tracks % track_degree:
        raise ValueError(f"{num_tracks} tracks cannot be split over {track_degree} ranks")
    full_state_keys = list(model.state_dict().keys())
    track_ids = local_track_ids(num_tracks, track_degree, mesh.get_local_rank("track"))
    model.tracks = nn.ModuleDict({str(t): model.tracks[t] for t in track_ids})
    model.__class__ = TrackParallelPTMoE
    model.track_group = mesh.get_group("track")
    model.track_degree = track_degree
    model.track_ids = track_ids
    model.full_state_keys = full_state_keys
    model.dp_group = mesh.get_group("dp") if mesh["dp"].size() > 1 else None
    if mesh["dp"].size() > 1:
        from torch.distributed.fsdp import fully_shard

        for unit in model.fsdp_units():
            fully_shard(unit, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


# ---------------------------------------------------------------------------- full state dicts
def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _merge_states(model: TrackParallelPTMoE, parts: list[tuple[dict, dict | None]]) -> tuple[dict, dict | None]:
    """The plain model's state dicts from every track rank's part, keys in the plain model's order."""
    order = {key: index for index, key in enumerate(model.full_state_keys)}
    model_state: dict[str, torch.Tensor] = {}
    for part, _ in parts:
        model_state.update(part)
    missing = [key for key in model.full_state_keys if key not in model_state]
    if missing:
        raise RuntimeError(f"track ranks together lack {len(missing)} weights, e.g. {missing[:3]}")
    model_state = {key: model_state[key] for key in model.full_state_keys}
    if parts[0][1] is None:
        return model_state, None
    groups = [dict(group) for group in parts[0][1]["param_groups"]]
    state: dict[str, Any] = {}
    for _, optim in parts:
        state.update(optim["state"])
        if len(optim["param_groups"]) != len(groups):
            raise RuntimeError("track ranks built optimizers with different parameter groups")
        for merged, group in zip(groups, optim["param_groups"]):
            merged["params"] = sorted(set(merged["params"]) | set(group["params"]), key=order.__getitem__)
    return model_state, {"state": {k: state[k] for k in sorted(state, key=order.__getitem__)}, "param_groups": groups}


def gather_track_state(model: TrackParallelPTMoE, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The plain model's full state dict (and the optimizer's, keyed by parameter name) on CPU,
    as one process would save them; a collective: call on every rank.

    Each rank gathers its part over ``dp`` (FSDP2) with ``torch.distributed.checkpoint``; the
    parts of one track group meet on the group's first rank (global rank 0's group is the one
    the trainer writes). Other ranks get their own part back.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    if optimizer is None:
        part = (_to_cpu(get_model_state_dict(model, options=options)), None)
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        part = (_to_cpu(model_state), _to_cpu(optim_state))
    if model.track_degree == 1:
        return part
    group = model.track_group
    first = dist.get_global_rank(group, 0)
    parts: list | None = [None] * model.track_degree if dist.get_rank() == first else None
    dist.gather_object(part, parts, dst=first, group=group)
    if parts is None:
        return part
    return _merge_states(model, parts)


def load_track_state(
    model: TrackParallelPTMoE,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, torch.Tensor],
    optim_state: dict | None = None,
) -> None:
    """Load a plain model's full state dict (and optimizer state keyed by parameter name): each
    rank takes its tracks and the shared weights (sharding them again under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    own = [key for key in model.full_state_keys if not key.startswith("tracks.") or key.split(".")[1] in model.tracks]
    missing = [key for key in own if key not in model_state]
    if missing:
        raise KeyError(f"the state dict lacks {len(missing)} weights of this rank's tracks, e.g. {missing[:3]}")
    local_state = {key: model_state[key] for key in own}
    options = StateDictOptions(full_state_dict=True)
    if optimizer is None or optim_state is None:
        set_model_state_dict(model, local_state, options=options)
        return
    keep = set(own)
    groups = [dict(group, params=[name for name in group["params"] if name in keep]) for group in optim_state["param_groups"]]
    local_optim = {"state": {k: v for k, v in optim_state["state"].items() if k in keep}, "param_groups": groups}
    set_state_dict(model, optimizer, model_state_dict=local_state, optim_state_dict=local_optim, options=options)


# --------------------------------------------------------------------------------- data
class TrackDataShare:
    """The batches of this rank's data-parallel group: every ``dp``-th batch of ``source``,
    starting at the rank's ``dp`` index; the ranks of one track group see the same batches.

    Give it a source that is *not* split by rank itself (``TokenShards(..., shard_by_rank=False)``).
    The mesh shape is read when iteration starts (after the trainer joined the process group).
    The skipped batches are still read from ``source`` (cheap for memory-mapped token shards).
    """

    def __init__(self, source: Iterable, num_tracks: int, track_degree: int | None = None):
        self.source = source
        self.num_tracks = num_tracks
        self.track_degree = track_degree

    def _share(self) -> tuple[int, int]:
        """``(dp index, dp size)`` of this rank (``(0, 1)`` without a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        dp, track = mesh_shape(dist.get_world_size(), self.num_tracks, self.track_degree)
        return dist.get_rank() // track, dp

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __len__(self) -> int:
        index, size = self._share()
        return len(range(index, len(self.source), size))

    def __iter__(self) -> Iterator:
        index, size = self._share()
        return itertools.islice(iter(self.source), index, None, size)


# ------------------------------------------------------------------------ tensor parallel baseline
def tensor_parallelize(model: TextModel, mesh) -> TextModel:
    """Megatron-style tensor parallelism of a dense decoder with ``parallelize_module`` (in place).

    Per layer: q/k/v and the SwiGLU gate/up projections column-parallel (each rank computes
    ``n_heads / P`` heads and ``ffn_dim / P`` hidden units), o_proj and w_down row-parallel (their
    partial outputs all-reduced): 2 all-reduces per layer forward; the attention and FFN inputs are
    made replicated DTensors once, so the backward pass sums their gradients once each: 2 per layer.
    The embedding, norms and head stay replicated. The q/k-norm gains see only their rank's heads,
    so their gradients are partial (Megatron all-reduces such shared gains once per step): this
    baseline is for the forward and its communication, not for training.

    Args:
        model: a dense :class:`~mmafm.models.text.TextModel` (no MoE, no KV sharing) whose heads,
            KV heads and FFN width divide by the mesh size.
        mesh: a 1-D :class:`DeviceMesh` of the tensor-parallel ranks.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    config, size = model.config, mesh.size()
    if not isinstance(model, TextModel) or config.num_experts or config.kv_share_segments:
        raise ValueError("tensor_parallelize takes a dense TextModel without MoE or KV sharing")
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads), ("ffn_dim", config.ffn_dim)):
        if value % size:
            raise ValueError(f"{name}={value} does not divide over {size} tensor-parallel ranks")
    def replicated_input(count: int) -> PrepareModuleInput:  # the first of ``count`` inputs; the rest are not tensors
        layouts = (Replicate(),) + (None,) * (count - 1)
        return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts, use_local_output=False)

    plan = {
        "attn": replicated_input(3),  # (x, attention context, shared K/V)
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "ffn": replicated_input(1),
        "ffn.w_gate": ColwiseParallel(),
        "ffn.w_up": ColwiseParallel(),
        "ffn.w_down": RowwiseParallel(),
    }
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.attn.n_heads //= size  # the heads this rank computes
        block.attn.n_kv_heads //= size
    return model


# ------------------------------------------------------------------------------- counting
_COLLECTIVE_WORDS = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "all_to_all",
                     "alltoall", "broadcast", "reduce_", "gather_", "scatter_")


def _is_collective(func) -> bool:
    namespace = getattr(func, "namespace", "") or func._schema.name.split("::")[0]
    name = func._schema.name.split("::")[-1]
    if namespace not in ("c10d", "_c10d_functional", "c10d_functional", "_dtensor"):
        return False
    return any(word in name for word in _COLLECTIVE_WORDS) and "wait" not in name


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives run inside it and their payload (bytes of the tensors handed in).

    Sees ``torch.distributed`` calls (``c10d::allreduce_`` ...) and the functional collectives
    DTensor issues (``_c10d_functional::all_reduce`` ...), like ``CommDebugMode``, whose way of
    letting DTensor desugar first it copies. ``calls`` lists ``(op name, bytes)`` in order.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        if _is_collective(func):
            leaves, _ = tree_flatten((args, kwargs))
            payload = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            self.calls.append((func._schema.name, payload))
        return func(*args, **kwargs)

    def count(self, kind: str = "") -> int:
        """Collectives whose op name contains ``kind`` (``"all_reduce"`` matches both spellings)."""
        return len(self._of(kind))

    def bytes(self, kind: str = "") -> int:
        """Payload bytes of the collectives whose op name contains ``kind``."""
        return sum(payload for _, payload in self._of(kind))

    def _of(self, kind: str) -> list[tuple[str, int]]:
        spellings = {kind, kind.replace("_", "")}
        return [call for call in self.calls if any(s in call[0].split("::")[-1] for s in spellings)]


# ------------------------------------------------------------------------------ the plan at scale
def text_param_counts(config: TextConfig) -> dict[str, int]:
    """Closed-form parameter counts: ``shared`` (embedding, head, final norm), ``per_track`` (all
    layers of one track), ``largest_layer`` and ``total``; equal to the built model's."""
    if config.kv_share_segments is not None:
        raise ValueError("text_param_counts covers models without KV sharing (the PT-MoE server, dense models)")
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attention = config.dim * q_width * 2 + config.dim * kv_width * 2 + 2 * config.dim  # q, o, k, v, two norms
    if config.qk_norm:
        attention += 2 * config.head_dim
    dense_ffn = 3 * config.dim * config.ffn_dim
    expert_width = config.moe_ffn_dim or config.ffn_dim
    moe_ffn = config.num_experts * 3 * config.dim * expert_width + config.dim * config.num_experts
    layers = [attention + (moe_ffn if layer_is_moe(config, i) else dense_ffn) for i in range(config.n_layers)]
    shared = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) + config.dim
    per_track = sum(layers)
    return {"shared": shared, "per_track": per_track, "largest_layer": max(layers),
            "total": shared + config.num_tracks * per_track}


WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8  # fp32 weights, gradients, AdamW m and v [paper: fp32 state]
RESIDUAL_BYTES, COMPUTE_BYTES = 4, 2  # the residual stream stays fp32 under bf16 autocast; layer internals bf16
LOGIT_BYTES = 2 + 4 + 4  # per vocabulary entry and token: bf16 logits, their fp32 copy, its gradient


@dataclass(frozen=True)
class TrackPlan:
    """Memory per GPU and communication per optimizer step of one track x FSDP mesh (bytes)."""

    gpus: int
    track: int  # P: ranks of the track dimension
    dp: int  # ranks of the FSDP (data-parallel) dimension
    tracks_per_rank: int
    params_total: int
    params_per_gpu: int  # this GPU's FSDP shard of its tracks and of the shared weights
    weights: int
    grads: int
    optimizer: int
    gathered: int  # FSDP2 all-gather buffers alive at once: the shared root + two layers (one prefetched)
    activations: int  # one micro-batch, per-layer activation checkpointing (see activation_bytes)
    logits: int  # one micro-batch's logits in bf16 + fp32 + fp32 gradient
    total: int
    micro_batches: int  # per optimizer step on each dp rank
    exchange_collectives: int  # track all-reduces per micro-batch, forward + backward
    exchange_bytes: int  # per GPU per step: ring all-reduce traffic of the exchanges
    tensor_parallel_collectives: int  # tensor parallelism of the same depth, per micro-batch
    tensor_parallel_bytes: int  # per GPU per step, same payload and group size
    fsdp_bytes: int  # per GPU per step: 2 all-gathers per micro-batch + 1 reduce-scatter
    notes: dict = field(default_factory=dict, compare=False)


def activation_bytes(config: TextConfig, seq_len: int, rows: int, tracks_per_rank: int) -> int:
    """Activations of one micro-batch with per-layer checkpointing (``set_grad_checkpointing``).

    Kept through the step: every layer's fp32 input (the residual stream). Alive while one layer
    is recomputed in backward (the largest, an MoE layer), in bf16: its two norm outputs, q, k, v,
    the attention output, and per routed copy of a token (top_k) the expert's gate, up and product
    rows, plus the layer's two fp32 residual sums. Attention probabilities are not stored (fused
    SDPA kernels keep O(seq) statistics).
    """
    tokens = rows * seq_len
    inputs = tracks_per_rank * config.n_layers * tokens * config.dim * RESIDUAL_BYTES
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    ffn_rows = config.top_k * 3 * (config.moe_ffn_dim or config.ffn_dim) if config.num_experts else 3 * config.ffn_dim
    recompute = tokens * ((2 * config.dim + 2 * q_width + 2 * kv_width + ffn_rows) * COMPUTE_BYTES
                          + 2 * config.dim * RESIDUAL_BYTES)
    return inputs + recompute


def track_plan(
    config: TextConfig,
    gpus: int,
    seq_len: int = 4096,
    global_rows: int = 4096,
    micro_rows: int = 1,
    track_degree: int | None = None,
) -> TrackPlan:
    """Size a track x FSDP mesh for ``config`` on ``gpus`` GPUs (closed forms, no model built).

    Args:
        config: the PT-MoE config (``afm_2025_server``).
        gpus: GPUs in the run.
        seq_len: tokens per row [paper: 4096 in core pretraining].
        global_rows: rows per optimizer step over all dp ranks [paper, 2024 core: 4096 x 4096 tokens].
        micro_rows: rows per forward on one rank (gradient accumulation covers the rest).
        track_degree: ranks the tracks are split over; ``None`` = gcd(gpus, num_tracks).
    """
    dp, track = mesh_shape(gpus, config.num_tracks, track_degree)
    if global_rows % (dp * micro_rows):
        raise ValueError(f"global_rows={global_rows} must divide into {dp} dp ranks x {micro_rows} rows")
    counts = text_param_counts(config)
    tracks_per_rank = config.num_tracks // track
    local = counts["shared"] + tracks_per_rank * counts["per_track"]
    params_per_gpu = math.ceil(local / dp)
    gathered = 0 if dp == 1 else (counts["shared"] + 2 * counts["largest_layer"]) * WEIGHT_BYTES
    activations = activation_bytes(config, seq_len, micro_rows, tracks_per_rank)
    logits = micro_rows * seq_len * config.vocab_size * LOGIT_BYTES
    weights, grads, optimizer = (params_per_gpu * b for b in (WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES))
    micro_batches = global_rows // (dp * micro_rows)
    blocks = config.n_layers // config.track_block_depth if config.track_exchange == "mean" else 1
    payload = micro_rows * seq_len * config.dim * RESIDUAL_BYTES  # one exchange's buffer
    ring = 2 * (track - 1) / track  # bytes a rank sends per payload byte in a ring all-reduce
    exchange_collectives = 2 * blocks if track > 1 else 0
    tensor_collectives = 4 * config.n_layers if track > 1 else 0
    fsdp = (2 * micro_batches + 1) * (dp - 1) / dp * local * WEIGHT_BYTES
    return TrackPlan(
        gpus=gpus, track=track, dp=dp, tracks_per_rank=tracks_per_rank, params_total=counts["total"],
        params_per_gpu=params_per_gpu, weights=weights, grads=grads, optimizer=optimizer, gathered=gathered,
        activations=activations, logits=logits,
        total=weights + grads + optimizer + gathered + activations + logits,
        micro_batches=micro_batches, exchange_collectives=exchange_collectives,
        exchange_bytes=round(micro_batches * exchange_collectives * ring * payload),
        tensor_parallel_collectives=tensor_collectives,
        tensor_parallel_bytes=round(micro_batches * tensor_collectives * ring * payload),
        fsdp_bytes=round(fsdp),
        notes={"seq_len": seq_len, "global_rows": global_rows, "micro_rows": micro_rows},
    )


def _gb(value: float) -> str:
    return f"{value / 1e9:,.1f}"


def plan_table(plans: Sequence[TrackPlan]) -> str:
    """The plans as a Markdown table (GB = 1e9 bytes)."""
    lines = [
        "| GPUs | mesh track x dp | tracks/GPU | params/GPU | weights+grads+Adam GB | FSDP buffers GB "
        "| activations GB | logits GB | total GB | micro-batches/step | track exchanges (TP) per micro-batch "
        "| exchange GB/step | TP GB/step | FSDP GB/step |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for plan in plans:
        lines.append(
            f"| {plan.gpus} | {plan.track} x {plan.dp} | {plan.tracks_per_rank} | {plan.params_per_gpu / 1e9:.2f}B "
            f"| {_gb(plan.weights + plan.grads + plan.optimizer)} | {_gb(plan.gathered)} | {_gb(plan.activations)} "
            f"| {_gb(plan.logits)} | {_gb(plan.total)} | {plan.micro_batches} "
            f"| {plan.exchange_collectives} ({plan.tensor_parallel_collectives}) | {_gb(plan.exchange_bytes)} "
            f"| {_gb(plan.tensor_parallel_bytes)} | {_gb(plan.fsdp_bytes)} |"
        )
    return "\n".join(lines)
