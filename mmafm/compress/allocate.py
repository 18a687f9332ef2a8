"""Mixed-bit palettization: spend a bits-per-weight budget where the loss says it matters.

The 2024 report palettizes most layers at 4 bits and some at 2, choosing per layer with an
internal tool (Talaria) to reach ~3.5-3.7 bpw (WAVE2.md "Compression"). Here the sensitivity of
a linear at ``b`` bits is the **held-out loss increase** when that linear alone is palettized at
``b`` bits (the rest float), measured on a few held-out batches; the allocator starts every
linear at the widest option and repeatedly narrows the one with the least loss increase per bit
saved until the linears' bits per weight (LUTs included) fit the budget: the greedy solution of
the multiple-choice knapsack, whose total is within one layer's loss change of the optimum.

>>> table = layer_sensitivity(model, batches, options=(4, 2))
>>> bits = allocate_bits(table, budget_bpw=3.5)
>>> compress_model(model, bits=bits, default_bits=None)
>>> print(allocation_table(table, bits))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmafm.compress.bits import closed_form_matrix_bits
from mmafm.compress.palettize import _replace, linear_names, palettize_linear

__all__ = ["LayerSensitivity", "layer_sensitivity", "allocate_bits", "allocation_bpw", "allocation_table"]


@dataclass
class LayerSensitivity:
    """One linear: its shape and the held-out loss change at each bit width."""

    name: str
    shape: tuple[int, int]  # (out, in)
    loss_change: dict[int, float]  # bits -> loss(only this layer palettized) - loss(float)
    group_size: int = 16

    def bits_at(self, width: int) -> float:
        return closed_form_matrix_bits(*self.shape, "lut", width, self.group_size)


@torch.no_grad()
def _loss(model: nn.Module, batches: list) -> float:
    from mmafm.eval.perplexity import held_out_perplexity

    return held_out_perplexity(model, batches, torch.device("cpu"))["val_loss"]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list, options: tuple[int, ...] = (4, 2), group_size: int = 16,
                      targets=None, progress: bool = False) -> list[LayerSensitivity]:
    """Held-out loss increase of palettizing each linear alone at each of ``options`` bits.

    Args:
        model: the float model (left unchanged: each trial swaps one module and puts it back).
        batches: held-out ``(input_ids, targets)`` batches.
    """
    from tqdm.auto import tqdm

    model.eval()
    base = _loss(model, batches)
    rows = []
    for name in tqdm(linear_names(model, targets), desc="sensitivity", disable=not progress, mininterval=5):
        original = model.get_submodule(name)
        changes = {}
        for width in options:
            _replace(model, name, palettize_linear(original, width, group_size))
            changes[width] = _loss(model, batches) - base
            _replace(model, name, original)
        rows.append(LayerSensitivity(name, (original.out_features, original.in_features), changes, group_size))
    return rows


def allocation_bpw(table: list[LayerSensitivity], bits: dict[str, int]) -> float:
    """Bits per weight of the linears of ``table`` under ``bits`` (LUTs included)."""
    weights = sum(row.shape[0] * row.shape[1] for row in table)
    return sum(row.bits_at(bits[row.name]) for row in table) / weights


def allocate_bits(table: list[LayerSensitivity], budget_bpw: float) -> dict[str, int]:
    """``{linear name: bits}`` meeting ``budget_bpw`` over the linears: every linear at its
    widest option, then greedily narrowed (least loss increase per bit saved first).

    Raises:
        ValueError: the budget is below what the narrowest options give.
    """
    bits = {row.name: max(row.loss_change) for row in table}
    narrowest = {row.name: min(row.loss_change) for row in table}
    if allocation_bpw(table, narrowest) > budget_bpw + 1e-12:
        raise ValueError(f"budget {budget_bpw} bpw is below the narrowest allocation "
                         f"({allocation_bpw(table, narrowest):.4f} bpw)")
    rows = {row.name: row for row in table}
    while allocation_bpw(table, bits) > budget_bpw + 1e-12:
        best, best_ratio = None, float("inf")
        for name, width in bits.items():
            narrower = [w for w in rows[name].loss_change if w < width]
            if not narrower:
                continue
            step = max(narrower)
            saved = rows[name].bits_at(width) - rows[name].bits_at(step)
            cost = rows[name].loss_change[step] - rows[name].loss_change[width]
            ratio = cost / saved
            if ratio < best_ratio:
                best, best_ratio = (name, step), ratio
        bits[best[0]] = best[1]
    return bits


def allocation_table(table: list[LayerSensitivity], bits: dict[str, int]) -> str:
    """A markdown table like the report's: per linear, its bits, MB and loss change."""
    lines = ["| layer | bits | MB | loss change |", "| --- | ---: | ---: | ---: |"]
    for row in table:
        width = bits.get(row.name)
        if width is None:
            continue
        lines.append(f"| `{row.name}` | {width} | {row.bits_at(width) / 8e6:.4f} | {row.loss_change[width]:+.4f} |")
    lines.append(f"| **all linears** | {allocation_bpw(table, bits):.3f} bpw | "
                 f"{sum(row.bits_at(bits[row.name]) for row in table) / 8e6:.4f} | "
                 f"{sum(row.loss_change[bits[row.name]] for row in table):+.4f} (sum) |")
    return "\n".join(lines)

