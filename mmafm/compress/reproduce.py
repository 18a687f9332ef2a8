"""The reports' compression numbers at full size (closed forms) and the small-scale Pareto figure.

Used by ``notebooks/reproduce_compression.ipynb``:

- :func:`full_size_table`: bits per weight and megabytes of every full-size preset under each
  scheme the reports name, from the configs on the meta device (nothing is allocated);
- :func:`mix_for_budget`: the share of weights at 2 bits that a 4/2-bit palettization needs to
  reach a budget (the 2024 report's 3.5 possible / 3.7 shipped);
- :func:`pareto_figure`: held-out perplexity against bits per weight of an ``11_compression`` run,
  before and after the recovery adapters.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from mmafm.compress.bits import closed_form_matrix_bits

__all__ = ["SCHEMES", "REPORT_PRESETS", "meta_matrices", "scheme_bits", "mix_for_budget", "full_size_table",
           "pareto_figure"]

REPORT_PRESETS = ("afm_2024_device", "afm_2025_device", "afm_2025_server")
# name -> (matrix scheme, bits, embedding bits or None for 16-bit) [paper, see WAVE2.md]
SCHEMES = {
    "bf16": ("float", 16, None),
    "palettize 4-bit, 8-bit emb. (2024)": ("lut", 4, 8),
    "palettize 2-bit, 8-bit emb.": ("lut", 2, 8),
    "QAT 2-bit, 4-bit emb. (2025 device)": ("uniform", 2, 4),
    "ASTC 6x6, 4-bit emb. (2025 server)": ("astc", 128 / 36, 4),
}


@functools.lru_cache(maxsize=None)
def meta_matrices(preset: str) -> tuple[tuple[str, int, int, int], ...]:
    """``(parameter name, copies, out, in)`` of every weight matrix of a preset built on the meta
    device: 2-D weights once, stacked 3-D expert weights once per expert (``copies``). Cached per
    preset (building a full-size model, even on the meta device, takes seconds)."""
    from mmafm.registry import create_model

    model = create_model(preset, device="meta")
    rows = []
    for name, parameter in model.named_parameters():
        if parameter.dim() == 2:
            rows.append((name, 1, parameter.shape[0], parameter.shape[1]))
        elif parameter.dim() == 3:
            rows.append((name, parameter.shape[0], parameter.shape[1], parameter.shape[2]))
    return tuple(rows)


def _is_embedding(name: str) -> bool:
    return name.split(".")[-2] in ("embed", "lm_head") if "." in name else False


def scheme_bits(rows: list[tuple[str, int, int, int]], scheme: str, bits: float, embedding_bits: int | None,
                include_embedding: bool = True) -> tuple[float, int]:
    """``(stored bits, weights)`` of ``rows`` under one scheme (embedding per-row uniform)."""
    total_bits = total = 0
    for name, copies, out, cols in rows:
        if _is_embedding(name):
            if not include_embedding:
                continue
            stored = (closed_form_matrix_bits(out, cols, "float", 16) if embedding_bits is None
                      else closed_form_matrix_bits(out, cols, "uniform", embedding_bits))
        else:
            stored = closed_form_matrix_bits(out, cols, scheme, bits)
        total_bits += copies * stored
        total += copies * out * cols
    return total_bits, total


def mix_for_budget(rows: list[tuple[str, int, int, int]], budget: float) -> float:
    """Share of the non-embedding weights at 2-bit (the rest 4-bit, LUTs included) whose bits per
    weight equal ``budget``: linear between the all-4-bit and all-2-bit rates."""
    four, weights = scheme_bits(rows, "lut", 4, None, include_embedding=False)
    two, _ = scheme_bits(rows, "lut", 2, None, include_embedding=False)
    high, low = four / weights, two / weights
    return min(1.0, max(0.0, (high - budget) / (high - low)))


def full_size_table(presets: Sequence[str] = REPORT_PRESETS) -> str:
    """A markdown table: per preset and scheme, bits per weight (with / without the embedding)
    and megabytes of the weight matrices; plus the 2-bit share of a 3.5 / 3.7 bpw 4/2-bit mix."""
    lines = ["| model | scheme | bpw (all) | bpw (no embedding) | MB |", "| --- | --- | ---: | ---: | ---: |"]
    for preset in presets:
        rows = meta_matrices(preset)
        for label, (scheme, bits, embedding_bits) in SCHEMES.items():
            stored, weights = scheme_bits(rows, scheme, bits, embedding_bits)
            body, body_weights = scheme_bits(rows, scheme, bits, embedding_bits, include_embedding=False)
            lines.append(f"| `{preset}` | {label} | {stored / weights:.3f} | {body / body_weights:.3f} | "
                         f"{stored / 8 / 1e6:,.0f} |")
        for budget in (3.5, 3.7):
            share = mix_for_budget(rows, budget)
            _, body_weights = scheme_bits(rows, "lut", 4, None, include_embedding=False)
            embed_bits, _ = scheme_bits([r for r in rows if _is_embedding(r[0])], "lut", 4, 8)
            megabytes = (budget * body_weights + embed_bits) / 8 / 1e6
            lines.append(f"| `{preset}` | palettize 4/2 mix at {budget} bpw ({share:.0%} of weights at 2-bit), 8-bit emb. "
                         f"| | {budget:.3f} | {megabytes:,.0f} |")
    return "\n".join(lines)


def pareto_figure(summary: dict, schemes: Sequence[str]):
    """Held-out perplexity against bits per weight from an ``11_compression`` manifest summary:
    each scheme compressed (circle) and after its recovery LoRA (square), the float base as a
    line. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.axhline(math.exp(summary["float_loss"]), color="black", linestyle="--", label="float base")
    points = sorted(schemes, key=lambda s: summary[f"{s}_bpw"])
    for label, key, marker in (("compressed", "loss", "o-"), ("+ recovery LoRA (rank 16)", "loss_recovered", "s-")):
        ax.plot([summary[f"{s}_bpw"] for s in points], [math.exp(summary[f"{s}_{key}"]) for s in points], marker,
                label=label)
    for s in points:
        ax.annotate(s, (summary[f"{s}_bpw"], math.exp(summary[f"{s}_loss"])), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set(xlabel="bits per weight (embedding included)", ylabel="held-out perplexity",
           title="compression Pareto front, before and after recovery")
    ax.legend(fontsize=8)
    return fig
