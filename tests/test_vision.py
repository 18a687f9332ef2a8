"""Vision encoders (ViT-g, ViTDet-L, Register-Window) against independent references.

References: a naive masked/looped implementation, timm's ``VisionTransformer`` and
``VisionTransformerSAM`` and open_clip's ``VisionTransformer`` with the same (tiny) shapes, and
closed-form parameter counts.
"""

from __future__ import annotations

from functools import partial

import open_clip.transformer
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

import mmafm
from mmafm.config import ConfigError
from mmafm.interop.timm_weights import WeightLoadError, load_timm_weights
from mmafm.layers.window import window_attention_mask
from mmafm.models.vitdet import DetBlock, ViTDetConfig
from mmafm.registry import UnknownModelError

torch.set_num_threads(2)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (zeros/ones inits would hide mapping mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (param == 1).float())
    return module.eval()


def _vision_presets() -> list[str]:
    return mmafm.list_models(family="vit") + mmafm.list_models(family="vitdet")


# --------------------------------------------------------------------------- windows and registers
@pytest.mark.parametrize("grid", [(6, 6), (5, 7)])  # (5, 7) needs padding to (6, 9)
def test_windowed_attention_equals_block_diagonal_global_attention(grid):
    torch.manual_seed(0)
    window, channels = 3, 32
    config = ViTDetConfig(img_size=96, embed_dim=channels, num_heads=4, mlp_dim=64, depth=2,
                          window_size=window, global_blocks=(1,), use_rel_pos=False)
    block = _randomize(DetBlock(config, window_size=window))
    x = torch.randn(2, *grid, channels)
    windowed = block.windowed_attention(x.flatten(1, 2), grid, num_registers=0)

    pad_h, pad_w = (-grid[0]) % window, (-grid[1]) % window  # zero tokens, as ViTDet pads
    padded = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    mask = window_attention_mask(grid[0] + pad_h, grid[1] + pad_w, window)
    reference = block.attn(padded.flatten(1, 2), mask=mask)
    reference = reference.view(2, grid[0] + pad_h, grid[1] + pad_w, channels)[:, : grid[0], : grid[1]]
    torch.testing.assert_close(windowed, reference.flatten(1, 2), atol=1e-5, rtol=1e-5)


def test_register_window_block_matches_a_per_window_loop():
    """Registers prepended to each window, attention per window, copies averaged (our reading)."""
    torch.manual_seed(0)
    config = mmafm.get_config("vitdet_large_patch16_rw_tiny")
    block = _randomize(DetBlock(config, window_size=config.window_size))
    window, regs, grid, channels = config.window_size, config.num_registers, (5, 7), config.embed_dim
    tokens = torch.randn(2, regs + grid[0] * grid[1], channels)
    out = block.windowed_attention(tokens, grid, regs)

    patches = F.pad(tokens[:, regs:].view(2, *grid, channels), (0, 0, 0, 2, 0, 1))  # to (6, 9)
    expected_patches = torch.zeros_like(patches)
    expected_regs = torch.zeros(2, regs, channels)
    for b in range(2):
        for i in range(0, 6, window):
            for j in range(0, 9, window):
                local = patches[b, i : i + window, j : j + window].reshape(-1, channels)
                seq = torch.cat([tokens[b, :regs], local])[None]
                attended = block.attn(seq, grid=(window, window))[0]
                expected_regs[b] += attended[:regs] / 6  # 2 x 3 windows
                expected_patches[b, i : i + window, j : j + window] = attended[regs:].view(window, window, -1)
    torch.testing.assert_close(out[:, :regs], expected_regs, atol=1e-5, rtol=1e-5)
    expected = expected_patches[:, : grid[0], : grid[1]].flatten(1, 2)
    torch.testing.assert_close(out[:, regs:], expected, atol=1e-5, rtol=1e-5)


def test_register_window_with_zero_registers_equals_plain_vitdet():
    plain = _randomize(mmafm.create_model("vitdet_large_patch16_tiny"))
    rw = mmafm.create_model("vitdet_large_patch16_rw_tiny", num_registers=0).eval()
    rw.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(rw.forward_features(x), plain.forward_features(x), atol=0, rtol=0)


