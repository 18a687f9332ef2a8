"""Structural pruning of the FFN hidden units with learned Soft-Top-K masks.

The 2024 on-device model starts from a larger model pruned on its FFN hidden units only
(attention and residual width untouched), its masks learned with Soft-Top-K masking (Lei et al.
2023, "Conditional Adapters", CoDA) instead of HardConcrete, while the model trains on the core
pretraining mixture (188B tokens in the report; a token budget here). See
``../shared/WAVE2.md`` "Distillation and pruning" and ``docs/distillation.md``.

**Soft-Top-K.** Given scores ``s`` (n,) and a keep count ``k``, the mask is the solution of the
entropy-regularised top-k problem (CoDA's form, Shannon entropy ``H(l) = -sum l_i log l_i``)::

    l* = argmax_l  s . l + eps * H(l)   subject to  0 <= l_i <= 1,  sum_i l_i = k

Its KKT conditions give ``l_i = min(1, exp((s_i + a) / eps))`` for one threshold ``a`` (the dual
variable of the sum constraint; CoDA approximates it with a few alternating dual iterations).
``sum_i min(1, exp((s_i + a) / eps))`` is continuous and strictly increasing in ``a``, so ``a`` is
unique; we find it exactly rather than iteratively: the units with ``l_i = 1`` are the top-``m``
scores for some ``m < k``, and for a given ``m`` the sum constraint gives
``a_m = eps * (log(k - m) - logsumexp(s_rest / eps))`` in closed form (stable: a log-sum-exp over
the sorted scores' suffixes). The ``m`` whose ``a_m`` is consistent (the ``m``-th score saturates,
the ``m+1``-th does not) is the solution. Gradients are the implicit-function ones: with the
saturated set held fixed, ``a`` above is a differentiable function of the scores, so autograd
through it gives ``dl_i/ds_j = [i, j free] l_i / eps * (delta_ij - l_j / sum_free l)``, zero for
saturated units. As ``eps -> 0`` the mask tends to the hard top-k; as ``eps -> inf`` to ``k/n``
everywhere. The mask sums to ``k`` up to float rounding for every ``eps``.

**Masks on a model.** :func:`attach_ffn_masks` wraps a text model (no model file is edited):
one score per FFN hidden unit of every dense SwiGLU layer, and a forward pre-hook on each
``w_down`` multiplies its input (the hidden activations) by that layer's mask. The temperature
anneals geometrically from ``temperature`` to ``final_temperature`` over ``anneal_steps`` training
forwards (a buffer, so a resumed run continues the schedule). Scores start from a weight-magnitude
importance (standardised per layer), so the first masks already prefer units that matter.

**Materializing.** :func:`materialize` keeps each layer's top-``k`` units (the hard limit of its
mask) and slices ``w_gate`` / ``w_up`` rows and ``w_down`` columns (the kept mask values folded
into ``w_down``) into a plain dense model: the source preset with the override
``ffn_dim=k``, which ``save_model`` / ``load_model``, generation, adapters and export handle
like any other model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from mmafm.layers.swiglu import SwiGLU

__all__ = [
    "soft_top_k",
    "hard_top_k",
    "ffn_importance",
    "FFNMasks",
    "MaskedModel",
    "attach_ffn_masks",
    "masked_ffns",
    "materialize",
]


# ----------------------------------------------------------------------------- soft top-k
def hard_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:  # (..., n) -> (..., n) in {0, 1}
    """The 0/1 mask of the ``k`` largest scores along the last dimension (``torch.topk``)."""
    mask = torch.zeros_like(scores)
    if k:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
    return mask


def _check_k(scores: torch.Tensor, k: int) -> int:
    if scores.ndim < 1:
        raise ValueError("soft_top_k: scores must have at least one dimension, got a scalar")
    n = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"soft_top_k: k must be an integer in [0, {n}] (the last dimension), got {k!r}")
    return n


def soft_top_k(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Soft-Top-K mask (Lei et al. 2023): ``argmax_l s.l + temperature * H(l)``, ``0 <= l <= 1``,
    ``sum(l) = k``, along the last dimension of ``scores`` (see the module docstring).

    Args:
        scores: (..., n) real scores; the problem is solved independently for each row.
        k: units to keep, an integer in ``[0, n]``.
        temperature: the entropy weight ``eps`` (>= 0); 0 gives the hard top-k (no gradient).

    Returns:
        (..., n) mask in [0, 1] summing to ``k`` per row, differentiable in ``scores``.
    """
    n = _check_k(scores, k)
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"soft_top_k: temperature must be a finite number >= 0, got {temperature!r}")
    if temperature == 0:
        return hard_top_k(scores.detach(), k)
    if k in (0, n):  # the only feasible mask: constant, zero gradient
        return torch.full_like(scores, float(k == n))
    z = scores / temperature  # (..., n)
    with torch.no_grad():
        saturated = _saturated_set(z.detach(), k)  # (..., n) bool: the units with mask exactly 1
    free_lse = z.masked_fill(saturated, float("-inf")).logsumexp(dim=-1, keepdim=True)  # (..., 1)
    count = saturated.sum(dim=-1, keepdim=True).to(z.dtype)
    alpha = torch.log(k - count) - free_lse  # threshold a / eps, differentiable through free_lse
    free = torch.exp((z + alpha).clamp(max=0.0))  # (..., n); <= 1 on the free set by construction
    return torch.where(saturated, torch.ones_like(free), free)


