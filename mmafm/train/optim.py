"""Optimizers: the AFM optimizer (``AdaStar``, with mu-param) and the AdamW default.

``TrainSettings.optimizer`` picks one: ``"afm"`` (the text stages' default) or ``"adamw"`` (every
other stage's). :func:`build_optimizer` is the trainer's default factory; any callable
``(model, config) -> torch.optim.Optimizer`` can replace it. The trainer calls it on the unwrapped
(and, with FSDP2, already sharded) model.

**AdaStar** [code: apple/axlearn ``common/optimizers.py`` ``adastar_optimizer``, configured by
``experiments/text/gpt/common.py`` ``adastar_learner_config`` for the Honeycrisp / AFM-on-device
configs ``experiments/text/gpt/honeycrisp.py``; 2024 AFM report, section 3]. Per parameter
block (one tensor), with step count ``t``::

    v = b2 * v + (1 - b2) * (g**2 + eps_square)        # gradient-square EMA, b2 = 0.95
    u = g / (sqrt(v / (1 - b2**t)) + eps)              # bias-corrected; eps = 0, eps_square = 1e-30
    u = u / max(1, rms(u) / threshold)                 # per-block RMS clip, threshold = 1.0
    m = b1 * m + (1 - b1) * u                          # update EMA, b1 = 0.95, NO bias correction
    p = p - schedule * (lr * scale * m + wd * p)       # wd = 3.16e-4, not multiplied by lr

``schedule`` is the LR multiplier of the scheduler (``group["lr"] / group["peak_lr"]``, so
``lr * schedule`` is the LR the step uses); the weight decay follows the schedule but not the peak
LR, as in axlearn. ``scale`` is the mu-param update scale of the block (:func:`mup_scales`, 1 for
every block the rule does not name). ``rms`` is over the whole parameter: under FSDP2 each rank
holds a shard (a ``DTensor``), and the sums of squares are all-reduced over the shard dimensions
of its mesh before the clip (one small all-reduce per step).

The optional gradient EMA (off in the AFM config) makes Adam a special case: with
``gradient_ema_decay=b1, gradient_ema_debias=True, gradient_square_ema_decay=b2, eps=eps,
eps_square=0, update_clip_threshold=None, update_ema_decay=None`` and ``weight_decay = lr *
lambda``, AdaStar is ``torch.optim.AdamW(lr, betas=(b1, b2), eps=eps, weight_decay=lambda)``
(``tests/test_afm_optim.py`` checks it).

**AdamW**: PyTorch's AdamW. As in nanoGPT and timm, 1-D parameters (norm scales, biases),
embedding tables and every name the model lists in ``no_weight_decay()`` (timm's convention, e.g.
position embeddings, register tokens) get no decay. AFM instead decays every parameter [code:
``adastar_learner_config`` passes no per-parameter decay scale]; :func:`afm_param_groups` takes
``decay_all=False`` to use AdamW's exclusions.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mmafm.train import native_optim

__all__ = [
    "AdaStar",
    "MUP_BASE_WIDTH",
    "MUP_PATTERNS",
    "OPTIMIZERS",
    "afm_param_groups",
    "build_optimizer",
    "model_width",
    "mup_scales",
    "param_groups",
]

OPTIMIZERS = ("afm", "adamw")

# mu-param (simple) [code: honeycrisp.py `_BASE_MODEL_HIDDEN_DIM = 768`, the 85M base model;
# `linear_layer_lr_multiplier = min(768 / hidden_dim, 1.0)`; paper: arXiv 2309.14322 sec. 3.2.4]
MUP_BASE_WIDTH = 768
# the attention and FFN matrices, by parameter path [code: common.py
# `mup_simple_adam_update_transformation` names axlearn's o_proj, qkv_proj, linear1_0/1, linear2
# and the MoE wi_0/wi_1/wo weights]; here mmafm's names (mmafm/models/text.py, ptmoe.py): q/k/v/o
# projections, SwiGLU w_gate/w_up/w_down, and the MoE experts' stacked w_gate/w_up/w_down. The
# MoE router, norms and the (tied) embedding keep scale 1, as in axlearn.
MUP_PATTERNS = (
    r"(.*\.)?attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
    r"(.*\.)?ffn\.(w_gate|w_up|w_down)(\.weight)?",
)


# ------------------------------------------------------------------------------------ AdamW
def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names (or module prefixes) the model asks to exclude from weight decay."""
    names: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        names.update(model.no_weight_decay())
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _excluded(name: str, param: torch.Tensor, no_decay: set[str]) -> bool:
    if param.ndim < 2:
        return True
    return any(name == entry or name.startswith(entry + ".") for entry in no_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and an undecayed group (AdamW's convention).

    Args:
        model: the model; frozen parameters (``requires_grad=False``) are left out.
        weight_decay: the decay of the decayed group.

    Returns:
        Two optimizer param groups, each with a ``name`` ("decay" / "no_decay"); empty groups are
        dropped.
    """
    no_decay = _no_decay_names(model)
    decay_params, plain_params = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain_params if _excluded(name, param, no_decay) else decay_params).append(param)
    if not decay_params and not plain_params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups = [
        {"params": decay_params, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain_params, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


# ---------------------------------------------------------------------------------- mu-param
def model_width(model: nn.Module) -> int | None:
    """The model's width (``d_model``): ``model.config.dim`` when it has one, else ``None``."""
    width = getattr(getattr(model, "config", None), "dim", None)
    return int(width) if isinstance(width, int) else None


def mup_scales(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    width: int,
    base_width: int = MUP_BASE_WIDTH,
    patterns: Sequence[str] = MUP_PATTERNS,
) -> dict[str, float]:
    """mu-param (simple): the per-parameter update scale ``min(base_width / width, 1)``.

    Args:
        named_parameters: ``model.named_parameters()`` (names are all that is read).
        width: the model's ``d_model`` (3072 for the 2024 device model: scale 0.25).
        base_width: the width whose learning rate was tuned (768, the 85M base model [code]).
        patterns: regular expressions; a parameter whose name fully matches one is scaled.

    Returns:
        ``{name: scale}`` for every matched parameter (the others keep scale 1 and are absent).
    """
    if width <= 0 or base_width <= 0:
        raise ValueError(f"mup_scales: width and base_width must be > 0, got {width} and {base_width}")
    scale = min(base_width / width, 1.0)
    compiled = [re.compile(pattern) for pattern in patterns]
    return {name: scale for name, _ in named_parameters if any(c.fullmatch(name) for c in compiled)}


def afm_param_groups(
    model: nn.Module,
    weight_decay: float,
    width: int | None = None,
    base_width: int = MUP_BASE_WIDTH,
    decay_all: bool = True,
) -> list[dict]:
    """Param groups for :class:`AdaStar`: one per (update scale, decay), named for the logs.

    Args:
        model: the model; frozen parameters are left out.
        weight_decay: the decay of decayed parameters (not multiplied by the LR in AdaStar).
        width: ``d_model`` for mu-param; ``None`` reads :func:`model_width` (a model without
            ``config.dim`` gets no mu-param scaling).
        base_width: mu-param's base width.
        decay_all: decay every parameter (AFM [code]); ``False`` uses AdamW's exclusions
            (:func:`param_groups`: norms, biases, embeddings, ``no_weight_decay()``).
    """
    width = width if width is not None else model_width(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    scales = mup_scales(named, width, base_width) if width else {}
    no_decay = set() if decay_all else _no_decay_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        decay = weight_decay if decay_all or not _excluded(name, param, no_decay) else 0.0
        scale = scales.get(name, 1.0)
        key = (scale, decay)
        if key not in groups:
            label = ("mup" if scale != 1.0 else "plain") + ("" if decay else "_no_decay")
            groups[key] = {"params": [], "update_scale": scale, "weight_decay": decay, "name": label}
        groups[key]["params"].append(param)
    return list(groups.values())


# ----------------------------------------------------------------------------------- AdaStar
_PLAIN = (torch.Tensor, nn.Parameter)  # neither sharded nor wrapped


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (its storage: in-place ops update the DTensor), or the
    tensor itself."""
    if type(tensor) in _PLAIN:  # the common case, without the slow attribute miss on a tensor
        return tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_groups(params: Sequence[torch.Tensor]) -> Iterator[tuple[list[int], Any]]:
    """For the sharded parameters among ``params``: (their indices, a process group to sum over),
    one pair per mesh dimension they are sharded on (FSDP2: one)."""
    buckets: dict[tuple[int, int], tuple[list[int], Any]] = {}
    for index, param in enumerate(params):
        placements = None if type(param) in _PLAIN else getattr(param, "placements", None)
        if placements is None:
            continue
        mesh = param.device_mesh
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                key = (id(mesh), dim)
                if key not in buckets:
                    buckets[key] = ([], mesh.get_group(dim))
                buckets[key][0].append(index)
    yield from buckets.values()


def block_sum_squares(tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of each whole parameter block, given the local shards ``tensors`` of
    ``params``: local sums, then all-reduced over the shard dimensions of sharded ones.

    Returns:
        A vector, one entry per tensor, in float32 (float64 for float64 tensors).
    """
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(list(tensors))
    return all_reduce_block_sums(torch.stack(norms).to(dtype) ** 2, params)  # (N,)


def all_reduce_block_sums(sums: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-block sums over the local shards of ``params`` (``sums``: (N,)), summed over the shard
    dimensions of the sharded ones (one all-reduce per mesh dimension); plain tensors keep theirs."""
    for indices, group in _shard_groups(params):
        index = torch.tensor(indices, device=sums.device)
        part = sums.index_select(0, index)
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        sums = sums.index_copy(0, index, part)
    return sums


def _scalars(values: list[float]) -> float | list[float]:
    """One scalar when every block has the same value (the usual case: one step count per
    group), which the ``torch._foreach_*`` scalar overloads take faster than a list."""
    return values[0] if all(v == values[0] for v in values) else values


class AdaStar(torch.optim.Optimizer):
    """The AFM optimizer (axlearn's ``adastar``); the algorithm is in the module docstring.

    Defaults are the AFM-on-device (Honeycrisp) configuration [code: ``adastar_learner_config``].

    Args:
        params: parameters or param groups; a group may set ``update_scale`` (mu-param) and
            ``weight_decay``.
        lr: the peak learning rate (1e-2 in AFM [code + paper]); a scheduler scales
            ``group["lr"]`` and the ratio to this peak scales the weight decay too.
        gradient_ema_decay: momentum on the gradient (``None`` = off, the AFM setting; Adam's
            ``b1`` for the Adam special case).
        gradient_ema_debias: bias-correct the gradient EMA.
        gradient_square_ema_decay: the gradient-square EMA decay (AFM: 0.95 [code]).
        gradient_square_ema_debias: bias-correct it (AFM: yes [code]).
        eps: added to the square root (AFM: 0 [code]).
        eps_square: added to the squared gradient (AFM: 1e-30 [code]).
        update_clip_threshold: the per-block RMS clip of the raw update (AFM: 1.0 [code]);
            ``None`` = off.
        update_ema_decay: momentum on the clipped update (AFM: 0.95 [code]); ``None`` = off.
        update_ema_debias: bias-correct the update EMA (AFM: no [code]).
        weight_decay: decoupled decay, not multiplied by the LR (AFM: 3.16e-4 [code + paper]).
        update_scale: default mu-param scale of a group.
        foreach: ``True`` (and ``None`` wherever the native kernel does not run, see ``fused``):
            the multi-tensor path (``torch._foreach_*`` ops over each group's parameters, one
            list per device and dtype, like AdamW's foreach path);
            ``False``: the per-parameter reference path (plain tensor ops, one parameter at a
            time; the same numbers to float rounding, ``tests/test_afm_optim.py``).
        fused: the native CPU kernel (:mod:`mmafm.train.native_optim`, ``csrc/adastar.c``) for
            float32 CPU parameters (local shards under FSDP2): two passes over each group's
            tensors instead of a dozen foreach ops, the same numbers to float32 rounding
            (``tests/test_afm_optim_native.py``). ``None`` (default): used where the parameters
            qualify and the kernel builds, unless ``foreach`` is given (as ``torch.optim.AdamW``
            does); everything else (CUDA, other dtypes, a failed build, ``kernels_disabled()``)
            takes the foreach path. ``True``: required (an error where it cannot run);
            ``False``: never.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        *,
        gradient_ema_decay: float | None = None,
        gradient_ema_debias: bool = True,
        gradient_square_ema_decay: float = 0.95,
        gradient_square_ema_debias: bool = True,
        eps: float = 0.0,
        eps_square: float = 1e-30,
        update_clip_threshold: float | None = 1.0,
        update_ema_decay: float | None = 0.95,
        update_ema_debias: bool = False,
        weight_decay: float = 3.16e-4,
        update_scale: float = 1.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if fused and foreach is False:
            raise ValueError("AdaStar: fused=True and foreach=False (the reference path) exclude each other")
        if not lr > 0.0:
            raise ValueError(f"AdaStar: lr must be > 0 (the peak learning rate), got {lr}")
        for name, decay in (("gradient_ema_decay", gradient_ema_decay), ("update_ema_decay", update_ema_decay),
                            ("gradient_square_ema_decay", gradient_square_ema_decay)):
            if decay is not None and not 0.0 <= decay < 1.0:
                raise ValueError(f"AdaStar: {name} must be in [0, 1), got {decay}")
        if eps < 0.0 or eps_square < 0.0 or weight_decay < 0.0:
            raise ValueError("AdaStar: eps, eps_square and weight_decay must be >= 0")
        if eps == 0.0 and eps_square == 0.0:
            raise ValueError("AdaStar: eps and eps_square are both 0: a zero gradient would divide by zero")
        if update_clip_threshold is not None and not update_clip_threshold > 0.0:
            raise ValueError(f"AdaStar: update_clip_threshold must be > 0 or None, got {update_clip_threshold}")
        defaults = dict(
            lr=lr, peak_lr=lr, gradient_ema_decay=gradient_ema_decay, gradient_ema_debias=gradient_ema_debias,
            gradient_square_ema_decay=gradient_square_ema_decay,
            gradient_square_ema_debias=gradient_square_ema_debias, eps=eps, eps_square=eps_square,
            update_clip_threshold=update_clip_threshold, update_ema_decay=update_ema_decay,
            update_ema_debias=update_ema_debias, weight_decay=weight_decay, update_scale=update_scale,
            foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """A group with its own ``lr`` has that as its peak (the schedule is ``lr / peak_lr``)."""
        if "lr" in param_group and "peak_lr" not in param_group:
            param_group["peak_lr"] = param_group["lr"]
        super().add_param_group(param_group)

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        state = self.state[param]
        if not state:
            # zeros_like keeps a DTensor a DTensor, so checkpoints see sharded state like AdamW's
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["gradient_ema_decay"] is not None:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["update_ema_decay"] is not None:
                state["update_ema"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdaStar update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdaStar does not support sparse gradients")
            if group.get("foreach") is False:
                for param in params:
                    self._update_one(group, param)
                continue
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for param in params:  # foreach kernels want one device and dtype per list
                buckets.setdefault((param.device, param.dtype), []).append(param)
            for bucket in buckets.values():
                if not self._update_native(group, bucket):
                    self._update(group, bucket)
        return loss

    def _update_one(self, group: dict, param: torch.Tensor) -> None:
        """The reference path: the algorithm of the module docstring for one parameter block,
        written as plainly as possible (the multi-tensor :meth:`_update` must equal it)."""
        state = self._init_state(param, group)
        state["step"].add_(1.0)
        t = int(state["step"].item())
        grad, local = _local(param.grad), _local(param)
        b2 = group["gradient_square_ema_decay"]
        v = _local(state["exp_avg_sq"])
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)  # the EMA of g^2; of eps_square below
        c2 = 1.0 - b2**t if group["gradient_square_ema_debias"] else 1.0
        v_hat = v / c2 + group["eps_square"]  # (the EMA of the constant eps_square, debiased, is eps_square)
        numerator = grad
        if group["gradient_ema_decay"] is not None:
            b1 = group["gradient_ema_decay"]
            numerator = _local(state["exp_avg"]).lerp_(grad, 1.0 - b1)
            if group["gradient_ema_debias"]:
                numerator = numerator / (1.0 - b1**t)
        update = numerator / (torch.sqrt(v_hat) + group["eps"])
        threshold = group["update_clip_threshold"]
        if threshold is not None:  # rms over the whole parameter (all shards)
            rms = torch.sqrt(block_sum_squares([update], [param])[0] / param.numel())
            update = update / torch.clamp(rms / threshold, min=1.0).to(update.dtype)
        if group["update_ema_decay"] is not None:
            b1 = group["update_ema_decay"]
            update = _local(state["update_ema"]).lerp_(update, 1.0 - b1)
            if group["update_ema_debias"]:
                update = update / (1.0 - b1**t)
        schedule = group["lr"] / group["peak_lr"]
        if group["weight_decay"]:
            local.mul_(1.0 - schedule * group["weight_decay"])
        local.add_(update, alpha=-group["lr"] * group["update_scale"])

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        b2 = group["gradient_square_ema_decay"]
        b1_grad, b1_update = group["gradient_ema_decay"], group["update_ema_decay"]
        states = [self._init_state(p, group) for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1.0)
        counts = [int(t) for t in torch.stack(steps).tolist()]  # one host read, not one per block

        grads = [_local(p.grad) for p in params]
        square_emas = [_local(s["exp_avg_sq"]) for s in states]
        # v <- b2 v + (1 - b2) g^2; the (1 - b2) eps_square term is folded into the denominator
        # below: the bias-corrected EMA of (g^2 + eps_square) is the corrected EMA of g^2 plus
        # eps_square exactly.
        torch._foreach_mul_(square_emas, b2)
        torch._foreach_addcmul_(square_emas, grads, grads, value=1.0 - b2)
        # debiased: sqrt(v / c2 + eps_sq) + eps = (sqrt(v + eps_sq * c2) + eps * sqrt(c2)) / sqrt(c2)
        # with c2 = 1 - b2^t; without debias c2 = 1 and the EMA of the constant eps_sq is
        # eps_sq * (1 - b2^t) too. The sqrt(c2) factor is a per-block scalar, applied with the clip.
        # One temporary list (`updates`), computed in place: 1 / denominator, then times g.
        debias = group["gradient_square_ema_debias"]
        c2 = [1.0 - b2**t if debias else 1.0 for t in counts]
        if group["eps_square"]:
            updates = torch._foreach_add(square_emas, _scalars([group["eps_square"] * (1.0 - b2**t) for t in counts]))
        else:
            updates = torch._foreach_mul(square_emas, 1.0)
        if group["eps"]:
            torch._foreach_sqrt_(updates)
            torch._foreach_add_(updates, _scalars([group["eps"] * math.sqrt(c) for c in c2]))
            torch._foreach_reciprocal_(updates)
        else:
            torch._foreach_rsqrt_(updates)
        block_scales = [math.sqrt(c) for c in c2]

        numerators = grads
        if b1_grad is not None:
            grad_emas = [_local(s["exp_avg"]) for s in states]
            torch._foreach_lerp_(grad_emas, grads, 1.0 - b1_grad)
            numerators = grad_emas
            if group["gradient_ema_debias"]:
                block_scales = [s / (1.0 - b1_grad**t) for s, t in zip(block_scales, counts)]
        torch._foreach_mul_(updates, numerators)  # the raw update, up to block_scales

        dtype = torch.promote_types(updates[0].dtype, torch.float32)
        scales = torch.tensor(block_scales, dtype=dtype, device=updates[0].device)  # (N,)
        threshold = group["update_clip_threshold"]
        if threshold is not None:  # u / max(1, rms(u) / threshold), rms over the whole parameter
            numels = torch.tensor([p.numel() for p in params], dtype=dtype, device=scales.device)
            rms = scales * torch.sqrt(block_sum_squares(updates, params) / numels)
            scales = scales / torch.clamp(rms / threshold, min=1.0)
        torch._foreach_mul_(updates, list(scales.to(updates[0].dtype).unbind()))

        if b1_update is not None:
            update_emas = [_local(s["update_ema"]) for s in states]
            torch._foreach_lerp_(update_emas, updates, 1.0 - b1_update)
            updates = update_emas
            if group["update_ema_debias"]:
                updates = torch._foreach_div(update_emas, _scalars([1.0 - b1_update**t for t in counts]))

        # p <- p - schedule * (lr * scale * m + wd * p), schedule = lr_now / peak_lr
        locals_ = [_local(p) for p in params]
        schedule = group["lr"] / group["peak_lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(locals_, 1.0 - schedule * group["weight_decay"])
        torch._foreach_add_(locals_, updates, alpha=-group["lr"] * group["update_scale"])

    def _update_native(self, group: dict, params: list[torch.Tensor]) -> bool:
        """The step of ``params`` (one device and dtype) by the native kernel
        (:mod:`mmafm.train.native_optim`): the arithmetic of :meth:`_update`, fused into two
        passes (one when there is no RMS clip), in one C call, or in two around the all-reduce of
        the per-block sums where blocks are sharded. Returns False, having changed nothing, where
        the group does not want it or it cannot run here (then :meth:`_update` does the step)."""
        fused = group.get("fused")
        if not (fused or (fused is None and group.get("foreach") is None)):
            return False
        states = [self._init_state(p, group) for p in params]
        b1_grad, b1_update = group["gradient_ema_decay"], group["update_ema_decay"]
        locals_ = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        square_emas = [_local(s["exp_avg_sq"]) for s in states]
        grad_emas = [_local(s["exp_avg"]) for s in states] if b1_grad is not None else None
        update_emas = [_local(s["update_ema"]) for s in states] if b1_update is not None else None
        steps = [state["step"] for state in states]
        tensors = locals_ + grads + square_emas + (grad_emas or []) + (update_emas or []) + steps
        if not native_optim.native_ready(*tensors) or native_optim.adastar_kernels() is None:
            if fused:
                reason = native_optim.adastar_unavailable_reason() or (
                    f"it takes contiguous float32 CPU tensors, got {params[0].dtype} on {params[0].device}")
                raise RuntimeError(f"AdaStar(fused=True) cannot run: {reason}")
            return False
        counts, common = native_optim.count_steps(steps)  # += 1 in place, one call
        b2 = group["gradient_square_ema_decay"]

        def constants(t: int) -> tuple[float, float, float, float | None]:
            """A block's under-root, over-root, scale and update EMA divisor at step t: the same
            folding as _update, u = n / (sqrt(v + eps_sq * (1 - b2^t)) + eps * sqrt(c2)) times
            the block scale sqrt(c2), divided by the gradient EMA's debias (the RMS clip later)."""
            c2 = 1.0 - b2**t if group["gradient_square_ema_debias"] else 1.0
            scale = math.sqrt(c2)
            if b1_grad is not None and group["gradient_ema_debias"]:
                scale = scale / (1.0 - b1_grad**t)
            divisor = 1.0 - b1_update**t if b1_update is not None and group["update_ema_debias"] else None
            return group["eps_square"] * (1.0 - b2**t), group["eps"] * math.sqrt(c2), scale, divisor

        if common is not None:  # the usual case: one count, so one set of constants for every block
            under, over, block_scale, divisor = constants(common)
            under, over, block_scales = [under] * len(params), [over] * len(params), [block_scale] * len(params)
            divisors = None if divisor is None else [divisor] * len(params)
        else:
            under, over, block_scales, divisors = (list(column) for column in zip(*map(constants, counts)))
            divisors = None if divisors[0] is None else divisors
        grad_weight = 0.0 if b1_grad is None else 1.0 - b1_grad
        update_weight = 0.0 if b1_update is None else 1.0 - b1_update
        # p <- p - schedule * (lr * scale * m + wd * p), schedule = lr_now / peak_lr
        schedule = group["lr"] / group["peak_lr"]
        decay = 1.0 - schedule * group["weight_decay"] if group["weight_decay"] else 1.0
        alphas = [-group["lr"] * group["update_scale"]] * len(params)
        threshold = group["update_clip_threshold"]
        if threshold is not None and next(_shard_groups(params), None) is None:  # one call: the blocks are whole
            native_optim.step(locals_, grads, square_emas, grad_emas, update_emas, under, over, block_scales,
                              threshold, divisors, alphas, b2, grad_weight, update_weight, decay)
            return True
        if threshold is not None:  # u / max(1, rms(u) / threshold), rms over the whole parameter
            sums = native_optim.pass1(grads, square_emas, grad_emas, under, over, b2, grad_weight)  # (N,)
            sums = all_reduce_block_sums(sums, params).tolist()
            clips = [s * math.sqrt(total / (p.numel() or 1)) / threshold
                     for s, total, p in zip(block_scales, sums, params)]  # as mmafm_adastar_step_f32 does
            block_scales = [s if clip <= 1.0 else s / clip for s, clip in zip(block_scales, clips)]  # NaN stays NaN
        native_optim.pass2(locals_, grads, square_emas, grad_emas, update_emas, under, over, block_scales, divisors,
                           alphas, b2, grad_weight, update_weight, decay, update_state=threshold is None)
        return True


# ---------------------------------------------------------------------------------- factory
def build_optimizer(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    """The default optimizer factory, picked by ``config.optimizer``.

    - ``"adamw"``: AdamW(lr, betas, eps) with :func:`param_groups`;
    - ``"afm"``: :class:`AdaStar` with its AFM defaults, peak ``config.lr``, decay
      ``config.weight_decay`` on every parameter, update EMA ``config.afm_update_ema`` (0 = off), mu-param from the model's width
      (:func:`afm_param_groups`; base width ``config.mup_base_width`` when the config has it).
    """
    name = getattr(config, "optimizer", "adamw")
    if name == "adamw":
        return torch.optim.AdamW(
            param_groups(model, config.weight_decay),
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
        )
    if name == "afm":
        base_width = getattr(config, "mup_base_width", MUP_BASE_WIDTH)
        groups = afm_param_groups(model, config.weight_decay, base_width=base_width)
        update_ema = getattr(config, "afm_update_ema", 0.95)
        return AdaStar(groups, lr=config.lr, weight_decay=config.weight_decay, update_ema_decay=update_ema or None)
    raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {name!r}")
