"""Post-training compression of a model: palettized linears and per-channel quantized embeddings.

2024 report (WAVE2.md "Compression"): projection weights palettized, every 16 rows (or columns)
sharing a 16-entry (4-bit) or 4-entry (2-bit) lookup table fitted by k-means; the embedding
8-bit per channel. 2025 server: embedding 4-bit post-training. :func:`compress_model` swaps the
targeted ``nn.Linear`` modules for :class:`~mmafm.compress.packed.PackedLinear` and the token
embedding for a :class:`~mmafm.compress.packed.PackedEmbedding`, in place; a tied head reads the
embedding's (dequantized) table, so it is compressed with it.

>>> rows = compress_model(model, bits=4, embedding_bits=8)           # 4-bit LUTs, int8 embedding
>>> rows = compress_model(model, bits={"layers.0.ffn.w_up": 2}, default_bits=4)   # mixed bits
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mmafm.compress.kmeans import assign, kmeans_1d
from mmafm.compress.packed import BITS, PackedEmbedding, PackedLinear

__all__ = ["fit_lut", "row_max_scale", "palettize_linear", "search_clip", "quantize_uniform", "quantize_embedding",
           "linear_names", "compress_model", "astc_compress", "dequantized_copy"]


def _groups(weight: torch.Tensor, group_size: int, axis: int) -> list[tuple[slice, torch.Tensor]]:
    """``(slice along axis, values (groups, n))`` batches: the full groups together, a smaller
    last group (when ``group_size`` does not divide the axis) on its own."""
    matrix = weight if axis == 0 else weight.T  # (grouped axis, other)
    length = matrix.shape[0]
    full = length // group_size * group_size
    batches = []
    if full:
        batches.append((slice(0, full), matrix[:full].reshape(full // group_size, -1)))
    if full < length:
        batches.append((slice(full, length), matrix[full:].reshape(1, -1)))
    return batches


def row_max_scale(weight: torch.Tensor) -> torch.Tensor:  # (rows, cols) -> (rows,) float16
    """Each row's max-abs rounded to fp16 (an all-zero row gets 1): the per-channel scale the
    shared table is fitted under (coremltools' ``enable_per_channel_scale``)."""
    scale = weight.detach().float().abs().amax(1).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fit_lut(weight: torch.Tensor, bits: int, group_size: int = 16, axis: int = 0, per_channel_scale: bool = False
            ) -> tuple[torch.Tensor, ...]:
    """Palettize a (rows, cols) weight: per group of ``group_size`` rows (axis 0) or columns
    (axis 1), the ``2^bits`` k-means centroids (:func:`~mmafm.compress.kmeans.kmeans_1d`) rounded
    to fp16, and each weight's nearest fp16 entry. With ``per_channel_scale`` each row is first
    divided by its fp16 max-abs (:func:`row_max_scale`), so rows of different ranges share one
    table without the small rows' levels being spent on the large rows' tails; the weight is then
    ``row_scale[r] * lut[group, code]``.

    Returns:
        ``(codes (rows, cols) long, lut (groups, 2^bits) float16)``, plus ``row_scale (rows,)
        float16`` when ``per_channel_scale``.

    Raises:
        ValueError: bits not in (2, 4, 8), a weight that is not 2-D, or a group with fewer
            values than table entries.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if weight.dim() != 2:
        raise ValueError(f"palettize a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu()
    row_scale = row_max_scale(w) if per_channel_scale else None
    if row_scale is not None:
        w = w / row_scale.float()[:, None]  # (rows, cols), each row's max-abs 1 (up to fp16 rounding)
    codes = torch.empty(w.shape if axis == 0 else w.T.shape, dtype=torch.long)
    luts = []
    for span, values in _groups(w, group_size, axis):
        lut = kmeans_1d(values, 1 << bits).to(torch.float16)  # sorted; fp16 rounding keeps the order
        group_codes = assign(values.double(), lut.double())  # (groups, n)
        codes[span] = group_codes.reshape(span.stop - span.start, -1)
        luts.append(lut)
    codes = codes if axis == 0 else codes.T.contiguous()
    return (codes, torch.cat(luts)) if row_scale is None else (codes, torch.cat(luts), row_scale)


def palettize_linear(linear: nn.Linear, bits: int, group_size: int = 16, axis: int = 0,
                     per_channel_scale: bool = False) -> PackedLinear:
    """A :class:`PackedLinear` holding ``linear``'s weight palettized by :func:`fit_lut` (with
    fp16 row scales when ``per_channel_scale``).

    Raises:
        ValueError: a linear with a bias (the AFM linears have none).
    """
    if linear.bias is not None:
        raise ValueError("palettize_linear: linears with a bias are not supported")
    codes, lut, *row_scale = fit_lut(linear.weight, bits, group_size, axis, per_channel_scale)
    packed = PackedLinear(linear.in_features, linear.out_features, bits, "lut", group_size, axis,
                          per_channel_scale=per_channel_scale)
    return packed.set_packed(codes, lut, *row_scale).to(linear.weight.device)


def search_clip(weight: torch.Tensor, bits: int, candidates: torch.Tensor | None = None) -> torch.Tensor:  # (rows,)
    """Per row, the clipping factor ``f`` of the balanced uniform grid (``s = f max|w| / (2^(b-1) -
    1/2)``) with the least squared error, searched over ``candidates`` (default 0.20, 0.22, ...,
    1.00): the 2025 report's QAT initialisation by error search."""
    from mmafm.compress.qat import fake_quantize

    candidates = torch.linspace(0.2, 1.0, 41) if candidates is None else candidates
    w = weight.detach().float()
    errors = torch.stack([((fake_quantize(w, torch.full((w.shape[0],), float(f)), bits) - w) ** 2).sum(1)
                          for f in candidates])  # (candidates, rows)
    return candidates[errors.argmin(0)].to(w.device)


