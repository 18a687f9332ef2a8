"""The AFM text decoder: 2024 on-device/server dense models and the 2025 on-device model.

Follows ``../shared/REFERENCE.md`` "Text model" (2024 report section 2 and Table 1 = AXLearn
``honeycrisp-3B``; 2025 report "Model architecture" and its third-party teardown):

- decoder-only transformer, pre-RMSNorm, tied input/output embedding, bias-free linears;
- grouped-query attention with per-head RMSNorm on queries and keys (QK-norm, like Qwen3);
- SwiGLU feed-forward; RoPE (rotate-half layout) with a configurable base; optional z-loss;
- optional interleaved attention: ``local_global_pattern=(3, 1)`` = 3 sliding-window RoPE layers
  then 1 global layer without positional encoding (the 2025 server's pattern);
- optional KV sharing (2025 on-device): the layers split into two segments; segment-2 layers
  have only Q and O projections and attend with the K/V of segment 1's last layer, so the KV
  cache shrinks to segment 1's share (35/56, -37.5%);
- optional mixture-of-experts FFN every ``moe_every`` layers (the 2025 MoE teacher; PT-MoE tracks
  in :mod:`mmafm.models.ptmoe` reuse these blocks).

One config dataclass (:class:`TextConfig`) describes every variant; presets are registered with
:func:`mmafm.registry.register_model`. See ``docs/text_model.md``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmafm.config import ConfigError
from mmafm.layers.attention import attend
from mmafm.layers.kv_cache import CacheSpec, KVCache, kv_cache_nbytes
from mmafm.layers.moe import MoEFeedForward, upcycle_ffn
from mmafm.layers.norm import RMSNorm
from mmafm.layers.rope import rope_cos_sin, rope_table, rotate_half
from mmafm.layers.swiglu import SwiGLU
from mmafm.registry import register_model

__all__ = [
    "TextConfig",
    "TextModel",
    "DecoderLM",
    "Block",
    "Attention",
    "AttentionContext",
    "build_attention_mask",
    "document_mask",
    "document_positions",
    "layer_is_local",
    "layer_uses_rope",
    "layer_window",
    "kv_source_layer",
    "layer_is_moe",
    "cache_specs",
    "kv_cache_bytes",
    "upcycle",
    "run_blocks",
]


@dataclass
class TextConfig:
    """Every field of the AFM text decoders. Defaults describe a tiny dense model."""

    # --- size ---
    vocab_size: int = field(default=2048, metadata={"min": 1})  # 49,152 (2024 device), 100k (2024 server), 153,600 (2025)
    dim: int = field(default=128, metadata={"min": 1})  # residual width (3072 in 2024 device, 2048 in 2025 device)
    n_layers: int = field(default=4, metadata={"min": 1})  # decoder layers (per track for PT-MoE)
    n_heads: int = field(default=4, metadata={"min": 1})  # query heads
    n_kv_heads: int = field(default=2, metadata={"min": 1})  # key/value heads (GQA); divides n_heads
    head_dim: int = field(default=32, metadata={"min": 2})  # per-head width; 128 in every full preset
    ffn_dim: int = field(default=344, metadata={"min": 1})  # SwiGLU hidden width of dense FFN layers
    # --- normalisation, positions, embedding ---
    norm_eps: float = field(default=1e-5, metadata={"min": 0.0})  # RMSNorm epsilon (also QK-norm), 1e-5 [paper]
    rope_theta: float = field(default=500_000.0, metadata={"min": 1.0})  # RoPE base; 500k, 6,315,089 after context lengthening
    qk_norm: bool = True  # per-head RMSNorm on queries and keys (Qwen3-style); False = Llama layout
    tie_embeddings: bool = True  # output head = input embedding (all AFM models); False adds lm_head.weight
    max_seq_len: int = field(default=1024, metadata={"min": 1})  # longest sequence (context) a forward or cache accepts
    # --- training regularisers ---
    z_loss: float = field(default=0.0, metadata={"min": 0.0})  # weight of mean(logsumexp(logits)^2); 1e-6 in AFM 2024
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # residual-branch dropout (0.1 for SFT)
    init_std: float = field(default=0.02, metadata={"min": 0.0})  # normal init std; residual outputs scaled by 1/sqrt(2*n_layers) [open]
    # --- attention pattern ---
    sliding_window: int = field(default=4096, metadata={"min": 1})  # keys a local layer sees (itself included): 4096 in 2025 server
    # (n_local, n_global) period, e.g. (3, 1) = 3 sliding-window RoPE layers then 1 global layer;
    # None = every layer global attention with RoPE (2024 models, 2025 on-device)
    local_global_pattern: tuple[int, int] | None = None
    global_layer_rope: bool = False  # with a pattern: do global layers use RoPE? False = NoPE [paper, 2025 server]
    # --- KV sharing (2025 on-device) ---
    # (segment-1 layers, segment-2 layers); segment-2 layers reuse the K/V of segment 1's last
    # layer (no k_proj/v_proj, no cache). (35, 21) in afm_2025_device; None = no sharing
    kv_share_segments: tuple[int, int] | None = None
    # --- mixture of experts ---
    num_experts: int = field(default=0, metadata={"min": 0})  # experts per MoE layer; 0 = dense model
    top_k: int = field(default=2, metadata={"min": 1})  # experts per token (weights renormalised over the k)
    moe_every: int = field(default=2, metadata={"min": 1})  # layer i is MoE iff (i + 1) % moe_every == 0 ("every other layer")
    moe_ffn_dim: int | None = None  # hidden width of each expert; None = ffn_dim (what sparse upcycling needs)
    aux_loss_coef: float = field(default=0.01, metadata={"min": 0.0})  # load-balancing loss weight (mean over MoE layers) [open]
    # --- PT-MoE (2025 server), see mmafm.models.ptmoe ---
    num_tracks: int = field(default=1, metadata={"min": 1})  # parallel tracks, each its own n_layers-deep transformer; 1 = plain model
    track_block_depth: int = field(default=4, metadata={"min": 1})  # D: layers per track block; tracks sync once per block [paper: 4]
    # how tracks exchange state at a block boundary [open]: "mean" = every track continues from
    # the average of all tracks' residual streams (one all-reduce per block); "final" = tracks
    # run independently and are averaged only before the output norm (1 sync in total)
    track_exchange: str = field(default="mean", metadata={"choices": ("mean", "final")})

    def __post_init__(self) -> None:
        def bad(message: str) -> ConfigError:
            return ConfigError(f"TextConfig: {message}")

        if self.n_heads % self.n_kv_heads:
            raise bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise bad(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.local_global_pattern is not None:
            local, global_ = self.local_global_pattern
            if local < 0 or global_ < 0 or local + global_ == 0:
                raise bad(f"local_global_pattern must be two counts >= 0, not both 0; got {self.local_global_pattern}")
        if self.kv_share_segments is not None:
            first, second = self.kv_share_segments
            if first < 1 or second < 0 or first + second != self.n_layers:
                raise bad(
                    f"kv_share_segments {self.kv_share_segments} must be (>=1, >=0) summing to "
                    f"n_layers={self.n_layers}"
                )
            source = first - 1
            for i in range(first, self.n_layers):
                if layer_window(self, i) != layer_window(self, source) or layer_uses_rope(self, i) != layer_uses_rope(self, source):
                    raise bad(
                        f"KV-shared layer {i} must have the same attention kind (window, RoPE) as its "
                        f"source layer {source}; adjust local_global_pattern or kv_share_segments"
                    )
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise bad(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.num_tracks > 1 and self.n_layers % self.track_block_depth:
            raise bad(
                f"n_layers ({self.n_layers}) must be a multiple of track_block_depth "
                f"({self.track_block_depth}) for a PT-MoE model"
            )


# ----------------------------------------------------------------------------- layer plan


def layer_is_local(config: TextConfig, index: int) -> bool:
    """Is layer ``index`` a sliding-window (local) attention layer?"""
    if config.local_global_pattern is None:
        return False
    local, global_ = config.local_global_pattern
    return index % (local + global_) < local


def layer_window(config: TextConfig, index: int) -> int | None:
    """The sliding window of layer ``index``, or None for global attention."""
    return config.sliding_window if layer_is_local(config, index) else None


def layer_uses_rope(config: TextConfig, index: int) -> bool:
    """Local layers and pattern-free models use RoPE; global layers of a pattern may be NoPE."""
    if config.local_global_pattern is None or layer_is_local(config, index):
        return True
    return config.global_layer_rope


def kv_source_layer(config: TextConfig, index: int) -> int:
    """The layer whose keys/values layer ``index`` attends with (itself unless KV-shared)."""
    if config.kv_share_segments is not None and index >= config.kv_share_segments[0]:
        return config.kv_share_segments[0] - 1
    return index


def layer_is_moe(config: TextConfig, index: int) -> bool:
    """Is the FFN of layer ``index`` a mixture of experts?"""
    return config.num_experts > 0 and (index + 1) % config.moe_every == 0


def cache_specs(config: TextConfig) -> list[CacheSpec]:
    """One :class:`CacheSpec` per attention layer (all tracks, track-major)."""
    per_track = [
        CacheSpec(stores=kv_source_layer(config, i) == i, window=layer_window(config, i))
        for i in range(config.n_layers)
    ]
    return per_track * config.num_tracks


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. torch.bfloat16 or 'bfloat16'")
    return resolved


def kv_cache_bytes(
    config: TextConfig,
    seq_len: int,
    batch_size: int = 1,
    dtype: torch.dtype | str = torch.bfloat16,
    quantized: bool = False,
) -> int:
    """Bytes of K/V cache for ``batch_size`` sequences of ``seq_len`` tokens (closed form).

    Equals ``model.new_cache(batch_size, seq_len, dtype, quantized).nbytes``: shared layers
    store nothing, sliding-window layers only their window.
    """
    return kv_cache_nbytes(
        cache_specs(config), batch_size, seq_len, config.n_kv_heads, config.head_dim,
        _as_dtype(dtype), quantized,
    )


# ----------------------------------------------------------------------------- attention


def build_attention_mask(
    query_time: torch.Tensor,  # (T,) column of each query
    key_time: torch.Tensor,  # (S,) column of each key, -1 = empty slot
    key_valid: torch.Tensor | None,  # (B, C) True where column c is a real token; None = all real
    window: int | None,
) -> torch.Tensor:  # (B or 1, 1, T, S) bool, True = may attend
    """Causal (and sliding-window) mask over cache columns; padding keys are hidden.

    A padding query still sees itself, so no row is empty (an empty row would give NaN).
    """
    q, k = query_time[:, None], key_time[None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed = allowed & (q - k < window)
    if key_valid is None:
        return allowed[None, None]
    valid = key_valid[:, key_time.clamp(min=0)]  # (B, S)
    allowed = (allowed[None] & valid[:, None, :]) | (k == q)[None]
    return allowed[:, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T)
    """Position of every token inside its document: 0 where ``document_ids`` changes along the
    row (and at column 0), counting up until the next change (packed rows restart RoPE)."""
    length = document_ids.shape[1]
    column = torch.arange(length, device=document_ids.device).expand_as(document_ids)  # (B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, column, torch.zeros_like(column)).cummax(dim=1).values  # (B, T)
    return column - first


def document_mask(document_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Block-diagonal causal mask ``(B, 1, T, T)`` (True = may attend) of packed rows: a query
    sees the keys at or before it that carry its document id, within ``window`` if given.
    Documents are contiguous runs of one id (a repeated id further on is a new document)."""
    length = document_ids.shape[1]
    column = torch.arange(length, device=document_ids.device)
    allowed = column[None, :] <= column[:, None]  # (T, T) causal
    if window is not None:
        allowed = allowed & (column[:, None] - column[None, :] < window)
    start = column[None, :] - document_positions(document_ids)  # (B, T) first column of each token's run
    same = column[None, None, :] >= start[:, :, None]  # (B, T, T) a causal key is in the query's run
    return (allowed[None] & same)[:, None]  # iff it is at or after the run's first column


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares: positions, cache and masks."""

    cos: torch.Tensor  # (B, T, head_dim)
    sin: torch.Tensor  # (B, T, head_dim)
    query_time: torch.Tensor  # (T,) cache column of each query
    key_valid: torch.Tensor | None  # (B, C) real-token columns; None when there is no padding
    cache: KVCache | None = None
    masks: dict = field(default_factory=dict)
    document_ids: torch.Tensor | None = None  # (B, T) packed rows: attention never crosses a change of id

    def __post_init__(self) -> None:
        self.head_cos, self.head_sin = self.cos[:, :, None], self.sin[:, :, None]  # (B, T, 1, D)

    def mask(self, key_time: torch.Tensor, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """``(mask, is_causal)`` for keys at ``key_time``; memoised per (window, key set)."""
        memo_key = (window, id(key_time))
        if memo_key in self.masks:
            return self.masks[memo_key][1]
        num_queries = self.query_time.numel()
        if self.document_ids is not None:  # block-diagonal causal: once per (window, key set)
            result = (document_mask(self.document_ids, window), False)
            self.masks[memo_key] = (key_time, result)
            return result
        plain = self.key_valid is None and (window is None or key_time.numel() <= window)
        if plain and key_time is self.query_time and self.cache is None:
            result = (None, True)  # ordinary causal attention: let SDPA pick its fused path
        elif plain and self.cache is not None and window is None and key_time.numel() == num_queries:
            result = (None, True)  # prefill into an empty cache: ordinary causal attention
        elif plain and num_queries == 1 and self.cache is not None and window is None:
            result = (None, False)  # one new token sees every cached column
        else:
            result = (build_attention_mask(self.query_time, key_time, self.key_valid, window), False)
        self.masks[memo_key] = (key_time, result)  # keep key_time alive so its id stays unique
        return result


def _rope(x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # (B, T, H, D)
    """:func:`mmafm.layers.rope.apply_rope` in the (B, T, H, D) layout, before the head transpose
    (the same arithmetic, so the same bits)."""
    return x * ctx.head_cos.to(x.dtype) + rotate_half(x) * ctx.head_sin.to(x.dtype)


def _single_query_attention(
    q: torch.Tensor,  # (B, H, 1, D)
    k: torch.Tensor,  # (B, Hkv, S, D)
    v: torch.Tensor,  # (B, Hkv, S, D)
) -> torch.Tensor:  # (B, H, 1, D)
    """Unmasked attention of one query per row (a decode step) as two small batched products.

    Equal to :func:`attend` without mask up to float rounding, without its kernel's setup cost
    (and thread fan-out), which dominates at one query.
    """
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    grouped = q.reshape(batch * num_kv_heads, num_heads // num_kv_heads, head_dim)  # (B Hkv, G, D)
    keys, values = k.flatten(0, 1), v.flatten(0, 1)  # (B Hkv, S, D), views of the cache
    scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(head_dim**-0.5)  # (B Hkv, G, S)
    probs = scores.float().softmax(dim=-1).to(values.dtype)
    return torch.bmm(probs, values).view(batch, num_heads, 1, head_dim)


class Attention(nn.Module):
    """GQA self-attention with optional QK-norm, RoPE, sliding window and K/V sharing."""

    def __init__(self, config: TextConfig, layer_index: int, cache_index: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.owns_kv = kv_source_layer(config, layer_index) == layer_index
        self.window = layer_window(config, layer_index)
        self.use_rope = layer_uses_rope(config, layer_index)
        self.cache_index = layer_index if cache_index is None else cache_index
        q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.dim, q_width, bias=False)
        if self.owns_kv:
            self.k_proj = nn.Linear(config.dim, kv_width, bias=False)
            self.v_proj = nn.Linear(config.dim, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm and self.owns_kv else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        ctx: AttentionContext,
        shared_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Returns ``(output (B, T, dim), (keys, values, key_time))``, the latter for sharing."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.use_rope:
            q = _rope(q, ctx)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if self.owns_kv:
            k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.use_rope:
                k = _rope(k, ctx)
            k = k.transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if ctx.cache is not None:
                k, v, key_time = ctx.cache.update(self.cache_index, k, v)  # (B, Hkv, S, D)
            else:
                key_time = ctx.query_time
            kv = (k, v, key_time)
        else:
            if shared_kv is None:
                raise RuntimeError("a KV-shared attention layer needs its source layer's keys/values")
            kv = shared_kv
        mask, is_causal = ctx.mask(kv[2], self.window)
        keys, values = kv[0].to(q.dtype), kv[1].to(q.dtype)
        if mask is None and not is_causal and length == 1:
            out = _single_query_attention(q, keys, values)
        else:
            out = attend(q, keys, values, mask=mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.o_proj(out), kv


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, config: TextConfig, layer_index: int, cache_index: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_index, cache_index)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.is_moe = layer_is_moe(config, layer_index)
        if self.is_moe:
            hidden = config.moe_ffn_dim or config.ffn_dim
            self.ffn = MoEFeedForward(config.dim, hidden, config.num_experts, config.top_k, config.init_std)
        else:
            self.ffn = SwiGLU(config.dim, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        ctx: AttentionContext,
        shared_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Returns ``(x, (keys, values, key_time), load-balancing loss or None)``."""
        drop = self.dropout if self.training and self.dropout.p > 0 else _identity
        attn_out, kv = self.attn(self.attn_norm(x), ctx, shared_kv)
        x = x + drop(attn_out)
        aux = None
        if self.is_moe:
            ffn_out, aux = self.ffn(self.ffn_norm(x))
        else:
            ffn_out = self.ffn(self.ffn_norm(x))
        return x + drop(ffn_out), kv, aux


