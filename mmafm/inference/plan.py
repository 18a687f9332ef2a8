"""The decode plan: which kernel computes each layer of a decode step, decided from the modules.

A plan is built from a plain model once per ``generate`` call, after the prefill, for the cache
that call decodes into (:func:`build_plan`). It looks at the modules as they are then, with exact
type checks, and decides per layer and half-layer:

- the **attention half** of a layer runs in :func:`~mmafm.inference.kernels.attention_block`
  when the layer is exactly a :class:`~mmafm.models.text.Block` whose ``attn`` is exactly an
  :class:`~mmafm.models.text.Attention` with bias-free ``nn.Linear`` projections and
  :class:`~mmafm.layers.norm.RMSNorm` norms, none of them hooked;
- the **FFN half** runs in :func:`~mmafm.inference.kernels.swiglu_block` when ``ffn`` is exactly
  a :class:`~mmafm.layers.swiglu.SwiGLU` of such linears after such a norm;
- **the whole step** (embedding to logits) is one :class:`~mmafm.inference.kernels.DecodeStep`
  call only when every layer qualifies and so do the embedding, final norm and head.

A :class:`~mmafm.layers.lora.LoRALinear` counts as a linear when one adapter (or none) runs on
every row: the kernels then read its merged weight ``W + s B A`` (made once and cached by the
module, :meth:`~mmafm.layers.lora.LoRALinear.decode_weight`), so a LoRA'd model decodes as fast
as its base. With per-row adapters (a mixed batch) the whole step still runs in one kernel call
when everything else qualifies: it reads the base weights and every slot's factors, and adds each
row's adapter inside the call (``csrc/lora.c``, the rows' slots read from the routing at each
step); per-layer kernels do not take a mixed batch, so otherwise it takes the module path. Anything else the
plan does not recognise (a hook, a quantized linear, an ``nn.Linear`` subclass, another norm, an
MoE FFN, another trunk such as PT-MoE's tracks) makes that half, that layer or that model take
the module path: its modules are called as they are. A packed linear of :mod:`mmafm.compress`
(a module with ``packed_linear``) is recognised as such: its half takes the module path, where
the module multiplies from its packed codes in the LUT GEMV (``csrc/lut.c``), and a tied head
over a packed embedding is computed by the same GEMV from the packed table. So a new kind of
layer needs no edit here or in ``models/`` to be decoded correctly; teaching the plan to run it
in a kernel is an addition here. Like a compiled graph, a plan assumes the modules and
parameters stay the same objects while it is used (one ``generate`` call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from mmafm.inference import kernels
from mmafm.layers.kv_cache import KVCache
from mmafm.layers.lora import AdapterRouting, LoRALinear
from mmafm.layers.norm import RMSNorm
from mmafm.layers.rope import rope_table
from mmafm.layers.swiglu import SwiGLU
from mmafm.models.text import (
    Attention,
    AttentionContext,
    Block,
    DecoderLM,
    TextModel,
    kv_source_layer,
    run_blocks,
)

__all__ = ["KERNEL", "MODULE", "LayerPlan", "DecodePlan", "build_plan", "module_logits"]

KERNEL, MODULE = "kernel", "module"


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer runs in a decode step."""

    index: int
    attention: str  # KERNEL or MODULE
    ffn: str  # KERNEL or MODULE
    why: str = ""  # why a half takes the module path ("" when both run in kernels)


# ----------------------------------------------------------------------------- recognising modules


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _mixed_lora(module: nn.Module) -> bool:
    """Is ``module`` a :class:`LoRALinear` routed per row (a mixed batch) at inference?"""
    return type(module) is LoRALinear and module.routing.mode == "mixed" and not (
        module.training and module.routing.dropout > 0.0)


def _linear_why(module: nn.Module | None, name: str, mixed: bool = False) -> str:
    """"" when ``module`` is exactly a bias-free, hook-free ``nn.Linear`` (so ``x @ weight.T``
    is all it does) or a :class:`LoRALinear` that one dense weight computes (``mixed``: or one
    routed per row, which the whole step's LoRA kernel computes from its base and factors), else
    why not."""
    if type(module) is LoRALinear:
        if module.decode_why() and not (mixed and _mixed_lora(module)):
            return f"{name}: {module.decode_why()}"
    elif callable(getattr(module, "packed_linear", None)):  # mmafm.compress: packed codes + tables
        return f"{name} is packed ({type(module).__name__}): the module path runs its LUT GEMV"
    elif type(module) is not nn.Linear:
        return f"{name} is {type(module).__name__}, not nn.Linear"
    if module.bias is not None:
        return f"{name} has a bias"
    return f"{name} has hooks" if _hooked(module) else ""