def _saturated_set(z: torch.Tensor, k: int) -> torch.Tensor:  # (..., n) -> (..., n) bool
    """Which units the exact solution saturates at 1 (the top-``m`` scores, ``0 <= m < k``)."""
    n = z.shape[-1]
    sorted_z, order = z.sort(dim=-1, descending=True)  # (..., n)
    # suffix[m] = logsumexp(sorted_z[m:]), the free set's log-mass when the top m saturate
    suffix = sorted_z.flip(-1).logcumsumexp(dim=-1).flip(-1)  # (..., n)
    m = torch.arange(k, device=z.device)  # candidate saturated counts
    alpha = torch.log((k - m).to(z.dtype)) - suffix[..., :k]  # (..., k)
    last_saturated = torch.cat([torch.full_like(sorted_z[..., :1], float("inf")), sorted_z[..., : k - 1]], dim=-1)
    first_free = sorted_z[..., :k]
    # consistency: the m-th largest saturates (z + alpha >= 0), the (m+1)-th does not (<= 0);
    # exactly one m satisfies both in exact arithmetic, the least violating one wins in floats
    violation = (-(last_saturated + alpha)).clamp(min=0) + (first_free + alpha).clamp(min=0)
    best = violation.argmin(dim=-1, keepdim=True)  # (..., 1)
    ranks = torch.arange(n, device=z.device).expand_as(z)
    sorted_saturated = ranks < best  # (..., n) in sorted order
    return torch.zeros_like(sorted_saturated).scatter(-1, order, sorted_saturated)


# ----------------------------------------------------------------------------- masks on a model
def masked_ffns(model: nn.Module) -> dict[str, SwiGLU]:
    """``{module name: SwiGLU}`` of every dense FFN of ``model`` (MoE experts are not pruned)."""
    ffns = {name: module for name, module in model.named_modules() if isinstance(module, SwiGLU)}
    if not ffns:
        raise ValueError(f"{type(model).__name__} has no SwiGLU feed-forward layer to prune")
    return ffns


@torch.no_grad()
def ffn_importance(ffn: SwiGLU) -> torch.Tensor:  # (hidden,)
    """A weight-magnitude importance per hidden unit: ``log(|gate_i| |up_i| |down_:,i|)``,
    standardised to mean 0 and std 1 (the initial mask scores; [open], Minitron-like)."""
    norms = (ffn.w_gate.weight.float().norm(dim=1) * ffn.w_up.weight.float().norm(dim=1)
             * ffn.w_down.weight.float().norm(dim=0))
    score = norms.clamp(min=1e-30).log()
    return (score - score.mean()) / score.std().clamp(min=1e-12)


