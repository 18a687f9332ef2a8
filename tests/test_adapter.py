"""The vision-language adapter and the resolution modes, against closed-form numbers and a naive
re-implementation (explicit loops for the pooling, ``F.conv2d`` for the convolution)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmafm.models.adapter import (
    MODES,
    VisionLanguageAdapter,
    VLAdapterConfig,
    make_views,
    prepare_images,
    resolution_mode,
    tile_images,
    view_names,
)


def test_token_counts_per_mode_closed_form():
    """REFERENCE.md: rapid 224 -> 9, balanced 672 -> 144, high-res 1344 = 5 x 144 = 720."""
    config = VLAdapterConfig()
    expected = {"rapid": (224, 1, 9), "balanced": (672, 1, 144), "high_res": (1344, 5, 720)}
    for name in MODES:
        mode = resolution_mode(config, name)
        size, views, tokens = expected[name]
        assert (mode.image_size, mode.num_views, mode.num_tokens) == (size, views, tokens)
        assert mode.view_size == (224 if name == "rapid" else 672)
    with pytest.raises(ValueError, match="unknown resolution mode 'fast'"):
        resolution_mode(config, "fast")


@pytest.mark.parametrize(
    "patch, size, tokens",
    [(16, 224, 9), (16, 672, 144), (14, 224, 9), (14, 672, 144)],  # ViTDet-L/16 and ViT-g/14 grids
)
def test_adapter_real_grids_give_the_mode_token_counts(patch, size, tokens):
    config = VLAdapterConfig(vision_dim=16, text_dim=8, num_heads=2)
    adapter = VisionLanguageAdapter(config)
    grid = (size // patch, size // patch)
    features = torch.randn(1, 1 + grid[0] * grid[1], 16)  # one prefix token ([CLS] / register)
    with torch.no_grad():
        out = adapter(features, grid, tokens)
    assert out.shape == (1, tokens, 8)


def _naive_adaptive_pool(feature_map: torch.Tensor, side: int) -> torch.Tensor:  # (B, C, side, side)
    """Average over bins [floor(i * H / s), ceil((i + 1) * H / s)), written with loops."""
    height, width = feature_map.shape[-2:]
    out = torch.empty(*feature_map.shape[:2], side, side)
    for i in range(side):
        top, bottom = (i * height) // side, math.ceil((i + 1) * height / side)
        for j in range(side):
            left, right = (j * width) // side, math.ceil((j + 1) * width / side)
            out[:, :, i, j] = feature_map[:, :, top:bottom, left:right].mean(dim=(-2, -1))
    return out


@pytest.mark.parametrize("grid, tokens, prefix", [((7, 7), 9, 2), ((8, 6), 4, 0), ((6, 6), 9, 1)])
def test_adapter_matches_naive_reference(grid, tokens, prefix):
    config = VLAdapterConfig(vision_dim=24, text_dim=12, num_heads=3, mlp_ratio=2.0)
    adapter = VisionLanguageAdapter(config).eval()
    torch.nn.init.normal_(adapter.conv.bias)
    features = torch.randn(2, prefix + grid[0] * grid[1], 24)
    with torch.no_grad():
        out = adapter(features, grid, tokens)

        block = adapter.block
        hidden = features + block.attn(block.norm1(features))
        hidden = hidden + block.mlp(block.norm2(hidden))
        patches = hidden[:, prefix:] @ adapter.proj.weight.T + adapter.proj.bias  # (B, N, D)
        feature_map = patches.reshape(2, *grid, 12).permute(0, 3, 1, 2)  # (B, D, Gh, Gw)
        feature_map = F.conv2d(feature_map, adapter.conv.weight, adapter.conv.bias, padding=1)
        side = math.isqrt(tokens)
        expected = _naive_adaptive_pool(feature_map, side).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_adapter_prefix_tokens_reach_the_output_through_attention_only():
    """The prefix is seen by the transformer layer, then dropped: changing it changes the output,
    and the output keeps exactly the pooled grid's tokens."""
    adapter = VisionLanguageAdapter(VLAdapterConfig(vision_dim=16, text_dim=8, num_heads=2)).eval()
    grid_tokens = torch.randn(1, 36, 16)
    with torch.no_grad():
        plain = adapter(grid_tokens, (6, 6), 9)
        with_prefix = adapter(torch.cat([torch.randn(1, 1, 16), grid_tokens], 1), (6, 6), 9)
    assert plain.shape == with_prefix.shape == (1, 9, 8)
    assert not torch.allclose(plain, with_prefix)


