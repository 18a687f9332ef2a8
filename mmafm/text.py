"""The text model for users: configs, models, KV-cache arithmetic, generation, upcycling.

>>> import mmafm, mmafm.text
>>> config = mmafm.get_config("afm_2025_device")
>>> mmafm.text.kv_cache_bytes(config, seq_len=4096, batch_size=1, dtype="bfloat16")
146800640

See ``docs/text_model.md`` and :mod:`mmafm.models.text` / :mod:`mmafm.models.ptmoe`.
"""

from mmafm.generate import generate, generate_text, sample_next_token
from mmafm.layers.kv_cache import KVCache
from mmafm.layers.moe import upcycle_ffn
from mmafm.models.ptmoe import PTMoEModel, sync_points
from mmafm.models.text import TextConfig, TextModel, cache_specs, kv_cache_bytes, upcycle



def preset_table(seq_len: int = 4096, dtype: str = "bfloat16") -> str:
    """A markdown table of every text preset: shape, parameter counts (built on the meta device),
    and KV-cache bytes for one sequence of ``seq_len`` tokens. ``docs/text_model.md`` pastes it."""
    from mmafm.registry import create_model, list_models

    names = sorted(list_models(family="text") + list_models(family="ptmoe"))
    rows = [
        "| preset | layers | width | heads / KV | FFN | experts (top-k) | tracks | vocab | params | "
        "non-embedding | active / token | KV bytes / token (first token) | KV bytes / token "
        f"past {seq_len} | KV cache @ {seq_len} ({dtype}) | int8 KV cache |",
        "|" + "---|" * 15,
    ]
    for name in names:
        model = create_model(name, device="meta")
        c = model.config
        layers = f"{c.kv_share_segments[0]}+{c.kv_share_segments[1]}" if c.kv_share_segments else str(c.n_layers)
        experts = f"{c.num_experts} ({c.top_k}) every {c.moe_every}" if c.num_experts else "-"
        full = kv_cache_bytes(c, seq_len, 1, dtype)
        per_token = kv_cache_bytes(c, 1, 1, dtype)  # one token: every layer holds one slot
        growth = kv_cache_bytes(c, seq_len + 1, 1, dtype) - full  # windowed layers no longer grow
        int8 = kv_cache_bytes(c, seq_len, 1, dtype, quantized=True)
        rows.append(
            f"| `{name}` | {layers} | {c.dim} | {c.n_heads} / {c.n_kv_heads} x {c.head_dim} | {c.ffn_dim} | "
            f"{experts} | {c.num_tracks} | {c.vocab_size:,} | {model.num_params():,} | "
            f"{model.num_params(non_embedding=True):,} | {model.num_active_params():,} | {per_token:,} | {growth:,} | "
            f"{full / 2**20:,.1f} MiB | {int8 / 2**20:,.1f} MiB |"
        )
        del model
    return "\n".join(rows)


__all__ = [
    "preset_table",
    "TextConfig",
    "TextModel",
    "PTMoEModel",
    "KVCache",
    "kv_cache_bytes",
    "cache_specs",
    "generate",
    "generate_text",
    "sample_next_token",
    "sync_points",
    "upcycle",
    "upcycle_ffn",
]