def _is_shared_source(config: TextConfig, index: int) -> bool:
    return config.kv_share_segments is not None and index == config.kv_share_segments[0] - 1


def run_blocks(
    blocks: Iterable[tuple[int, Callable]],
    h: torch.Tensor,
    ctx: AttentionContext,
    config: TextConfig,
    kv_store: dict,
    aux_losses: list,
    grad_checkpointing: bool = False,
) -> torch.Tensor:
    """Run ``(layer_index, layer)`` pairs, each layer called as ``layer(h, ctx, shared_kv) ->
    (h, (keys, values, key_time), aux loss or None)`` like :meth:`Block.forward`; keeps the K/V
    of sharing sources in ``kv_store``."""
    for index, block in blocks:
        source = kv_source_layer(config, index)
        shared_kv = kv_store[source] if source != index else None
        if grad_checkpointing and torch.is_grad_enabled() and ctx.cache is None:
            h, kv, aux = checkpoint(block, h, ctx, shared_kv, use_reentrant=False)
        else:
            h, kv, aux = block(h, ctx, shared_kv)
        if _is_shared_source(config, index):
            kv_store[index] = kv
        if aux is not None:
            aux_losses.append(aux)
    return h


# ----------------------------------------------------------------------------- models


class DecoderLM(nn.Module, abc.ABC):
    """What every AFM decoder shares: embedding, positions, cache handling, head, loss.

    The base builds ``embed``, ``norm`` (and ``lm_head`` when untied); subclasses build their
    layers and implement :meth:`_trunk` and :meth:`fsdp_units`.
    """

    config: TextConfig

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.grad_checkpointing = False
        self.aux_loss: torch.Tensor | None = None  # mean MoE load-balancing loss of the last forward
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    # -- construction helpers
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 L)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.ndim == 1:
                nn.init.ones_(param)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "w_down.weight", "ffn.w_down")):
                nn.init.normal_(param, std=residual_std)
            else:
                nn.init.normal_(param, std=std)

    @abc.abstractmethod
    def _trunk(self, h: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, list]:
        """Run the layers on embeddings ``h``; returns ``(h, list of MoE balance losses)``."""

    @abc.abstractmethod
    def fsdp_units(self) -> list[nn.Module]:
        """The modules to wrap as separate FSDP units (the decoder layers)."""

    # -- public API
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, dim)
        """Token embeddings (for splicing image tokens in before calling with ``inputs_embeds``)."""
        return self.embed(input_ids)

    def output_weight(self) -> torch.Tensor:  # (V, dim)
        return self.embed.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, V) float32
        """Vocabulary logits of final-norm hidden states (through ``lm_head`` when untied)."""
        if self.config.tie_embeddings:
            return F.linear(hidden, self.embed.weight).float()
        return self.lm_head(hidden).float()

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | str | None = None,
                  quantized: bool = False) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens."""
        if max_len > self.config.max_seq_len:
            raise ValueError(
                f"cache max_len={max_len} exceeds the model's context max_seq_len={self.config.max_seq_len}"
            )
        # the embedding's dtype and device; a packed embedding (mmafm.compress) dequantizes its whole
        # table for .weight (0.4 s for SmolLM2's), so its model's norm gain stands in (float32 there)
        weight = self.embed.weight if isinstance(self.embed, nn.Embedding) else self.norm.weight
        return KVCache(
            cache_specs(self.config), batch_size, max_len, self.config.n_kv_heads, self.config.head_dim,
            dtype=weight.dtype if dtype is None else _as_dtype(dtype), device=weight.device,
            quantized=quantized,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` drops the token embedding (and an untied head)."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            params.pop(id(self.embed.weight), None)
            if not self.config.tie_embeddings:
                params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def num_active_params(self) -> int:
        """Parameters one token uses: all, except that an MoE layer counts ``top_k`` experts."""
        total = self.num_params()
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                per_expert = sum(w[0].numel() for w in (module.w_gate, module.w_up, module.w_down))
                total -= (module.num_experts - module.top_k) * per_expert
        return total

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: the RMSNorm gains (all 1-D parameters)."""
        return {name for name, param in self.named_parameters() if param.ndim < 2}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        *,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, dim)
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, cached + T); 0 = padding
        return_hidden: bool = False,
        document_ids: torch.Tensor | None = None,  # (B, T) int: packed documents, see attention_context
    ) -> torch.Tensor:
        """Logits (B, T, V) in float32, or final-norm hidden states (B, T, dim).

        With ``cache``, the tokens are appended after those already cached (prefill, then one
        token per call for decoding). Padding must be on the left; positions then count real
        tokens only, so a left-padded row computes what the unpadded prompt computes.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, dim)")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            h = self.embed(input_ids)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.dim:
                raise ValueError(
                    f"inputs_embeds must be (batch, seq_len, {self.config.dim}), got {tuple(inputs_embeds.shape)}"
                )
            h = inputs_embeds
        ctx = self.attention_context(h, cache, position_ids, attention_mask, document_ids)
        try:
            h, aux_losses = self._trunk(h, ctx)
        except BaseException:
            if cache is not None:
                cache.abort()
            raise
        if cache is not None:
            cache.end()
        self.aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        h = self.norm(h)
        return h if return_hidden else self.logits(h)

    def attention_context(
        self,
        h: torch.Tensor,  # (B, T, dim) the step's input embeddings
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, cached + T); 0 = padding
        document_ids: torch.Tensor | None = None,  # (B, T) int, packed rows (training; no cache)
    ) -> AttentionContext:
        """What every attention layer of one forward pass over ``h`` shares (positions, RoPE,
        masks); with ``cache`` it opens the cache's step (:meth:`KVCache.begin`), which the caller
        closes with ``cache.end()`` (or ``cache.abort()`` on failure), as :meth:`forward` does.

        ``document_ids`` packs several documents into a row: each contiguous run of one id is a
        document, attention never crosses runs (:func:`document_mask`, built once per forward)
        and RoPE positions restart at 0 in each run, so every document computes what it computes
        alone. Padding is a run of its own id. Without it nothing changes (the plain causal path).
        """
        batch, length, _ = h.shape
        device = h.device
        if document_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("document_ids packs training rows: pass it without cache and without attention_mask "
                                 "(give padding a document id of its own)")
            if document_ids.shape != (batch, length) or document_ids.is_floating_point():
                raise ValueError(f"document_ids must be integer ({batch}, {length}), got "
                                 f"{document_ids.dtype} {tuple(document_ids.shape)}")
            if length > self.config.max_seq_len:
                raise ValueError(f"sequence of {length} tokens is longer than the model's context "
                                 f"max_seq_len={self.config.max_seq_len}")
            document_ids = document_ids.to(device)
            if position_ids is None:
                position_ids = document_positions(document_ids)
            context = self.attention_context(h, None, position_ids)
            context.document_ids = document_ids
            return context
        if cache is None:
            if length > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {length} tokens is longer than the model's context "
                    f"max_seq_len={self.config.max_seq_len}"
                )
            key_valid = None
            if attention_mask is not None:
                if attention_mask.shape != (batch, length):
                    raise ValueError(f"attention_mask must be ({batch}, {length}), got {tuple(attention_mask.shape)}")
                key_valid = attention_mask.to(device=device, dtype=torch.bool)
                positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)
            else:
                positions = None  # 0 .. length-1 in every row
            query_time = torch.arange(length, device=device)
        else:
            if cache.batch_size != batch:
                raise ValueError(f"cache was made for batch_size={cache.batch_size}, got a batch of {batch}")
            chunk_mask = None
            if attention_mask is not None:
                width = attention_mask.shape[-1]
                if attention_mask.ndim != 2 or width not in (length, cache.length + length):
                    raise ValueError(
                        f"attention_mask must be ({batch}, {length}) or ({batch}, {cache.length + length}) "
                        f"with {cache.length} cached tokens, got {tuple(attention_mask.shape)}"
                    )
                chunk_mask = attention_mask[:, width - length :]
            query_time = torch.arange(cache.length, cache.length + length, device=device)
            positions = cache.begin(length, chunk_mask)
            key_valid = cache.key_valid() if cache.has_padding else None
        if position_ids is not None:
            if position_ids.shape != (batch, length):
                raise ValueError(f"position_ids must be ({batch}, {length}), got {tuple(position_ids.shape)}")
            # arbitrary user positions: computed directly, not looked up in the table
            cos, sin = rope_cos_sin(position_ids.to(device), self.config.head_dim, self.config.rope_theta,
                                    dtype=h.dtype)
        elif cache is not None and cache.max_len > self.config.max_seq_len:
            # a cache built directly (not by new_cache) may outgrow the table
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype=h.dtype)
        else:
            # generated positions are < max_seq_len: look them up in the precomputed table
            cos_table, sin_table = self._rope_table(device)
            if positions is None:
                cos, sin = cos_table[:length].expand(batch, length, -1), sin_table[:length].expand(batch, length, -1)
            else:
                cos, sin = cos_table[positions], sin_table[positions]
            cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        return AttentionContext(cos, sin, query_time, key_valid, cache)

    def _rope_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x (max_seq_len, D)
        """RoPE cos/sin (float32) of positions ``0 .. max_seq_len-1``, built once per device and shape."""
        key = (device, self.config.max_seq_len, self.config.head_dim, self.config.rope_theta)
        tables = self.__dict__.setdefault("_rope_tables", {})  # plain attribute: not in the state dict
        if key not in tables:
            tables.clear()
            tables[key] = rope_table(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta, device)
        return tables[key]

    def loss(
        self,
        logits: torch.Tensor,  # (B, T, V)
        targets: torch.Tensor,  # (B, T): the token that should follow each position
        z_loss: float | None = None,
        ignore_index: int = -100,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy + ``z_loss * mean(logsumexp^2)`` + ``aux_loss_coef * aux_loss`` (MoE).

        Targets are already aligned with the logits (shift before calling). Returns the total
        loss and float metrics ``ce``, ``ppl``, ``z_loss`` (the unweighted mean logsumexp^2) and,
        for MoE models, ``aux_loss``.
        """
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape[:-1])}")
        weight = self.config.z_loss if z_loss is None else z_loss
        flat_logits = logits.float().reshape(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1)
        keep = flat_targets != ignore_index
        count = keep.sum().clamp(min=1)
        ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum") / count
        log_z = flat_logits.logsumexp(dim=-1)
        z_term = (log_z.pow(2) * keep).sum() / count
        total = ce + weight * z_term
        metrics = {"ce": ce.item(), "ppl": math.exp(min(ce.item(), 50.0)), "z_loss": z_term.item()}
        if self.aux_loss is not None:
            total = total + self.config.aux_loss_coef * self.aux_loss
            metrics["aux_loss"] = self.aux_loss.item()
        return total, metrics


