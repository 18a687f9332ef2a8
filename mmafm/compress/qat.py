"""Quantization-aware training: the 2025 report's 2-bit weights with a learnable clipping factor.

The 2025 on-device model trains its weights through the fake quantizer (WAVE2.md "Compression")::

    W~ = s (clamp(round(W / s + z), qmin, qmax) - z),   s = f max|W| / qmax

with a learnable ``f`` initialised by an error search and the balanced levels {-1.5, -0.5, 0.5,
1.5}. Balanced levels are integers shifted by a half: ``z = -1/2``, codes ``[qmin, qmax] =
[-2^(b-1), 2^(b-1) - 1]``, and the ``qmax`` that scales ``s`` is the top level ``2^(b-1) - 1/2``
(1.5 at 2 bits), so at ``f = 1`` the largest weight of a row lands on the top level. That is
torchao PARQ's ``UnifQuantizer(scale_method="max", int_shift=0.5, zero_point=0.5)`` per row (a
test checks the two agree). ``f`` is one value per output row, ``max|W|`` is taken without
gradient, and rounding passes gradients straight through (the STE) while the clamp does not,
so ``f`` learns the clipping. The 4-bit embedding is trained jointly by the same quantizer.

>>> prepare_qat(model, bits=2, embedding_bits=4)   # QATLinear / QATEmbedding in place
>>> ... train as usual ...
>>> convert_qat(model)                             # packed 2-bit codes + fp16 scales
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fake_quantize", "QATLinear", "QATEmbedding", "prepare_qat", "convert_qat"]


def fake_quantize(weight: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:  # (rows, cols)
    """``s (clamp(round(W/s + z), qmin, qmax) - z)`` per row with ``s = clip max|W| / (2^(b-1) - 1/2)``,
    ``z = -1/2`` (balanced levels); straight-through gradient for the rounding."""
    top = (1 << (bits - 1)) - 0.5
    half = 1 << (bits - 1)
    scale = (clip[:, None] * weight.detach().abs().amax(1, keepdim=True) / top).clamp_min(torch.finfo(weight.dtype).tiny)
    shifted = weight / scale - 0.5  # W/s + z
    rounded = shifted + (shifted.round() - shifted).detach()  # STE
    return scale * (rounded.clamp(-half, half - 1) + 0.5)


class QATLinear(nn.Module):
    """A bias-free linear trained through :func:`fake_quantize`: the float ``latent`` weight (the
    ``nn.Linear``'s Parameter, taken over) and a learnable per-row ``clip`` f."""

    def __init__(self, linear: nn.Linear, bits: int = 2, clip: torch.Tensor | None = None):
        super().__init__()
        from mmafm.compress.palettize import search_clip

        if linear.bias is not None:
            raise ValueError("QATLinear: linears with a bias are not supported")
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.latent = linear.weight
        init = search_clip(linear.weight, bits) if clip is None else clip
        self.clip = nn.Parameter(init.to(linear.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:
        return fake_quantize(self.latent, self.clip.clamp(0.05, 1.0), self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class QATEmbedding(nn.Module):
    """An embedding trained through :func:`fake_quantize` per row; ``weight`` (what a tied head
    reads) is the fake-quantized table, so head and lookup train against the same levels."""

    def __init__(self, embed: nn.Embedding, bits: int = 4, clip: torch.Tensor | None = None):
        super().__init__()
        from mmafm.compress.palettize import search_clip

        self.num_embeddings, self.embedding_dim, self.bits = embed.num_embeddings, embed.embedding_dim, bits
        self.max_norm = None
        self.latent = embed.weight
        init = search_clip(embed.weight, bits) if clip is None else clip
        self.clip = nn.Parameter(init.to(embed.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:
        return fake_quantize(self.latent, self.clip.clamp(0.05, 1.0), self.bits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def prepare_qat(model: nn.Module, bits: int = 2, embedding_bits: int | None = 4,
                targets: Sequence[str] | None = None) -> list[str]:
    """Swap ``model``'s linears (those matching ``targets``; default all) for :class:`QATLinear`
    and its token embedding for :class:`QATEmbedding`, in place (clips found by error search).
    Returns the names swapped."""
    from mmafm.compress.palettize import _replace, linear_names

    names = linear_names(model, targets)
    for name in names:
        _replace(model, name, QATLinear(model.get_submodule(name), bits))
    if embedding_bits is not None and type(getattr(model, "embed", None)) is nn.Embedding:
        model.embed = QATEmbedding(model.embed, embedding_bits)
        names.append("embed")
    return names


@torch.no_grad()
def convert_qat(model: nn.Module) -> list[dict]:
    """Replace every QAT module by its packed form (codes + fp16 per-row scales), in place: the
    packed weight is the fake-quantized one up to the fp16 rounding of the scale."""
    from mmafm.compress.packed import PackedEmbedding, PackedLinear
    from mmafm.compress.palettize import _replace, quantize_uniform

    rows = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (QATLinear, QATEmbedding)):
            codes, scale = quantize_uniform(module.latent, module.bits, module.clip.clamp(0.05, 1.0))
            if isinstance(module, QATLinear):
                packed = PackedLinear(module.in_features, module.out_features, module.bits, "uniform", 1, 0)
            else:
                packed = PackedEmbedding(module.num_embeddings, module.embedding_dim, module.bits, "uniform")
            packed.set_packed(codes, scale).to(module.latent.device)
            _replace(model, name, packed)
            rows.append({"name": name, "bits": module.bits, "shape": (packed.rows, packed.cols),
                         "bytes": packed.storage_bits() / 8})
    return rows
