"""The mixed-bit allocator: sensitivities against a direct measurement, the budget met, and the
greedy total within one layer's loss change of the brute-force optimum."""

from __future__ import annotations

import itertools

import pytest
import torch

import mmafm
from mmafm.compress.allocate import LayerSensitivity, allocate_bits, allocation_bpw, allocation_table, layer_sensitivity
from mmafm.compress.palettize import compress_model


def test_allocation_meets_the_budget_near_the_optimum():
    generator = torch.Generator().manual_seed(0)
    table = [LayerSensitivity(f"l{i}", (16 * (1 + i % 3), 64), {4: float(torch.rand(1, generator=generator)) * 0.01,
                                                                 2: float(torch.rand(1, generator=generator))})
             for i in range(8)]
    for budget in (2.5, 3.0, 3.5, 4.2):
        bits = allocate_bits(table, budget)
        assert allocation_bpw(table, bits) <= budget + 1e-12
        cost = sum(row.loss_change[bits[row.name]] for row in table)
        feasible = []
        for choice in itertools.product((4, 2), repeat=len(table)):
            option = {row.name: width for row, width in zip(table, choice)}
            if allocation_bpw(table, option) <= budget + 1e-12:
                feasible.append(sum(row.loss_change[option[row.name]] for row in table))
        assert min(feasible) <= cost <= min(feasible) + max(row.loss_change[2] for row in table)
    with pytest.raises(ValueError, match="below the narrowest"):
        allocate_bits(table, 2.0)
    assert "| **all linears** |" in allocation_table(table, allocate_bits(table, 3.0))


def test_sensitivity_is_the_loss_increase_of_that_layer_alone():
    from mmafm.eval.perplexity import held_out_perplexity

    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=128, n_layers=1).eval()
    ids = torch.randint(0, 128, (2, 17))
    batches = [(ids[:, :-1], ids[:, 1:])]
    table = layer_sensitivity(model, batches, options=(4, 2), targets=["ffn.w_up", "attn.q_proj"])
    assert [row.name for row in table] == ["layers.0.attn.q_proj", "layers.0.ffn.w_up"]
    assert type(model.layers[0].ffn.w_up) is torch.nn.Linear  # put back
    base = held_out_perplexity(model, batches)["val_loss"]
    compress_model(model, bits={"layers.0.ffn.w_up": 2}, embedding_bits=None)
    direct = held_out_perplexity(model, batches)["val_loss"] - base
    assert table[1].loss_change[2] == pytest.approx(direct, abs=1e-6)
