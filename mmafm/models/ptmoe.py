"""PT-MoE: the 2025 AFM server model, a parallel-track mixture-of-experts transformer.

Follows ``../shared/REFERENCE.md`` "2025 server PT-MoE" (2025 report, "Model architecture"):

- the model is ``num_tracks`` tracks, each a smaller transformer of ``n_layers`` layers that
  runs independently of the others;
- tracks exchange state only at the boundaries of *track blocks* of ``track_block_depth`` (D)
  layers, so a track-parallel deployment synchronises L/D times instead of the 2L all-reduces of
  tensor parallelism (one after attention, one after the FFN of every layer): -87.5% for D = 4;
- inside a track every other layer is a mixture of experts (top-k router, load-balancing loss,
  no token dropping), its experts private to the track;
- attention in groups of 4 layers: 3 sliding-window layers (window 4096, RoPE) then 1 global
  layer without positional encoding.

What the report leaves open, chosen here (fields of :class:`~mmafm.models.text.TextConfig`):
the exchange at a block boundary is the *mean* of the tracks' residual streams, from which every
track continues (``track_exchange="mean"``; ``"final"`` merges only once, at the end); all tracks
start from the same token embedding and share the embedding, final norm and output head; track
count, width, expert count and top-k of ``afm_2025_server`` are documented at its preset.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mmafm.config import ConfigError
from mmafm.models.text import AttentionContext, Block, DecoderLM, TextConfig, run_blocks
from mmafm.registry import register_model

__all__ = ["PTMoEModel", "Track", "sync_points"]


def sync_points(config: TextConfig) -> dict[str, float]:
    """Synchronisation points of one forward pass, tensor parallel vs parallel tracks.

    Tensor parallelism all-reduces twice per layer (after attention and after the FFN): 2L.
    Tracks synchronise once per track block: L/D (1 with ``track_exchange="final"``).

    Returns:
        ``{"tensor_parallel": 2L, "parallel_track": L/D, "reduction": 1 - (L/D) / 2L}``.
    """
    if config.n_layers % config.track_block_depth:
        raise ValueError(
            f"n_layers ({config.n_layers}) must be a multiple of track_block_depth ({config.track_block_depth})"
        )
    tensor_parallel = 2 * config.n_layers
    track = config.n_layers // config.track_block_depth if config.track_exchange == "mean" else 1
    return {"tensor_parallel": tensor_parallel, "parallel_track": track,
            "reduction": 1.0 - track / tensor_parallel}


class Track(nn.Module):
    """One track: ``n_layers`` decoder layers with their own (private) experts."""

    def __init__(self, config: TextConfig, track_index: int):
        super().__init__()
        offset = track_index * config.n_layers  # this track's first layer in the KV cache
        self.layers = nn.ModuleList(Block(config, i, cache_index=offset + i) for i in range(config.n_layers))


class PTMoEModel(DecoderLM):
    """Parallel-track MoE decoder. Parameters: ``embed.weight``, ``tracks.{t}.layers.{i}.*``
    (same per-layer names as :class:`~mmafm.models.text.TextModel`), ``norm.weight``."""

    def __init__(self, config: TextConfig):
        if config.n_layers % config.track_block_depth:
            raise ConfigError(
                f"PT-MoE needs n_layers ({config.n_layers}) to be a multiple of track_block_depth "
                f"({config.track_block_depth})"
            )
        super().__init__(config)
        self.tracks = nn.ModuleList(Track(config, t) for t in range(config.num_tracks))
        self.init_weights()

    def _trunk(self, h: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, list]:
        config, depth = self.config, self.config.track_block_depth
        aux_losses: list = []
        kv_stores: list[dict] = [{} for _ in self.tracks]
        states = [h] * len(self.tracks)  # every track starts from the token embedding
        for start in range(0, config.n_layers, depth):
            for t, track in enumerate(self.tracks):
                blocks = [(i, track.layers[i]) for i in range(start, start + depth)]
                states[t] = run_blocks(blocks, states[t], ctx, config, kv_stores[t], aux_losses,
                                       self.grad_checkpointing)
            if config.track_exchange == "mean":  # the block boundary: one all-reduce
                merged = torch.stack(states).mean(dim=0)
                states = [merged] * len(self.tracks)
        return torch.stack(states).mean(dim=0), aux_losses

    def fsdp_units(self) -> list[nn.Module]:
        """Every decoder layer of every track."""
        return [layer for track in self.tracks for layer in track.layers]


# ----------------------------------------------------------------------------- presets


@register_model("afm_2025_server", builder=PTMoEModel)
def afm_2025_server() -> TextConfig:
    """AFM server 2025 (PT-MoE); track count, width, experts and top-k are documented choices."""
    return TextConfig(
        vocab_size=153_600,  # 2025 tokenizer [paper]
        # [open] width/depth: 4 tracks of 48 layers, width 2048, 16 query heads x 128, 4 KV heads,
        # so each track is a ~2B-wide-and-deep transformer like the on-device model
        dim=2048, n_layers=48, n_heads=16, n_kv_heads=4, head_dim=128, ffn_dim=8192,
        rope_theta=500_000.0, qk_norm=True, tie_embeddings=True,
        max_seq_len=32_768,  # [open]
        z_loss=1e-6,  # [open] carried over from 2024
        sliding_window=4096, local_global_pattern=(3, 1), global_layer_rope=False,  # [paper]
        # [open] 16 experts per MoE layer per track, top-2, experts as wide as the dense FFN:
        # ~85B parameters in total, ~17B active per token (see docs/text_model.md)
        num_experts=16, top_k=2, moe_every=2, moe_ffn_dim=8192, aux_loss_coef=0.01,
        num_tracks=4,  # [open]
        track_block_depth=4,  # D = 4 [paper]
        track_exchange="mean",  # [open]
    )


@register_model("afm_2025_server_tiny", builder=PTMoEModel)
def afm_2025_server_tiny() -> TextConfig:
    """PT-MoE at CPU size: 2 tracks x 8 layers (2 blocks of 4), 4 experts top-2, window 16."""
    return dataclasses.replace(
        afm_2025_server(), vocab_size=2048, dim=64, n_layers=8, n_heads=4, n_kv_heads=2,
        head_dim=16, ffn_dim=128, moe_ffn_dim=128, num_experts=4, top_k=2, num_tracks=2,
        sliding_window=16, max_seq_len=1024,
    )