def _weight(linear: nn.Module) -> torch.Tensor:  # (out, in)
    """The matrix a kernel multiplies by for a linear :func:`_linear_why` accepted (the base
    weight of a LoRA linear routed per row: its adapters are added by the step)."""
    if type(linear) is LoRALinear and not _mixed_lora(linear):
        return linear.decode_weight()
    return linear.weight


def _packed_head(model: nn.Module) -> Callable | None:
    """The packed GEMV of a tied head whose embedding is stored packed (a module with
    ``packed_linear``, e.g. :class:`mmafm.compress.packed.PackedEmbedding`): the head then reads
    the packed codes and tables (``csrc/lut.c``) instead of dequantizing the table each step."""
    config, embed = getattr(model, "config", None), getattr(model, "embed", None)
    if getattr(config, "tie_embeddings", False) and callable(getattr(embed, "packed_linear", None)) \
            and not _hooked(embed):
        return embed.packed_linear
    return None


def _norm_why(module: nn.Module | None, name: str) -> str:
    """"" when ``module`` is exactly a hook-free :class:`RMSNorm`, else why not."""
    if type(module) is not RMSNorm:
        return f"{name} is {type(module).__name__}, not RMSNorm"
    return f"{name} has hooks" if _hooked(module) else ""


def _first(*reasons: str) -> str:
    return next((reason for reason in reasons if reason), "")


def _block_why(block: nn.Module) -> str:
    if type(block) is not Block:
        return f"the layer is {type(block).__name__}, not Block"
    if _hooked(block):
        return "the layer has hooks"
    if block.training and block.dropout.p > 0:
        return "dropout is active"
    return ""


def _attention_why(block: Block, mixed: bool = False) -> str:
    """"" when the kernel may compute ``block``'s attention half from its weights (``mixed``:
    and per-row LoRA adapters, :func:`_linear_why`)."""
    attn = block.attn
    if type(attn) is not Attention:
        return f"attn is {type(attn).__name__}, not Attention"
    if _hooked(attn):
        return "attn has hooks"
    projections = ("q_proj", "k_proj", "v_proj", "o_proj") if attn.owns_kv else ("q_proj", "o_proj")
    return _first(
        _norm_why(block.attn_norm, "attn_norm"),
        *(_norm_why(getattr(attn, name), f"attn.{name}") for name in ("q_norm", "k_norm")
          if getattr(attn, name) is not None),
        *(_linear_why(getattr(attn, name), f"attn.{name}", mixed) for name in projections),
    )


def _ffn_why(block: Block, mixed: bool = False) -> str:
    """"" when the kernel may compute ``block``'s FFN half from its weights (``mixed`` as
    :func:`_attention_why`)."""
    ffn = block.ffn
    if type(ffn) is not SwiGLU:
        return f"ffn is {type(ffn).__name__}, not SwiGLU"
    if _hooked(ffn):
        return "ffn has hooks"
    return _first(
        _norm_why(block.ffn_norm, "ffn_norm"),
        *(_linear_why(getattr(ffn, name), f"ffn.{name}", mixed) for name in ("w_gate", "w_up", "w_down")),
    )


def _cache_why(block: Block, cache: KVCache) -> str:
    """What of the cache layout keeps ``block``'s attention half out of a kernel (any dtype)."""
    attn = block.attn
    if attn.window is None:
        return ""
    if not attn.owns_kv:
        return "a window over a shared source's keys needs the module path's mask"
    return "padded ring buffer: the module path masks by column" if cache.has_padding else ""