def quantize_uniform(weight: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row balanced uniform quantization (the QAT formula at fixed ``clip`` f; None searches
    it with :func:`search_clip`).

    Returns:
        ``(codes (rows, cols) long in [0, 2^bits), scale (rows,) float16)``.
    """
    w = weight.detach().float()
    if clip is None:
        clip = search_clip(w, bits)
    clip = torch.as_tensor(clip, dtype=torch.float32, device=w.device).expand(w.shape[0])
    top = (1 << (bits - 1)) - 0.5
    scale = (clip * w.abs().amax(1) / top).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
    s = scale.float()[:, None]
    # nearest level of s * balanced_grid, in the QAT's arithmetic: round(w / s - 1/2) + 1/2
    half = 1 << (bits - 1)
    codes = (torch.round(w / s - 0.5).clamp(-half, half - 1) + half).long()
    return codes, scale


def quantize_embedding(embed: nn.Embedding, bits: int = 8, clip: torch.Tensor | float | None = 1.0) -> PackedEmbedding:
    """An embedding quantized per channel (row) to ``bits`` on the balanced grid: 8-bit (2024
    device) or 4-bit (2025); ``clip`` 1.0 keeps every row's largest value, None searches it."""
    codes, scale = quantize_uniform(embed.weight, bits, clip)
    packed = PackedEmbedding(embed.num_embeddings, embed.embedding_dim, bits, "uniform")
    return packed.set_packed(codes, scale).to(embed.weight.device)


def linear_names(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules to compress: every one (``targets`` None), or those
    matching ``targets`` (patterns as :func:`mmafm.lora.adapters.matches`)."""
    from mmafm.lora.adapters import matches

    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and (targets is None or matches(name, targets))]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def compress_model(
    model: nn.Module,
    bits: int | dict[str, int] = 4,
    *,
    default_bits: int | None = None,
    group_size: int = 16,
    axis: int = 0,
    embedding_bits: int | None = 8,
    targets: Sequence[str] | None = None,
    progress: bool = False,
    per_channel_scale: bool = False,
) -> list[dict]:
    """Palettize ``model``'s linears and quantize its token embedding, in place.

    Args:
        bits: bits of every targeted linear, or ``{module name: bits}`` (a mixed-bit allocation;
            names not in it get ``default_bits``, or stay uncompressed when that is None). A
            value of 16 or 32 leaves that linear as it is.
        group_size, axis: rows (0) or columns (1) per shared lookup table [paper: 16].
        embedding_bits: 8 or 4 (per channel, balanced grid), None to leave the embedding alone.
        targets: patterns of the linears to consider (default: all).
        progress: a tqdm bar over the linears.
        per_channel_scale: divide each row by its fp16 max-abs before fitting the shared tables
            and store those scales (+16 bits per row) [coremltools' enable_per_channel_scale;
            default off, the report's plain LUTs].

    Returns:
        One row per compressed module: ``{"name", "bits", "shape", "bytes"}``.
    """
    from tqdm.auto import tqdm

    names = linear_names(model, targets)
    plan = {name: (bits.get(name, default_bits) if isinstance(bits, dict) else bits) for name in names}
    rows = []
    for name in tqdm(names, desc="palettize", disable=not progress, mininterval=5):
        width = plan[name]
        if width is None or width >= 16:
            continue
        packed = palettize_linear(model.get_submodule(name), width, group_size, axis, per_channel_scale)
        _replace(model, name, packed)
        rows.append({"name": name, "bits": width, "shape": (packed.out_features, packed.in_features),
                     "bytes": packed.storage_bits() / 8})
    embed = getattr(model, "embed", None)
    if embedding_bits is not None and type(embed) is nn.Embedding:
        packed = quantize_embedding(embed, embedding_bits)
        model.embed = packed
        rows.append({"name": "embed", "bits": embedding_bits, "shape": (packed.rows, packed.cols),
                     "bytes": packed.storage_bits() / 8})
    return rows


def astc_compress(model: nn.Module, targets: Sequence[str] | None = None, progress: bool = False) -> list[dict]:
    """Swap ``model``'s linears (matching ``targets``; default all) for ASTC-style 6x6 block
    linears (:class:`mmafm.compress.astc.ASTCLinear`), in place; the embedding is left to
    :func:`quantize_embedding` (2025 server: 4-bit post-training)."""
    from tqdm.auto import tqdm

    from mmafm.compress.astc import ASTCLinear

    rows = []
    for name in tqdm(linear_names(model, targets), desc="astc", disable=not progress, mininterval=5):
        module = ASTCLinear.from_linear(model.get_submodule(name))
        _replace(model, name, module)
        rows.append({"name": name, "bits": 128 / 36, "shape": (module.rows, module.cols),
                     "bytes": module.storage_bits() / 8})
    return rows


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every packed module replaced by the plain module holding
    its dequantized weight (the reference a packed model's logits are checked against)."""
    import copy

    from mmafm.compress.astc import ASTCLinear

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, (PackedLinear, ASTCLinear)):
            weight = module.dequantize()
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device=weight.device)
            linear.weight.data.copy_(weight)
            _replace(plain, name, linear)
        elif isinstance(module, PackedEmbedding):
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, device=module.codes.device)
            embedding.weight.data.copy_(module.dequantize())
            _replace(plain, name, embedding)
    return plain

