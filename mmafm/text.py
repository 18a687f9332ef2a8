"""The text model for users: configs, models, KV-cache arithmetic, generation, upcycling.

>>> import mmafm, mmafm.text
>>> config = mmafm.get_config("afm_2025_device")
>>> mmafm.text.kv_cache_bytes(config, seq_len=4096, batch_size=1, dtype="bfloat16")
146800640

See ``docs/text_model.md`` and :mod:`mmafm.models.text` / :mod:`mmafm.models.ptmoe`.
"""

from mmafm.generate import decode_tokens_per_second, generate, generate_text, sample_next_token
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
    "decode_tokens_per_second",
    "kv_cache_curves",
    "plot_kv_cache",
    "sample_next_token",
    "sync_points",
    "upcycle",
    "upcycle_ffn",
]


def kv_cache_curves(
    names: list[str] | None = None, max_context: int = 32768, dtype: str = "bfloat16", min_context: int = 128
) -> dict[str, tuple[list[int], list[int]]]:
    """KV-cache bytes of one sequence against its length, closed form (:func:`kv_cache_bytes`):
    powers of two from ``min_context`` up to ``max_context`` or the preset's ``max_seq_len``,
    whichever is smaller. Default presets: the 2024 device, the 2025 device and the 2025 server
    models; a KV-shared preset also gets the same model without sharing, ``"<name> (no KV sharing)"``."""
    import dataclasses

    from mmafm.registry import get_config

    names = names or ["afm_2024_device", "afm_2025_device", "afm_2025_server"]
    curves = {}
    for name in names:
        config = get_config(name)
        lengths, n = [], min_context
        while n <= min(max_context, config.max_seq_len):
            lengths.append(n)
            n *= 2
        curves[name] = (lengths, [kv_cache_bytes(config, n, 1, dtype) for n in lengths])
        if config.kv_share_segments is not None:
            plain = dataclasses.replace(config, kv_share_segments=None)
            curves[f"{name} (no KV sharing)"] = (lengths, [kv_cache_bytes(plain, n, 1, dtype) for n in lengths])
    return curves


def plot_kv_cache(names: list[str] | None = None, max_context: int = 32768, dtype: str = "bfloat16"):
    """The figure of :func:`kv_cache_curves` on log-log axes: MiB of KV cache against context
    length, one line per preset up to its context (dashed: a KV-shared preset without sharing,
    with the saving written at its end). Returns a matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    curves = kv_cache_curves(names, max_context, dtype)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, (lengths, sizes) in curves.items():
        unshared = label.endswith("(no KV sharing)")
        ax.plot(lengths, [b / 2**20 for b in sizes], marker=".", linestyle="--" if unshared else "-", label=label)
        shared = label.removesuffix(" (no KV sharing)")
        if unshared and shared in curves:
            saving = 1 - curves[shared][1][-1] / sizes[-1]
            ax.annotate(f"-{saving:.1%}", (lengths[-1], curves[shared][1][-1] / 2**20), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain_numbers)
    ax.yaxis.set_major_formatter(plain_numbers)
    ax.set_xlabel("context length (tokens, one sequence; each preset up to its max_seq_len)")
    ax.set_ylabel(f"KV cache (MiB, {dtype})")
    ax.set_title("KV-cache memory of the AFM text presets")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