def _model_why(model: nn.Module, cache: KVCache) -> str:
    """What keeps every layer of ``model`` out of the kernels for this call ("" = nothing)."""
    if type(model) is not TextModel:
        return f"the model is {type(model).__name__}: only TextModel's trunk is planned layer by layer"
    if _hooked(model) or _global_forward_hooks or _global_forward_pre_hooks:
        return "forward hooks on the model (or global ones)"
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return "autograd or torch.compile: the kernels do not record or trace"
    if not kernels.kernels_available():
        return f"no native kernels ({kernels.kernels_unavailable_reason()})"
    if cache.quantized:
        return "int8 KV cache"
    if cache.device.type != "cpu":
        return f"the cache is on {cache.device}"
    if cache.batch_size > kernels.MAX_ROWS:
        return f"{cache.batch_size} rows > {kernels.MAX_ROWS}: torch's GEMMs beat a GEMV per row"
    return ""


def _step_why(model: TextModel, cache: KVCache) -> str:
    """What keeps the embedding, final norm and head (and the cache) out of a whole-step kernel."""
    head = "" if model.config.tie_embeddings else _linear_why(model.lm_head, "lm_head")
    embed = model.embed
    if type(embed) is not nn.Embedding or _hooked(embed) or embed.max_norm is not None:
        return "embed is not a plain hook-free nn.Embedding"
    if cache.dtype != embed.weight.dtype or cache.dtype not in (torch.float32, torch.bfloat16):
        return f"a {cache.dtype} cache for {embed.weight.dtype} weights (the step takes float32 or bfloat16, both alike)"
    if cache.max_len > model.config.max_seq_len:
        return f"cache of {cache.max_len} columns > max_seq_len={model.config.max_seq_len} (RoPE table)"
    return _first(head, _norm_why(model.norm, "norm"))


def _attention_weights(block: Block) -> list[torch.Tensor]:
    attn = block.attn
    norms = [norm.weight for norm in (block.attn_norm, attn.q_norm, attn.k_norm) if norm is not None]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj") if attn.owns_kv else ("q_proj", "o_proj")
    return norms + [_weight(getattr(attn, name)) for name in projections]


def _ffn_weights(block: Block) -> list[torch.Tensor]:
    ffn = block.ffn
    return [block.ffn_norm.weight, _weight(ffn.w_gate), _weight(ffn.w_up), _weight(ffn.w_down)]


def _float32_why(weights: list[torch.Tensor], cache: KVCache) -> str:
    """The per-layer kernels read float32 weights and cache only."""
    if cache.dtype != torch.float32 or not kernels.kernel_ready(torch.float32, *weights):
        return "per-layer kernels take float32 CPU weights and cache (bfloat16 runs as a whole step only)"
    return ""


# ----------------------------------------------------------------------------- running a step


