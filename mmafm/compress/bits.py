"""Bits per weight: counted from a model's modules, and in closed form from a text config.

Two conventions, as compression numbers are quoted both ways: over every weight matrix (linears
and the token embedding, a tied head being the embedding itself), or without the embedding (and
an untied output head), like ``num_params(non_embedding=True)``. Counted are the weight matrices
only (norm gains and other vectors are a rounding error and stay 16/32-bit); a compressed matrix
counts its packed codes plus its fp16 tables or scales, a plain one its storage dtype.

Closed forms (per matrix of ``out`` rows and ``K = in`` columns, groups of ``g`` rows):

- palettized, ``b`` bits: ``b * out * K + ceil(out / g) * 2^b * 16``, i.e. ``b + 2^b / K`` bits
  per weight when ``g = 16`` divides ``out`` (the LUT overhead of WAVE2.md);
- uniform per row (QAT, embeddings), ``b`` bits: ``b * out * K + 16 * out`` = ``b + 16 / K``;
- ASTC 6x6: 128 bits per block of 36 weights = 3.5556 when 6 divides both sides (+ 64 bits
  per matrix for its value range).
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["matrix_bits", "bits_per_weight", "closed_form_matrix_bits", "text_matrices", "closed_form_bpw",
           "compressed_megabytes"]

_EMBEDDING_NAMES = ("embed", "lm_head")  # left out by include_embedding=False


def matrix_bits(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(module name, weights, stored bits)`` of every weight matrix of ``model``."""
    from mmafm.compress.packed import Packed
    from mmafm.compress.qat import QATEmbedding, QATLinear

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, Packed) or hasattr(module, "storage_bits"):
            rows.append((name, module.rows * module.cols, module.storage_bits()))
        elif isinstance(module, (QATLinear, QATEmbedding)):
            out, cols = module.latent.shape
            rows.append((name, out * cols, out * math.ceil(cols * module.bits / 8) * 8 + 16 * out))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            rows.append((name, weight.numel(), weight.numel() * weight.element_size() * 8))
    return rows


def bits_per_weight(model: nn.Module, include_embedding: bool = True) -> float:
    """Stored bits per weight over ``model``'s weight matrices (see the module docstring);
    ``include_embedding=False`` leaves out the token embedding and an untied head."""
    rows = [row for row in matrix_bits(model) if include_embedding or row[0].split(".")[-1] not in _EMBEDDING_NAMES]
    weights = sum(count for _, count, _ in rows)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no weight matrices")
    return sum(bits for _, _, bits in rows) / weights


def closed_form_matrix_bits(out: int, cols: int, scheme: str, bits: float = 4, group_size: int = 16,
                            per_channel_scale: bool = False) -> float:
    """Stored bits of one (out, cols) matrix under ``scheme``: ``"lut"`` (groups of rows; plus an
    fp16 scale per row with ``per_channel_scale``), ``"uniform"`` (a scale per row), ``"astc"``
    (6x6 blocks of 128 bits) or ``"float"`` (``bits`` per weight)."""
    if scheme == "lut":
        return (bits * out * cols + math.ceil(out / group_size) * (2 ** bits) * 16
                + (16 * out if per_channel_scale else 0))
    if scheme == "uniform":
        return bits * out * cols + 16 * out
    if scheme == "astc":  # + two float32 per matrix: its value range
        return math.ceil(out / 6) * math.ceil(cols / 6) * 128 + 64
    if scheme == "float":
        return bits * out * cols
    raise ValueError(f"unknown scheme {scheme!r}; expected lut, uniform, astc or float")


def text_matrices(config) -> list[tuple[str, int, int]]:
    """``(name, out, in)`` of every weight matrix of a dense text decoder, from its config
    (KV-shared layers have no K/V projections); the embedding is named ``embed``."""
    from mmafm.models.text import kv_source_layer

    if config.num_experts:
        raise ValueError("closed forms cover dense decoders (num_experts=0)")
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    rows = []
    for index in range(config.n_layers * config.num_tracks):
        layer = index % config.n_layers
        prefix = f"layers.{index}"
        rows.append((f"{prefix}.attn.q_proj", q_width, config.dim))
        if kv_source_layer(config, layer) == layer:
            rows += [(f"{prefix}.attn.k_proj", kv_width, config.dim), (f"{prefix}.attn.v_proj", kv_width, config.dim)]
        rows += [(f"{prefix}.attn.o_proj", config.dim, q_width), (f"{prefix}.ffn.w_gate", config.ffn_dim, config.dim),
                 (f"{prefix}.ffn.w_up", config.ffn_dim, config.dim), (f"{prefix}.ffn.w_down", config.dim, config.ffn_dim)]
    rows.append(("embed", config.vocab_size, config.dim))
    if not config.tie_embeddings:
        rows.append(("lm_head", config.vocab_size, config.dim))
    return rows


def closed_form_bpw(config, scheme: str = "lut", bits: float = 4, group_size: int = 16,
                    embedding_bits: int | None = 8, include_embedding: bool = True,
                    per_channel_scale: bool = False) -> float:
    """Bits per weight of a dense text decoder compressed with ``scheme`` at ``bits`` (lut: with
    fp16 row scales when ``per_channel_scale``) and its embedding (and untied head) per-row
    uniform at ``embedding_bits`` (None: kept 16-bit)."""
    total_bits = total = 0
    for name, out, cols in text_matrices(config):
        if name in _EMBEDDING_NAMES:
            if not include_embedding:
                continue
            stored = (closed_form_matrix_bits(out, cols, "float", 16) if embedding_bits is None
                      else closed_form_matrix_bits(out, cols, "uniform", embedding_bits))
        else:
            stored = closed_form_matrix_bits(out, cols, scheme, bits, group_size, per_channel_scale)
        total_bits += stored
        total += out * cols
    return total_bits / total


def compressed_megabytes(config, scheme: str = "lut", bits: float = 4, group_size: int = 16,
                         embedding_bits: int | None = 8) -> float:
    """Megabytes (10^6 bytes) of a dense decoder's weight matrices compressed as
    :func:`closed_form_bpw` says (norm gains left out: under 0.01%)."""
    weights = sum(out * cols for _, out, cols in text_matrices(config))
    return closed_form_bpw(config, scheme, bits, group_size, embedding_bits) * weights / 8 / 1e6