class FFNMasks(nn.Module):
    """One learnable score vector per FFN layer and the Soft-Top-K masks they give.

    Args:
        ffns: ``{name: SwiGLU}`` (:func:`masked_ffns`), all of one hidden width.
        keep: hidden units kept per layer (``k``).
        temperature: the starting entropy weight ``eps`` (scores are standardised, so ~1 is soft).
        final_temperature: the weight reached after ``anneal_steps`` training forwards.
        anneal_steps: forwards over which ``eps`` decays geometrically; 0 = constant ``temperature``.
        init: "magnitude" (:func:`ffn_importance`) or "zeros" (every unit equal at the start).
    """

    def __init__(self, ffns: dict[str, SwiGLU], keep: int, temperature: float = 1.0,
                 final_temperature: float = 0.01, anneal_steps: int = 0, init: str = "magnitude"):
        super().__init__()
        widths = {ffn.w_gate.weight.shape[0] for ffn in ffns.values()}
        if len(widths) != 1:
            raise ValueError(f"FFN layers have different hidden widths {sorted(widths)}; one keep count needs one width")
        width = widths.pop()
        if not 1 <= keep <= width:
            raise ValueError(f"keep must be in [1, {width}] (the FFN hidden width), got {keep}")
        if temperature <= 0 or final_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature} and {final_temperature}")
        if init not in ("magnitude", "zeros"):
            raise ValueError(f"init must be 'magnitude' or 'zeros', got {init!r}")
        self.names = list(ffns)
        self.keep, self.width = keep, width
        self.temperature, self.final_temperature, self.anneal_steps = temperature, final_temperature, anneal_steps
        first = next(iter(ffns.values())).w_gate.weight
        self.scores = nn.ParameterList(
            nn.Parameter(ffn_importance(ffn).to(first.device) if init == "magnitude"
                         else torch.zeros(width, device=first.device))
            for ffn in ffns.values()
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=first.device))
        self.hard = False  # True: every mask is its hard top-k (what materialize keeps)

    def current_temperature(self) -> float:
        """``eps`` now: geometric from ``temperature`` to ``final_temperature`` over ``anneal_steps``."""
        if self.anneal_steps <= 0:
            return self.temperature
        progress = min(1.0, int(self.steps) / self.anneal_steps)
        return self.temperature * (self.final_temperature / self.temperature) ** progress

    def mask(self, index: int) -> torch.Tensor:  # (hidden,)
        """Layer ``index``'s mask at the current temperature (hard when :attr:`hard`)."""
        scores = self.scores[index]
        if self.hard:
            return hard_top_k(scores.detach(), self.keep)
        return soft_top_k(scores, self.keep, self.current_temperature())

    @torch.no_grad()
    def masks(self) -> torch.Tensor:  # (layers, hidden)
        """Every layer's current mask (no gradient)."""
        return torch.stack([self.mask(index) for index in range(len(self.scores))])

    @torch.no_grad()
    def kept(self) -> torch.Tensor:  # (layers, keep) sorted unit indices
        """The units each layer keeps when materialized (its top-``keep`` scores)."""
        return torch.stack([s.topk(self.keep).indices.sort().values for s in self.scores])

    def extra_repr(self) -> str:
        return f"layers={len(self.scores)}, width={self.width}, keep={self.keep}, temperature={self.temperature}->{self.final_temperature}"