def module_logits(model: nn.Module, ids: torch.Tensor | None, cache: KVCache, attention_mask: torch.Tensor | None,
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:  # (B, V) float32
    """Logits of the last position of one forward call with ``cache``: the module path. For a
    :class:`DecoderLM` the head runs on one hidden state per row, not all T."""
    if isinstance(model, DecoderLM):
        hidden = model(ids, inputs_embeds=inputs_embeds, cache=cache, attention_mask=attention_mask,
                       return_hidden=True)  # (B, T, dim)
        packed_head = _packed_head(model)
        return model.logits(hidden[:, -1]) if packed_head is None else packed_head(hidden[:, -1]).float()
    if inputs_embeds is not None:
        return model(inputs_embeds=inputs_embeds, cache=cache, attention_mask=attention_mask)[:, -1]
    return model(ids, cache=cache, attention_mask=attention_mask)[:, -1]


class _KernelLayer:
    """One :class:`Block` of a layered step, called like the block (``(h, ctx, shared_kv) ->
    (h, kv, aux)``), with its attention and/or FFN half in a kernel. A kernel that declines at
    run time (a shape it does not take) leaves that half to the modules, having written nothing."""

    def __init__(self, block: Block, attention: bool, ffn: bool, step: _LayeredStep):
        self.block, self.attention, self.ffn, self.step = block, attention, ffn, step
        # the matrices the kernels read (a LoRA linear's merged weight), fetched once per plan
        projections = ("q_proj", "k_proj", "v_proj", "o_proj") if block.attn.owns_kv else ("q_proj", "o_proj")
        self.attn_weights = {name: _weight(getattr(block.attn, name)) for name in projections} if attention else {}
        self.ffn_weights = [_weight(getattr(block.ffn, name)) for name in ("w_gate", "w_up", "w_down")] if ffn else []

    def __call__(self, h: torch.Tensor, ctx: AttentionContext, shared_kv: tuple | None):
        block = self.block
        fused = self._attention(h, ctx, shared_kv) if self.attention else None
        if fused is None:
            attn_out, kv = block.attn(block.attn_norm(h), ctx, shared_kv)
            y = h + attn_out  # (B, 1, dim), a new tensor: the FFN kernel may update it in place
        else:
            y, kv = fused
        ffn = block.ffn
        if self.ffn and kernels.swiglu_block(y, block.ffn_norm.weight, block.ffn_norm.eps, *self.ffn_weights):
            return y, kv, None
        if block.is_moe:
            ffn_out, aux = ffn(block.ffn_norm(y))
            return y + ffn_out, kv, aux
        return y + ffn(block.ffn_norm(y)), kv, None

    def _attention(self, h: torch.Tensor, ctx: AttentionContext, shared_kv: tuple | None):
        """``(h + attention half, (keys, values, key_time))`` from the kernel, the new K/V written
        where :meth:`KVCache.update` would put them, or None (nothing written)."""
        attn, norm = self.block.attn, self.block.attn_norm
        cache = ctx.cache
        if attn.owns_kv:
            store = cache.layers[attn.cache_index]
            keys, values = store.keys, store.values  # (B, Hkv, slots, D) storage
            slot, num_keys, key_time = self.step.target(attn.cache_index, keys.shape[2])
            wk, wv = self.attn_weights["k_proj"], self.attn_weights["v_proj"]
        else:
            keys, values, key_time = shared_kv
            slot, num_keys, wk, wv = 0, keys.shape[2], None, None
        rope = (ctx.cos, ctx.sin) if attn.use_rope else (None, None)
        y = kernels.attention_block(
            h, norm.weight, norm.eps, self.attn_weights["q_proj"], wk, wv, self.attn_weights["o_proj"],
            None if attn.q_norm is None else attn.q_norm.weight, None if attn.k_norm is None else attn.k_norm.weight,
            *rope, keys, values, slot, num_keys, ctx.key_valid,
        )
        if y is None:
            return None
        if attn.owns_kv and attn.window is None:
            keys, values = keys.narrow(2, 0, num_keys), values.narrow(2, 0, num_keys)  # what update returns
        return y, (keys, values, key_time)


class _LayeredStep:
    """A decode step of a :class:`TextModel` layer by layer: the model's own embedding, context,
    :func:`run_blocks` and final norm, each layer a :class:`_KernelLayer` or the block itself."""

    def __init__(self, model: TextModel, cache: KVCache, layers: tuple[LayerPlan, ...]):
        self.model, self.cache = model, cache
        self.runners: list[tuple[int, Callable]] = []
        for plan, block in zip(layers, model.layers):
            kernel_halves = (plan.attention == KERNEL, plan.ffn == KERNEL)
            runner = _KernelLayer(block, *kernel_halves, self) if any(kernel_halves) else block
            self.runners.append((plan.index, runner))
        self.packed_head = _packed_head(model)
        head_plain = self.packed_head is None and (model.config.tie_embeddings or not _linear_why(model.lm_head, "lm_head"))
        self.head = (model.output_weight() if model.config.tie_embeddings else _weight(model.lm_head)) \
            if head_plain else None
        self._key_time: dict = {}

    def target(self, cache_index: int, slots: int) -> tuple[int, int, torch.Tensor]:
        """``(write_slot, num_keys, key_time)`` of the one new column in layer ``cache_index``,
        from the cache's public state during the open step: a linear buffer writes slot
        ``column`` and attends over ``[0, column]``; a ring writes slot ``column % slots``. The
        key columns are what :meth:`KVCache.update` would return (shared by the layers alike)."""
        cache = self.cache
        column, window = cache.length, cache.specs[cache_index].window
        if window not in self._key_time:
            if window is None:
                key_time = torch.arange(column + 1, device=cache.device)
            else:  # ring slot t % slots holds column t; -1 = empty
                key_time = cache.slot_time[window].clone()
                key_time[column % slots] = column
            self._key_time[window] = key_time
        if window is None:
            return column, column + 1, self._key_time[window]
        return column % slots, min(column + 1, slots), self._key_time[window]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, V) float32
        model, cache = self.model, self.cache
        h = model.embed_tokens(tokens[:, None])  # (B, 1, dim)
        ctx = model.attention_context(h, cache)  # opens the cache's step
        self._key_time.clear()
        try:
            h = run_blocks(self.runners, h, ctx, model.config, {}, [])
        except BaseException:
            cache.abort()
            raise
        cache.end()
        hidden = model.norm(h)[:, -1]  # (B, dim)
        if self.packed_head is not None:
            return self.packed_head(hidden).float()
        return model.logits(hidden) if self.head is None else kernels.linear(hidden, self.head).float()