class TextModel(DecoderLM):
    """The AFM dense / KV-shared / MoE-teacher decoder (one track).

    Parameter names follow the contract in the module docstring: ``embed.weight``,
    ``layers.{i}.attn.{q,k,v,o}_proj.weight``, ``layers.{i}.attn.{q,k}_norm.weight``,
    ``layers.{i}.{attn,ffn}_norm.weight``, ``layers.{i}.ffn.w_{gate,up,down}.weight``,
    ``norm.weight`` (and ``lm_head.weight`` when untied).
    """

    def __init__(self, config: TextConfig):
        if config.num_tracks != 1:
            raise ConfigError(
                f"TextModel is single-track; config has num_tracks={config.num_tracks}: "
                f"build it with mmafm.models.ptmoe.PTMoEModel"
            )
        super().__init__(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.init_weights()

    def _trunk(self, h, ctx):
        aux_losses: list = []
        h = run_blocks(enumerate(self.layers), h, ctx, self.config, {}, aux_losses, self.grad_checkpointing)
        return h, aux_losses

    def fsdp_units(self) -> list[nn.Module]:
        """The decoder layers, each its own FSDP unit."""
        return list(self.layers)


@torch.no_grad()
def upcycle(model: TextModel, num_experts: int = 64, top_k: int = 2, moe_every: int = 2) -> TextModel:
    """Sparse upcycling of a dense model: every ``moe_every``-th FFN becomes ``num_experts``
    copies of itself behind a new router (2025 report: ~3B dense -> 64 experts every 2 layers).

    The returned model computes the same logits as ``model`` at initialisation.
    """
    if model.config.num_experts:
        raise ValueError(f"upcycle expects a dense model, got one with num_experts={model.config.num_experts}")
    config = dataclasses.replace(
        model.config, num_experts=num_experts, top_k=top_k, moe_every=moe_every, moe_ffn_dim=None
    )
    weight = model.embed.weight
    with torch.device(weight.device):
        moe_model = TextModel(config).to(weight.dtype)
    dense_state = {k: v for k, v in model.state_dict().items()}
    own = moe_model.state_dict()
    moe_model.load_state_dict({k: v for k, v in dense_state.items() if k in own and own[k].shape == v.shape},
                              strict=False)
    for index, block in enumerate(moe_model.layers):
        if block.is_moe:
            block.ffn = upcycle_ffn(model.layers[index].ffn, num_experts, top_k, config.init_std)
    return moe_model


# ----------------------------------------------------------------------------- presets

@register_model("afm_2024_device", builder=TextModel)
def afm_2024_device() -> TextConfig:
    """AFM-on-device 2024 (report Table 1): ~2.58B non-embedding + 0.15B embedding parameters."""
    return TextConfig(
        vocab_size=49_152, dim=3072, n_layers=26, n_heads=24, n_kv_heads=8, head_dim=128,
        ffn_dim=8064, rope_theta=500_000.0, qk_norm=True, tie_embeddings=True,
        max_seq_len=4096,  # core pretraining length; 8192 / 32768 (rope 6,315,089) in later stages
        z_loss=1e-6,
    )


@register_model("afm_2024_device_tiny", builder=TextModel)
def afm_2024_device_tiny() -> TextConfig:
    """The 2024 device architecture at CPU-trainable size (vocab of the data stage's tokenizer)."""
    return dataclasses.replace(
        afm_2024_device(), vocab_size=2048, dim=96, n_layers=4, n_heads=6, n_kv_heads=2,
        head_dim=16, ffn_dim=252, max_seq_len=1024,
    )


@register_model("afm_2025_device", builder=TextModel)
def afm_2025_device() -> TextConfig:
    """AFM on-device 2025: 35 + 21 KV-shared layers, ~3.11B parameters."""
    return TextConfig(
        vocab_size=153_600, dim=2048, n_layers=56, n_heads=16, n_kv_heads=2, head_dim=128,
        ffn_dim=6656, rope_theta=500_000.0, qk_norm=True, tie_embeddings=True, max_seq_len=4096,
        z_loss=1e-6,  # [open] carried over from 2024
        kv_share_segments=(35, 21),  # 5:3 split [paper+teardown]
    )


@register_model("afm_2025_device_tiny", builder=TextModel)
def afm_2025_device_tiny() -> TextConfig:
    """The 2025 device architecture (5:3 KV sharing, 8:1 GQA) at CPU-trainable size."""
    return dataclasses.replace(
        afm_2025_device(), vocab_size=2048, dim=64, n_layers=8, kv_share_segments=(5, 3),
        n_heads=4, n_kv_heads=1, head_dim=16, ffn_dim=208, max_seq_len=1024,
    )


@register_model("afm_2025_moe_teacher", builder=TextModel)
def afm_2025_moe_teacher() -> TextConfig:
    """2025 MoE teacher: the ~3B dense model upcycled to 64 experts every 2 layers.

    The dense base is taken to be the 2025 on-device architecture and top-2 routing is chosen
    [open]; build it from a trained dense checkpoint with :func:`upcycle`.
    """
    return dataclasses.replace(afm_2025_device(), num_experts=64, top_k=2, moe_every=2)


@register_model("afm_2025_moe_teacher_tiny", builder=TextModel)
def afm_2025_moe_teacher_tiny() -> TextConfig:
    """The MoE teacher at CPU size: the tiny 2025 device model with 4 experts every 2 layers."""
    return dataclasses.replace(afm_2025_device_tiny(), num_experts=4, top_k=2, moe_every=2)