class MaskedModel(nn.Module):
    """A text model whose FFN hidden units are multiplied by :class:`FFNMasks` masks.

    ``self.model`` is the original model, unchanged but for forward pre-hooks on each masked
    ``w_down``; ``self.masks`` the scores. Calls, ``loss``, ``logits``, ``output_weight``,
    ``config`` and ``no_weight_decay`` pass through to the model, so a stage's task and the trainer use it as the model itself.
    """

    def __init__(self, model: nn.Module, masks: FFNMasks, ffns: dict[str, SwiGLU]):
        super().__init__()
        self.model, self.masks = model, masks
        self._hooks = [ffn.w_down.register_forward_pre_hook(self._hook(index)) for index, ffn in enumerate(ffns.values())]

    def _hook(self, index: int):
        def apply_mask(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]  # (..., hidden)
            return (hidden * self.masks.mask(index).to(hidden.dtype),) + tuple(args[1:])

        return apply_mask

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.masks.steps += 1  # the annealing clock: training forwards
        return self.model(*args, **kwargs)

    def loss(self, *args: Any, **kwargs: Any):
        return self.model.loss(*args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def output_weight(self) -> torch.Tensor:
        return self.model.output_weight()

    def no_weight_decay(self) -> set[str]:
        own = {f"model.{name}" for name in getattr(self.model, "no_weight_decay", set)()}
        return own | {name for name, param in self.named_parameters() if name.startswith("masks.")}

    def remove(self) -> nn.Module:
        """Detach the hooks; returns the plain model (its weights as trained, unmasked)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return self.model


def attach_ffn_masks(model: nn.Module, keep: int, temperature: float = 1.0, final_temperature: float = 0.01,
                     anneal_steps: int = 0, init: str = "magnitude") -> MaskedModel:
    """Wrap ``model`` with learnable Soft-Top-K masks over every dense FFN's hidden units.

    Args: see :class:`FFNMasks`. Returns the :class:`MaskedModel` to train.
    """
    ffns = masked_ffns(model)
    masks = FFNMasks(ffns, keep, temperature, final_temperature, anneal_steps, init)
    return MaskedModel(model, masks, ffns)


# ----------------------------------------------------------------------------- materialize
@torch.no_grad()
def materialize(masked: MaskedModel, fold_mask: bool = True) -> nn.Module:
    """The dense smaller model: each layer's top-``keep`` units sliced out of gate/up/down.

    Args:
        masked: a :class:`MaskedModel` (after mask learning).
        fold_mask: multiply the kept ``w_down`` columns by their mask values at the current
            temperature (exactly 1 for hard masks), so the result computes what the masked model
            computes minus the dropped units' (near-zero) contributions.

    Returns:
        A model of the same family built from the source preset with ``ffn_dim=keep`` (and, for an
        MoE model, ``moe_ffn_dim`` pinned to the experts' width), in eval mode.
    """
    from mmafm.config import to_dict
    from mmafm.registry import ModelSpec, build_from_config, create_model, family_of

    source, masks = masked.model, masked.masks
    config = source.config
    overrides: dict[str, Any] = {"ffn_dim": masks.keep}
    if getattr(config, "num_experts", 0) and config.moe_ffn_dim is None:
        overrides["moe_ffn_dim"] = config.ffn_dim  # the experts keep their width
    spec = getattr(source, "model_spec", None)
    weight = next(source.parameters())
    with torch.device(weight.device):
        if isinstance(spec, ModelSpec) and spec.preset:
            current = {key: getattr(config, key) for key in spec.overrides}  # as the config holds them now
            pruned = create_model(spec.preset, **{**current, **overrides})
        else:
            family = family_of(source)
            pruned = build_from_config(family, to_dict(dataclasses.replace(config, **overrides)))
            pruned.model_spec = ModelSpec(family, None, {})
    pruned = pruned.to(weight.dtype)
    state = {name: tensor for name, tensor in source.state_dict().items()}
    kept = masks.kept()  # (layers, keep)
    values = masks.masks() if fold_mask else None
    for index, name in enumerate(masks.names):
        units = kept[index]
        prefix = f"{name}." if name else ""
        state[prefix + "w_gate.weight"] = state[prefix + "w_gate.weight"][units]
        state[prefix + "w_up.weight"] = state[prefix + "w_up.weight"][units]
        down = state[prefix + "w_down.weight"][:, units]
        if values is not None:
            down = down * values[index, units].to(down.dtype)
        state[prefix + "w_down.weight"] = down
    pruned.load_state_dict(state)
    return pruned.eval()