class _WholeStep:
    """A decode step in one :class:`~mmafm.inference.kernels.DecodeStep` call; the cache's
    bookkeeping (columns, positions, ring slots) stays in :meth:`KVCache.begin` / ``end``."""

    def __init__(self, step: kernels.DecodeStep, cache: KVCache, routing: AdapterRouting | None = None):
        self.step, self.cache, self.routing = step, cache, routing

    def _adapter_rows(self) -> torch.Tensor | None:  # (B,) int64 slots, or None without adapters
        """Each row's adapter slot now (a mixed batch's routing), for a step built with LoRA."""
        if self.routing is None:
            return None
        if self.routing.mode != "mixed" or self.routing.row_ids is None:
            raise RuntimeError("the LoRA routing left its mixed batch during a decode call planned for it "
                               f"(mode is now {self.routing.mode!r}); build a new plan")
        return self.routing.row_ids

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, V) float32
        cache = self.cache
        column = cache.length
        rows = self._adapter_rows()
        positions = cache.begin(1)  # (B, 1)
        try:
            logits = self.step(tokens, positions.view(-1), column, cache.key_valid() if cache.has_padding else None,
                               **({} if rows is None else {"adapter_rows": rows}))
        except BaseException:
            cache.abort()
            raise
        cache.end()
        return logits

    def chunk(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """T new tokens per row (B, T) in one kernel call (:meth:`DecodeStep.chunk`) -> (B, T, V)
        float32, the cache's bookkeeping as for a T-column forward (0 in ``attention_mask`` =
        padding)."""
        cache = self.cache
        column = cache.length
        rows = self._adapter_rows()
        positions = cache.begin(tokens.shape[1], attention_mask)  # (B, T)
        try:
            logits = self.step.chunk(tokens, positions, column, cache.key_valid() if cache.has_padding else None,
                                     **({} if rows is None else {"adapter_rows": rows}))
        except BaseException:
            cache.abort()
            raise
        cache.end()
        return logits


def _lora_factors(block: Block) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The per-row LoRA adapters of ``block``'s projections, by their names in the step
    (:data:`~mmafm.inference.kernels.LORA_PROJECTIONS`): ``(A (S, r, in), B (S, out, r), scale (S,))``."""
    attn, ffn = block.attn, block.ffn
    modules = {"wq": attn.q_proj, "wo": attn.o_proj, "w_gate": ffn.w_gate, "w_up": ffn.w_up, "w_down": ffn.w_down}
    if attn.owns_kv:
        modules.update(wk=attn.k_proj, wv=attn.v_proj)
    return {name: (m.lora_A, m.lora_B, m.scaling) for name, m in modules.items() if _mixed_lora(m)}


def _lora_layers(model: TextModel) -> tuple[list, int] | None:
    """``(one kernels.lora_layer per layer, slots)`` for a model routed per row, or None where
    the kernel cannot take its adapters (slot counts that differ between modules, a rank > 256)."""
    factors = [_lora_factors(block) for block in model.layers]
    slots = {a.shape[0] for layer in factors for a, _, _ in layer.values()}
    if len(slots) != 1:
        return None
    layers = []
    for block, layer in zip(model.layers, factors):
        attn, ffn = block.attn, block.ffn
        shapes = {name: tuple(m.weight.shape) for name, m in (
            ("wq", attn.q_proj), ("wk", getattr(attn, "k_proj", None)), ("wv", getattr(attn, "v_proj", None)),
            ("wo", attn.o_proj), ("w_gate", ffn.w_gate), ("w_up", ffn.w_up), ("w_down", ffn.w_down)) if m is not None}
        made = kernels.lora_layer(layer, shapes, next(iter(slots)))
        if made is None:
            return None
        layers.append(made)
    return layers, next(iter(slots))


def _whole_step(model: TextModel, cache: KVCache, mixed: bool = False) -> kernels.DecodeStep | None:
    """The kernel step over every layer of ``model`` (all of them already recognised), or None
    where the tensors do not fit it. ``mixed``: with the model's per-row LoRA adapters."""
    config = model.config
    lora, slots = None, 0
    if mixed:
        made = _lora_layers(model)
        if made is None:
            return None
        lora, slots = made
    layers = []
    for index, block in enumerate(model.layers):
        attn, ffn = block.attn, block.ffn
        source = model.layers[kv_source_layer(config, index)]
        store = cache.layers[source.attn.cache_index]
        layer = kernels.decode_layer(
            block.attn_norm.weight, _weight(attn.q_proj),
            _weight(attn.k_proj) if attn.owns_kv else None, _weight(attn.v_proj) if attn.owns_kv else None,
            _weight(attn.o_proj), None if attn.q_norm is None else attn.q_norm.weight,
            None if attn.k_norm is None else attn.k_norm.weight, block.ffn_norm.weight,
            _weight(ffn.w_gate), _weight(ffn.w_up), _weight(ffn.w_down), store.keys, store.values,
            ring=source.attn.window is not None, rope=attn.use_rope, heads=config.n_heads,
        )
        if layer is None:
            return None
        layers.append(layer)
    # the table the model's forward looks positions up in (bit-identical to rope_cos_sin)
    cos_table, sin_table = rope_table(config.max_seq_len, config.head_dim, config.rope_theta, cache.device)
    head = model.output_weight() if config.tie_embeddings else _weight(model.lm_head)
    return kernels.decode_step(layers, model.embed.weight, model.norm.weight, head, cos_table,
                         sin_table, config.n_heads, config.n_kv_heads, config.head_dim, model.norm.eps,
                         lora, slots)


def _matrix_operand(module: nn.Module) -> torch.Tensor | tuple | None:
    """What the packed step reads for a linear (or an embedding): the LUT operands of a hook-free
    packed module of :mod:`mmafm.compress` (``lut_operands``), the float32 weight of a plain one,
    or None."""
    operands = getattr(module, "lut_operands", None)
    if callable(operands):
        return None if _hooked(module) else operands()
    if type(module) is nn.Embedding:
        return module.weight if not _hooked(module) and module.max_norm is None else None
    return None if _linear_why(module, "") else _weight(module)


def _packed_step(model: TextModel, cache: KVCache) -> kernels.PackedDecodeStep | None:
    """The whole step over packed weights (``csrc/lut.c``) for a model with packed matrices whose
    layers are otherwise what the float step takes (its modules recognised as in
    :func:`build_plan`, packed linears with groups along rows, a float32 cache); None otherwise.
    Packed modules set to ``act_dtype="int8"`` (:func:`mmafm.compress.set_act_dtype`, all or none)
    make it the int8-activation step (``csrc/q8.c``)."""
    packed = [m for m in model.modules() if callable(getattr(m, "lut_operands", None))]
    if not packed:
        return None
    act_dtypes = {getattr(m, "act_dtype", "float32") for m in packed}
    if len(act_dtypes) > 1:
        raise ValueError(f"packed modules with different act_dtype {sorted(act_dtypes)}: the packed decode step "
                         "takes one for all (mmafm.compress.set_act_dtype)")
    int8 = act_dtypes == {"int8"}
    config = model.config
    if cache.dtype != torch.float32 or cache.max_len > config.max_seq_len or _norm_why(model.norm, "norm"):
        return None
    layers = []
    for index, block in enumerate(model.layers):
        attn, ffn = block.attn, block.ffn
        if (_block_why(block) or _cache_why(block, cache) or type(attn) is not Attention or type(ffn) is not SwiGLU
                or _hooked(attn) or _hooked(ffn)
                or any(_norm_why(norm, "") for norm in (block.attn_norm, block.ffn_norm, attn.q_norm, attn.k_norm)
                       if norm is not None)):
            return None
        names = ("q_proj", "k_proj", "v_proj", "o_proj") if attn.owns_kv else ("q_proj", "o_proj")
        operands = {name: _matrix_operand(getattr(attn, name)) for name in names}
        operands.update({name: _matrix_operand(getattr(ffn, name)) for name in ("w_gate", "w_up", "w_down")})
        if any(operand is None for operand in operands.values()):
            return None
        source = model.layers[kv_source_layer(config, index)]
        store = cache.layers[source.attn.cache_index]
        layer = kernels.packed_decode_layer(
            block.attn_norm.weight, operands["q_proj"], operands.get("k_proj"), operands.get("v_proj"),
            operands["o_proj"], None if attn.q_norm is None else attn.q_norm.weight,
            None if attn.k_norm is None else attn.k_norm.weight, block.ffn_norm.weight, operands["w_gate"],
            operands["w_up"], operands["w_down"], store.keys, store.values, ring=source.attn.window is not None,
            rope=attn.use_rope, heads=config.n_heads, dim=config.dim, hidden=ffn.w_gate.out_features,
            int8_activations=int8,
        )
        if layer is None:
            return None
        layers.append(layer)
    embed = _matrix_operand(model.embed)
    head = embed if config.tie_embeddings else _matrix_operand(model.lm_head)
    if embed is None or head is None:
        return None
    cos_table, sin_table = rope_table(config.max_seq_len, config.head_dim, config.rope_theta, cache.device)
    return kernels.packed_decode_step(layers, embed, model.norm.weight, head, cos_table, sin_table, config.n_heads,
                                      config.n_kv_heads, config.head_dim, model.norm.eps, config.vocab_size,
                                      config.dim, int8_activations=int8)


class DecodePlan:
    """How one ``generate`` call decodes: per layer, kernel or module path; or the whole step in
    one kernel call. Built by :func:`build_plan`; :meth:`step` runs one decode step.

    Attributes:
        layers: one :class:`LayerPlan` per decoder layer (empty for models not planned layer by
            layer, which run as modules).
        whole_step: True when every step is one kernel call.
        packed: True when that call is the packed step (``csrc/lut.c``: a model with
            :mod:`mmafm.compress` packed matrices).
        why: why the step is not one kernel call ("" when it is).
    """

    def __init__(self, model: nn.Module, cache: KVCache, layers: tuple[LayerPlan, ...], why: str,
                 whole: kernels.DecodeStep | None, routing: AdapterRouting | None = None):
        self.model, self.cache, self.layers, self.why = model, cache, layers, why
        self.whole_step = whole is not None
        self.packed = isinstance(whole, kernels.PackedDecodeStep)  # the whole step over packed weights
        self.mixed_adapters = whole is not None and routing is not None  # per-row LoRA inside the step
        if whole is not None:
            self._step: Callable = _WholeStep(whole, cache, routing)
        elif any(KERNEL in (layer.attention, layer.ffn) for layer in layers):
            self._step = _LayeredStep(model, cache, layers)
        else:
            self._step = self._modules

    def _modules(self, tokens: torch.Tensor) -> torch.Tensor:
        return module_logits(self.model, tokens[:, None], self.cache, None)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, V) float32
        """Logits of one new token per row, its K/V appended to the cache."""
        return self._step(tokens)

    def chunk(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) float32 of ``T`` new tokens per row (B, T), each after the ones before
        it, their K/V appended to the cache (0 in ``attention_mask`` (B, T) = padding): one forward,
        as speculative decoding verifies a draft. A whole-step plan over a linear cache runs it in
        one kernel call (the weights read once for all B x T tokens, each row's logits
        bit-identical to :meth:`step` one token at a time); otherwise the modules run with every
        linear through the kernels' dispatch."""
        if isinstance(self._step, _WholeStep) and not self.cache.windows:
            return self._step.chunk(tokens, attention_mask)
        with kernels.kernel_linears():
            return self.model(tokens, cache=self.cache, attention_mask=attention_mask).float()

    @property
    def module_layers(self) -> list[int]:
        """Indices of the layers with a half on the module path."""
        return [layer.index for layer in self.layers if MODULE in (layer.attention, layer.ffn)]

    def describe(self) -> str:
        """A markdown table: how each layer runs, and why where not in a kernel."""
        if self.whole_step:
            head = "whole step in one kernel call"
            if self.packed:
                head += " over packed weights (csrc/lut.c)"
                if self._step.step.int8_activations:
                    head += ", int8 activations (csrc/q8.c)"
            if self.mixed_adapters:
                head += " with per-row LoRA adapters (csrc/lora.c)"
        elif isinstance(self._step, _LayeredStep):
            head = f"layer by layer ({self.why})"
        else:
            head = f"module path ({self.why})"
        rows = [f"decode plan: {head}"]
        if self.layers:
            rows += ["", "| layer | attention | FFN | why |", "|---|---|---|---|"]
            rows += [f"| {layer.index} | {layer.attention} | {layer.ffn} | {layer.why} |" for layer in self.layers]
        return "\n".join(rows)