def test_registers_receive_gradient_and_reach_every_window():
    model = mmafm.create_model("vitdet_large_patch16_rw_tiny")
    x = torch.randn(2, 3, 112, 112)
    model(x).square().mean().backward()
    assert model.registers.grad is not None and model.registers.grad.abs().sum() > 0

    # block 0 is windowed: changing the registers must change patches in every window
    with torch.no_grad():
        tokens, grid = model._embed(x)
        before = model.blocks[0](tokens, grid, model.num_registers)
        shifted = tokens.clone()
        shifted[:, : model.num_registers] += 1.0
        after = model.blocks[0](shifted, grid, model.num_registers)
    changed = (after - before)[:, model.num_registers :].abs().sum(-1)  # (B, H*W)
    assert model.blocks[0].window_size and bool((changed > 0).all())


# ----------------------------------------------------------------------- parity with timm/open_clip
def _timm_vit(img_size: int = 56, dynamic: bool = False) -> TimmViT:
    return TimmViT(
        img_size=img_size, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=176 / 64,
        pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5), num_classes=10,
        global_pool="token", dynamic_img_size=dynamic,
    )


def test_vit_matches_timm_vision_transformer():
    reference = _randomize(_timm_vit(dynamic=True))
    model = mmafm.create_model("vit_giant_patch14_tiny", num_classes=10).eval()
    report = load_timm_weights(model, reference.state_dict(), strict=True)
    assert report.source == "timm" and not report.missing and not report.unexpected
    with torch.no_grad():
        for size in (56, 84):  # 84: position embeddings resampled at run time by both
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)

    resized = mmafm.create_model("vit_giant_patch14_tiny", num_classes=10, img_size=84).eval()
    report = load_timm_weights(resized, reference.state_dict(), strict=True)
    assert report.resampled == ["pos_embed"]
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), reference(x), atol=1e-5, rtol=1e-5)


def test_vit_matches_open_clip_visual_tower():
    reference = _randomize(open_clip.transformer.VisionTransformer(
        image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=2.75, output_dim=32,
    ))
    model = mmafm.create_model("vit_giant_patch14_tiny", num_classes=32).eval()
    full_clip = {f"visual.{k}": v for k, v in reference.state_dict().items()}
    full_clip["token_embedding.weight"] = torch.zeros(5, 4)  # a text-tower key, to be ignored
    report = load_timm_weights(model, full_clip, strict=True)
    assert report.source == "open_clip" and report.ignored == ["token_embedding.weight"]
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def _timm_sam(neck_chans: int | None, img_size: int = 112) -> VisionTransformerSAM:
    return VisionTransformerSAM(
        img_size=img_size, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
        window_size=3, global_attn_indexes=(1, 3), use_rel_pos=True, neck_chans=neck_chans,
        num_classes=0,
    )


