"""ASTC-style 6x6 blocks: 128 bits per block (3.5556 bpw closed form), pack/unpack consistency,
the encoder against a brute-force search over every endpoint pair, and storage round trips."""

from __future__ import annotations

import pytest
import torch

import mmafm
from mmafm.compress import astc, bits_per_weight, dequantized_copy, save_compressed
from mmafm.compress.astc import ASTCLinear, decode_blocks, encode_blocks
from mmafm.compress.bits import closed_form_matrix_bits
from mmafm.compress.palettize import astc_compress


def test_block_format_is_128_bits_per_36_weights():
    weight = torch.randn(60, 96) * 0.02
    blocks, value_range = encode_blocks(weight)
    assert blocks.shape == (10 * 16, 16) and blocks.dtype == torch.uint8  # 16 bytes = 128 bits per block
    module = ASTCLinear(96, 60)
    assert module.storage_bits() == closed_form_matrix_bits(60, 96, "astc") == 160 * 128 + 64
    assert (module.storage_bits() - 64) / (60 * 96) == pytest.approx(3.5556, abs=1e-4)
    # ragged edges pad to whole blocks
    assert encode_blocks(torch.randn(7, 13))[0].shape == (2 * 3, 16)
    assert decode_blocks(*encode_blocks(torch.randn(7, 13)), 7, 13).shape == (7, 13)


def test_encoder_near_the_best_endpoints_and_levels():
    torch.manual_seed(0)
    weight = torch.randn(12, 12) * 0.02
    blocks, _ = encode_blocks(weight)
    unit = (astc._blocks_of(weight.double()) - weight.min()) / (weight.max() - weight.min())
    e0, e1, levels = astc._unpack(blocks)
    all_e0, all_e1 = (t.flatten() for t in torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij"))
    for block in range(2):
        target = unit[block].expand(all_e0.shape[0], 36)
        best = ((astc._interpolate(all_e0, all_e1, astc._assign(target, all_e0, all_e1)) - target) ** 2).sum(1).min()
        ours = ((astc._interpolate(e0[block:block + 1], e1[block:block + 1], levels[block:block + 1]) - unit[block]) ** 2).sum()
        assert ours <= 1.15 * best + 1e-12, (block, ours, best)
    # decoding the packed blocks gives the values the encoder chose
    decoded = decode_blocks(blocks, encode_blocks(weight)[1], 12, 12)
    assert ((decoded - weight) ** 2).sum() / (weight ** 2).sum() < 0.1


def test_astc_model_round_trips_through_a_compressed_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=120, n_layers=1).eval()
    astc_compress(model)
    assert isinstance(model.layers[0].ffn.w_up, ASTCLinear)
    ids = torch.randint(0, 120, (1, 8))
    with torch.no_grad():
        reference = dequantized_copy(model)(ids)
        assert torch.allclose(model(ids), reference, atol=1e-5)
        path = save_compressed(tmp_path / "astc", model)
        assert torch.equal(mmafm.load_model(path)(ids), model(ids))
    assert 3.5 < bits_per_weight(model, include_embedding=False) < 3.6
