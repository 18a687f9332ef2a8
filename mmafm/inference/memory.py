"""KV-cache memory of the text presets against context length, in closed form.

The bytes come from :func:`mmafm.models.text.kv_cache_bytes` (which the tests check against the
bytes a real cache allocates): global layers grow with the context, sliding-window layers stop at
their window, KV-shared layers store nothing. The 2025 on-device model's 5:3 sharing (35 of 56
layers keep a cache) is the report's "37.5% less KV cache" (REFERENCE.md, "Text model").

>>> curves = kv_cache_curves(["afm_2025_device"], max_context=4096)
>>> curves["afm_2025_device"][1][-1] / curves["afm_2025_device (no KV sharing)"][1][-1]
0.625
"""

from __future__ import annotations

import dataclasses

from mmafm.models.text import kv_cache_bytes
from mmafm.registry import get_config

__all__ = ["kv_cache_curves", "plot_kv_cache"]

DEFAULT_PRESETS = ["afm_2024_device", "afm_2025_device", "afm_2025_server"]
NO_SHARING = " (no KV sharing)"  # label suffix of a KV-shared preset's curve without sharing


def kv_cache_curves(
    names: list[str] | None = None, max_context: int = 32768, dtype: str = "bfloat16", min_context: int = 128
) -> dict[str, tuple[list[int], list[int]]]:
    """KV-cache bytes of one sequence against its length.

    Args:
        names: text presets; default the 2024 device, the 2025 device and the 2025 server models.
        max_context: the longest context, capped by each preset's ``max_seq_len``.
        dtype: storage dtype of the cache.
        min_context: the first length; the lengths are its doublings.

    Returns:
        ``{label: (lengths, bytes)}``; a KV-shared preset also gets the same model without
        sharing, labelled ``"<name> (no KV sharing)"``.
    """
    curves = {}
    for name in names or DEFAULT_PRESETS:
        config = get_config(name)
        lengths, length = [], min_context
        while length <= min(max_context, config.max_seq_len):
            lengths.append(length)
            length *= 2
        curves[name] = (lengths, [kv_cache_bytes(config, n, 1, dtype) for n in lengths])
        if config.kv_share_segments is not None:
            plain = dataclasses.replace(config, kv_share_segments=None)
            curves[name + NO_SHARING] = (lengths, [kv_cache_bytes(plain, n, 1, dtype) for n in lengths])
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
        unshared = label.endswith(NO_SHARING)
        ax.plot(lengths, [b / 2**20 for b in sizes], marker=".", linestyle="--" if unshared else "-", label=label)
        shared = label.removesuffix(NO_SHARING)
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