@pytest.mark.parametrize("neck", [0, 32])
def test_vitdet_matches_timm_samvit(neck):
    reference = _randomize(_timm_sam(neck or None))
    model = mmafm.create_model("vitdet_large_patch16_tiny", neck_channels=neck).eval()
    report = load_timm_weights(model, reference.state_dict(), strict=True)
    assert report.source == "timm" and not report.missing and not report.unexpected
    with torch.no_grad():
        for size in (112, 144):  # 7x7 grid (padded windows) and 9x9 (resampled positions)
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 3, 112, 112)
        ours = model.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        theirs = reference.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # an original SAM checkpoint (image_encoder.*, mlp.lin1) into a 144-pixel model
    sam = {f"image_encoder.{k}".replace("mlp.fc", "mlp.lin"): v for k, v in reference.state_dict().items()}
    sam["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 4)
    resized = mmafm.create_model("vitdet_large_patch16_tiny", neck_channels=neck, img_size=144).eval()
    report = load_timm_weights(resized, sam, strict=True)
    assert report.source == "sam" and report.ignored == ["prompt_encoder.point_embeddings.0.weight"]
    assert report.resampled == ["blocks.1.attn.rel_pos_h", "blocks.1.attn.rel_pos_w",
                                "blocks.3.attn.rel_pos_h", "blocks.3.attn.rel_pos_w", "pos_embed"]
    x = torch.randn(2, 3, 144, 144)
    with torch.no_grad():
        torch.testing.assert_close(resized.forward_features(x), reference.forward_features(x), atol=1e-5, rtol=1e-5)


def test_rw_model_loads_samvit_weights_with_only_registers_missing():
    reference = _timm_sam(None)
    model = mmafm.create_model("vitdet_large_patch16_rw_tiny")
    report = load_timm_weights(model, reference.state_dict())
    assert report.missing == ["registers"] and report.unexpected == []
    with pytest.raises(WeightLoadError, match="registers"):
        load_timm_weights(model, reference.state_dict(), strict=True)


def test_sam_neck_into_a_model_without_neck_is_reported_by_name():
    model = mmafm.create_model("vitdet_large_patch16_tiny")  # neck_channels=0: channel LayerNorm
    report = load_timm_weights(model, _timm_sam(32).state_dict())
    assert report.missing == ["neck.bias", "neck.weight"]
    assert report.unexpected == ["neck.0.weight", "neck.1.bias", "neck.1.weight", "neck.2.weight",
                                 "neck.3.bias", "neck.3.weight"]


def test_shape_mismatch_names_key_and_expected_shape():
    model = mmafm.create_model("vitdet_large_patch16_tiny", embed_dim=32, num_heads=2)
    with pytest.raises(WeightLoadError, match=r"patch_embed.proj.weight: checkpoint \(64, 3, 16, 16\), model expects \(32, 3, 16, 16\)"):
        load_timm_weights(model, _timm_sam(None).state_dict())


# ------------------------------------------------------------------------- parameter counts (meta)
def _vit_param_count(width, depth, mlp, patch, grid, class_token=True, pre_norm=False, patch_bias=True):
    block = 2 * 2 * width + 4 * width * width + 4 * width + 2 * width * mlp + mlp + width
    stem = 3 * patch * patch * width + (width if patch_bias else 0)
    stem += (grid * grid + class_token) * width + class_token * width + (2 * width if pre_norm else 0)
    return stem + depth * block + 2 * width


def test_vit_giant_parameter_count():
    # ViT-g/14 at 448 (32x32 grid), CLIP layout: 40 x 25,250,176 (blocks) + 827,904 (patches)
    # + 1,443,200 (1025 positions) + 1,408 (CLS) + 2 x 2,816 (ln_pre, final norm) = 1,012,285,184
    expected = _vit_param_count(1408, 40, 6144, 14, 32, pre_norm=True, patch_bias=False)
    assert expected == 1_012_285_184
    model = mmafm.create_model("vit_giant_patch14", device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert abs(expected - 1.01e9) / 1.01e9 < 0.02  # REFERENCE.md: ViT-g ~1B (issue: ~1.01B)


def test_vitdet_large_parameter_count():
    width, head_dim, grid = 1024, 64, 28  # 448 / 16
    rel_pos = 20 * 2 * (2 * 14 - 1) * head_dim + 4 * 2 * (2 * grid - 1) * head_dim  # windowed + global
    expected = _vit_param_count(width, 24, 4096, 16, grid, class_token=False) + rel_pos
    assert expected == 303_998_976  # final norm counted once: it is the LayerNorm2d neck
    model = mmafm.create_model("vitdet_large_patch16", device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected
    rw = mmafm.create_model("vitdet_large_patch16_rw", device="meta")
    assert sum(p.numel() for p in rw.parameters()) == expected + rw.config.num_registers * width
    assert abs(expected - 300e6) / 300e6 < 0.02  # REFERENCE.md: ViTDet-L ~300M


# ---------------------------------------------------------------------------- every preset, swept
@pytest.mark.parametrize("name", _vision_presets())
def test_every_vision_preset(name):
    if not name.endswith("_tiny"):
        model = mmafm.create_model(name, device="meta")
        assert all(p.is_meta for p in model.parameters())
        size = 224
        x = torch.empty(2, 3, size, size, device="meta")
        features = model.forward_features(x)
        assert features.shape[0] == 2 and model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        return
    model = mmafm.create_model(name, num_classes=7)
    config = model.config
    size = config.img_size
    x = torch.randn(2, config.in_chans, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()} | {"registers", "cls_token"}

    grid = size // config.patch_size
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=2)
        assert len(maps) == 2 and all(m.shape == (2, config.embed_dim, grid, grid) for m in maps)
        scales = (4, 2, 1, 0.5)[-min(config.depth, 4) :]  # strides 4/8/16/32 from the last blocks
        pyramid = model.forward_intermediates(x, indices=len(scales), scales=scales, intermediates_only=True)
        expected = {4: 4 * grid, 2: 2 * grid, 1: grid, 0.5: (grid + 1) // 2}
        assert [m.shape[-1] for m in pyramid] == [expected[s] for s in scales]
        with pytest.raises(ValueError, match="one factor per returned block"):
            model.forward_intermediates(x, indices=1, scales=(2, 1))


@pytest.mark.parametrize("name", ["vit_giant_patch14_tiny", "vitdet_large_patch16_rw_tiny"])
def test_report_resolutions(name):
    """224, 448 and 672 pixels (REFERENCE.md: pretraining 448, stage 2 672, rapid mode 224)."""
    model = mmafm.create_model(name).eval()
    patch = model.config.patch_size
    with torch.no_grad():
        for size in (224, 448, 672):  # 224 / 14 = 16, 448 / 16 = 28, 672 = 48 x 14 = 42 x 16
            grid = size // patch
            assert model.forward_intermediates(torch.randn(1, 3, size, size), indices=1,
                                               intermediates_only=True)[0].shape[-2:] == (grid, grid)


def test_672_tiles_of_a_1344_image():
    """High-res mode: a 1344 image as 2x2 tiles of 672, one batch through the encoder."""
    model = mmafm.create_model("vit_giant_patch14_tiny").eval()
    image = torch.randn(1, 3, 1344, 1344)
    tiles = image.unfold(2, 672, 672).unfold(3, 672, 672)  # (1, 3, 2, 2, 672, 672)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(4, 3, 672, 672)
    torch.testing.assert_close(tiles[1], image[0, :, :672, 672:])  # row-major tile order
    with torch.no_grad():
        features = model.forward_features(tiles)
    assert features.shape == (4, 1 + 48 * 48, model.num_features)


def test_flip_masking_keeps_a_random_share_of_patches():
    model = mmafm.create_model("vit_giant_patch14_tiny", mask_ratio=0.5)
    x = torch.randn(2, 3, 56, 56)  # 16 patches
    model.train()
    masked = model.forward_features(x)
    assert masked.shape == (2, 1 + 8, 64)
    masked.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    model.eval()
    assert model.forward_features(x).shape == (2, 1 + 16, 64)
    assert model.forward_features(x, mask_ratio=0.75).shape == (2, 1 + 4, 64)


@pytest.mark.parametrize("name", ["vit_giant_patch14_tiny", "vitdet_large_patch16_rw_tiny"])
def test_grad_checkpointing_gives_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = mmafm.create_model(name)
    x = torch.randn(1, 3, model.config.img_size, model.config.img_size)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- encoder interface
def _probed_tokens(model, views):
    """What the multimodal model computed before ``forward_grid`` existed (its probing code,
    kept verbatim as the reference): encoder tokens, prefix first, and the grid."""
    patch = model.config.patch_size
    grid = (views.shape[-2] // patch, views.shape[-1] // patch)
    if hasattr(model, "forward_tokens"):  # ViTDet: registers + feature map (neck applied)
        registers, feature_map = model.forward_tokens(views)
        feature_map = model.neck(feature_map)
        patches = feature_map.flatten(2).transpose(1, 2)
        if registers.shape[-1] == patches.shape[-1]:
            return torch.cat([registers, patches], dim=1), grid
        return patches, grid
    return model.forward_features(views, mask_ratio=0.0), grid


@pytest.mark.parametrize(
    "name, overrides, size, prefix",
    [
        ("vit_giant_patch14_tiny", {}, (56, 42), 1),  # [CLS]
        ("vit_giant_patch14_tiny", {"mask_ratio": 0.5}, (56, 56), 1),  # training forward: not masked
        ("vit_base_patch16_tiny", {"class_token": False}, (64, 48), 0),  # no prefix
        ("vitdet_large_patch16_rw_tiny", {}, (112, 80), 2),  # registers, window padding
        ("vitdet_large_patch16_tiny", {}, (112, 112), 0),  # plain ViTDet
        ("vitdet_large_patch16_rw_tiny", {"neck_channels": 32}, (96, 96), 0),  # neck changes the width
        ("vitdet_large_patch16_rw_tiny", {"neck_channels": 64}, (96, 96), 2),  # conv neck, same width
    ],
)
def test_forward_grid_equals_the_old_probing_path(name, overrides, size, prefix):
    model = _randomize(mmafm.create_model(name, **overrides)).train()
    views = torch.randn(2, 3, *size)
    patch = model.config.patch_size
    grid = (size[0] // patch, size[1] // patch)
    torch.manual_seed(0)
    head, patches, grid_hw = model.forward_grid(views)
    torch.manual_seed(0)
    reference, reference_grid = _probed_tokens(model, views)
    assert grid_hw == reference_grid == grid
    assert head.shape == (2, prefix, model.num_features)
    assert patches.shape == (2, grid[0] * grid[1], model.num_features)
    assert torch.equal(torch.cat([head, patches], dim=1), reference)
    # and the grid tokens are forward_features' patch tokens / feature map, in row-major order
    model.eval()
    with torch.no_grad():
        head, patches, _ = model.forward_grid(views)
        features = model.forward_features(views)
    if features.ndim == 4:  # ViTDet: (B, F, Gh, Gw)
        assert features.shape[-2:] == grid
        assert torch.equal(patches, features.flatten(2).transpose(1, 2))
    else:  # ViT: (B, P + N, C)
        assert torch.equal(patches, features[:, model.num_prefix_tokens :])
        assert torch.equal(head, features[:, : model.num_prefix_tokens])


@pytest.mark.parametrize("name", _vision_presets())
def test_every_vision_preset_is_a_grid_encoder(name):
    from mmafm.models.adapter import GridEncoder

    model = mmafm.create_model(name, device="meta")
    assert isinstance(model, GridEncoder)
    patch = model.config.patch_size
    head, patches, grid = model.forward_grid(torch.empty(1, 3, 4 * patch, 3 * patch, device="meta"))
    assert grid == (4, 3) and patches.shape == (1, 12, model.num_features)
    assert head.shape == (1, model.num_prefix_tokens, model.num_features)


def test_timm_create_model_builds_mmafm_encoders():
    model = timm.create_model("mmafm_vitdet_large_patch16_rw_tiny", num_classes=3)
    assert type(model).__name__ == "VisionTransformerDet" and model.num_registers == 2
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 3)
    assert "mmafm_vit_giant_patch14" in timm.list_models("mmafm_*")
    with pytest.raises(ValueError, match="pretrained=False expected"):
        timm.create_model("mmafm_vit_giant_patch14_tiny", pretrained=True)


# -------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_errors_naming_the_expected_value():
    vit = mmafm.create_model("vit_giant_patch14_tiny")
    det = mmafm.create_model("vitdet_large_patch16_tiny")
    with pytest.raises(ValueError, match="expected 3 input channels"):
        vit(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        vit(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="multiples of 16"):
        det(torch.randn(1, 3, 112, 120))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        det(torch.randn(3, 112, 112))
    with pytest.raises(UnknownModelError, match="vit_gigantic_patch14"):
        mmafm.create_model("vit_gigantic_patch14")
    with pytest.raises(ConfigError, match="num_registers"):
        mmafm.create_model("vitdet_large_patch16_rw_tiny", num_registers=-1)
    with pytest.raises(ConfigError, match="register_merge"):
        mmafm.create_model("vitdet_large_patch16_rw_tiny", register_merge="median")
    with pytest.raises(ValueError, match="global_blocks"):
        mmafm.create_model("vitdet_large_patch16_tiny", global_blocks=(1, 9))
    with pytest.raises(ValueError, match="multiple of patch_size 14"):
        mmafm.create_model("vit_giant_patch14_tiny", img_size=100)


def test_summary_flops_match_the_closed_form_count():
    """ViT-g/14 at 224: 257 tokens; per block 2T(4d^2 + 2d*mlp) matmul + 4T^2 d attention FLOPs."""
    rows = mmafm.models.vit.vision_encoder_summary(["vit_giant_patch14"], (224,))
    tokens, width, mlp, patches = 257, 1408, 6144, 256
    block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    stem = 2 * patches * (3 * 14 * 14) * width
    assert rows[0]["tokens@224"] == tokens
    assert rows[0]["GFLOPs@224"] == pytest.approx((40 * block + stem) / 1e9, rel=1e-9)


def test_attention_maps_for_figures_are_consistent_with_the_model():
    from mmafm.models.vitdet import _attention_probs

    model = _randomize(mmafm.create_model("vitdet_large_patch16_rw_tiny"))
    x = torch.randn(1, 3, 112, 112)  # 7x7 grid, 3x3 windows
    weights, share = model.attention_map(x, 0, query=(4, 5))  # block 0 windowed; window rows/cols 3..5
    inside = torch.zeros(7, 7, dtype=torch.bool)
    inside[3:6, 3:6] = True
    assert weights[0][~inside].abs().max() == 0
    torch.testing.assert_close(weights[0][inside].sum() + share[0].sum(), torch.tensor(1.0))
    weights, share = model.attention_map(x, 1, query="register")  # block 1 global
    torch.testing.assert_close(weights.sum() + share.sum(), torch.tensor(1.0))

    # the explicit softmax used for figures reproduces the SDPA block output
    attn, tokens = model.blocks[1].attn, torch.randn(2, 2 + 49, 64)
    probs = _attention_probs(attn, tokens, (7, 7))  # (B, H, N, N)
    v = attn.qkv(tokens).view(2, 51, 3, 4, 16)[:, :, 2].transpose(1, 2)
    explicit = attn.proj((probs @ v).transpose(1, 2).reshape(2, 51, 64))
    torch.testing.assert_close(explicit, attn(tokens, grid=(7, 7)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside the 7x7 patch grid"):
        model.attention_map(x, 0, query=(7, 0))