def test_tiling_order_and_overview():
    """Tiles row-major (top-left, top-right, bottom-left, bottom-right) then the overview."""
    image = torch.zeros(1, 3, 8, 8)
    for index, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        image[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = index + 1
    tiles = tile_images(image, 2)
    assert [int(t.unique()) for t in tiles] == [1, 2, 3, 4]

    config = VLAdapterConfig(vision_dim=8, text_dim=8, num_heads=1, balanced_size=4)
    mode = resolution_mode(config, "high_res")
    pictures = torch.randn(2, 3, 8, 8)
    views = make_views(pictures, mode)
    assert views.shape == (2 * 5, 3, 4, 4) and mode.num_views == 5
    assert view_names(mode) == ["tile(0,0)", "tile(0,1)", "tile(1,0)", "tile(1,1)", "overview"]
    for n in range(2):  # image-major: image n owns views 5n .. 5n + 4
        torch.testing.assert_close(views[5 * n + 1], pictures[n, :, :4, 4:])  # top-right
        torch.testing.assert_close(views[5 * n + 2], pictures[n, :, 4:, :4])  # bottom-left
        overview = F.interpolate(pictures[n : n + 1], size=(4, 4), mode="bilinear", antialias=True)
        torch.testing.assert_close(views[5 * n + 4], overview[0])
    assert view_names(resolution_mode(config, "balanced")) == ["image"]


def test_high_res_without_overview_and_three_tiles():
    config = VLAdapterConfig(vision_dim=8, text_dim=8, num_heads=1, balanced_size=4, high_res_tiles=3,
                             high_res_overview=False, num_image_tokens=4)
    mode = resolution_mode(config, "high_res")
    assert (mode.image_size, mode.num_views, mode.num_tokens) == (12, 9, 36)
    assert make_views(torch.randn(1, 3, 12, 12), mode).shape == (9, 3, 4, 4)


def test_prepare_images_rejects_small_and_resizes_large():
    mode = resolution_mode(VLAdapterConfig(), "balanced")
    with pytest.raises(ValueError, match=r"224x224 is too small for resolution mode 'balanced'.*672x672"):
        prepare_images(torch.zeros(1, 3, 224, 224), mode)
    small_mode = resolution_mode(VLAdapterConfig(rapid_size=8), "rapid")
    resized = prepare_images(torch.ones(2, 3, 16, 20), small_mode)
    assert resized.shape == (2, 3, 8, 8)
    torch.testing.assert_close(resized, torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        prepare_images(torch.zeros(3, 8, 8), small_mode)


def test_bad_configs_and_grids_are_named():
    with pytest.raises(ValueError, match="num_image_tokens must be a perfect square.*143"):
        VLAdapterConfig(num_image_tokens=143)
    with pytest.raises(ValueError, match="conv_kernel must be odd"):
        VLAdapterConfig(conv_kernel=2)
    adapter = VisionLanguageAdapter(VLAdapterConfig(vision_dim=8, text_dim=8, num_heads=1))
    with pytest.raises(ValueError, match=r"patch grid 2x2 is smaller than the 3x3 pooled output"):
        adapter(torch.randn(1, 4, 8), (2, 2), 9)
    with pytest.raises(ValueError, match="expected at least 16"):
        adapter(torch.randn(1, 10, 8), (4, 4), 4)