def _mixed_routing(model: nn.Module) -> AdapterRouting | None:
    """The shared routing of ``model``'s LoRA linears when it routes a mixed batch, else None."""
    return next((m.routing for m in model.modules() if _mixed_lora(m)), None)


def build_plan(model: nn.Module, cache: KVCache, whole_step: bool = True) -> DecodePlan:
    """Decide how ``model`` decodes into ``cache`` (after its prefill, under ``torch.no_grad``).

    Args:
        model: any decoder with ``forward(ids, cache=)``; a :class:`TextModel` is planned layer
            by layer, anything else runs as modules.
        cache: the cache this call decodes into (its dtype, rows, padding and storage matter).
        whole_step: allow the one-call step (False: at most per-layer kernels, e.g. to test them).

    Returns:
        The plan; its ``layers`` and ``why`` say what runs where.
    """
    model_why = _model_why(model, cache)
    if model_why:
        layers = tuple(LayerPlan(i, MODULE, MODULE, model_why) for i in range(len(getattr(model, "layers", ()))))
        return DecodePlan(model, cache, layers if type(model) is TextModel else (), model_why, None)
    packed = _packed_step(model, cache) if whole_step else None  # compressed models: csrc/lut.c
    if packed is not None:
        return DecodePlan(model, cache, tuple(LayerPlan(i, KERNEL, KERNEL) for i in range(len(model.layers))), "",
                          packed)
    routing = _mixed_routing(model)
    if routing is not None and whole_step:  # a mixed batch: the whole step with its LoRA terms, if it fits
        mixed_why = _first(*(_block_why(b) or _attention_why(b, True) or _cache_why(b, cache) or _ffn_why(b, True)
                             for b in model.layers), _step_why(model, cache))
        whole = None if mixed_why else _whole_step(model, cache, mixed=True)
        if whole is not None:
            return DecodePlan(model, cache, tuple(LayerPlan(i, KERNEL, KERNEL) for i in range(len(model.layers))),
                              "", whole, routing)
    # what each half could run in, whatever the storage type
    candidates = []
    for index, block in enumerate(model.layers):
        block_why = _block_why(block)
        attention_why = block_why or _attention_why(block) or _cache_why(block, cache)
        ffn_why = block_why or _ffn_why(block)
        candidates.append((index, block, attention_why, ffn_why))
    step_why = _first(*(f"layer {i}: {a or f}" for i, _, a, f in candidates if a or f), _step_why(model, cache))
    if not whole_step:
        step_why = step_why or "whole step not allowed by the caller"
    whole = None if step_why else _whole_step(model, cache)
    if whole is not None:
        return DecodePlan(model, cache, tuple(LayerPlan(i, KERNEL, KERNEL) for i, *_ in candidates), "", whole)
    layers = []
    for index, block, attention_why, ffn_why in candidates:
        attention_why = attention_why or _float32_why(_attention_weights(block), cache)
        ffn_why = ffn_why or _float32_why(_ffn_weights(block), cache)
        layers.append(LayerPlan(index, MODULE if attention_why else KERNEL, MODULE if ffn_why else KERNEL,
                                "; ".join(dict.fromkeys(w for w in (attention_why, ffn_why) if w))))
    return DecodePlan(model, cache, tuple(layers), step_why or "the tensors do not fit the step kernel", None)
