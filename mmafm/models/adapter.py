"""Vision-language adapter and resolution modes: image features -> a fixed number of text-width tokens.

REFERENCE.md, "Vision-language adapter (2025)" [2nd, two sources agree]: the encoder's output goes
through **one transformer layer -> a linear projection to the text width -> a 3x3 convolution ->
average pooling to a fixed number of image tokens (144)**. The pooling is *adaptive*: the on-device
model offers three resolution modes with different token budgets,

==========  ==============================================  ================
mode        views the encoder sees                          image tokens
==========  ==============================================  ================
rapid       one 224x224 view, pooled to 3x3                 9
balanced    one 672x672 view, pooled to 12x12               144
high_res    a 1344x1344 image cut into 2x2 tiles of 672,    5 x 144 = 720
            plus the whole image resized to 672 (overview)
==========  ==============================================  ================

**View order** (our choice, [open]): an image's views are its tiles in row-major order (top-left,
top-right, bottom-left, bottom-right) followed by the overview, so in high-res mode image tokens
``[k * 144, (k + 1) * 144)`` come from view ``k`` of :func:`view_names`. Inside a view the tokens are
the pooled grid in row-major order.

Our readings of what the sources leave open, each a config field:

- the transformer layer is a pre-LayerNorm ViT block (attention + GELU MLP) at the *encoder* width,
  run over all encoder tokens including its prefix ([CLS] or Register-Window registers, which carry
  global context); the prefix tokens are dropped before the projection, since they have no place
  on the grid the convolution and the pooling need;
- the 3x3 convolution keeps the text width and pads by 1 ("same"), so it mixes neighbouring patches
  without shrinking the grid;
- images larger than a mode's size are resized (bilinear, antialiased) to it; smaller ones are an
  error, never silently upsampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mmafm.layers.mlp import Mlp
from mmafm.layers.vision_attention import Attention
from mmafm.layers.init import trunc_normal_linears_

__all__ = [
    "MODES",
    "GridEncoder",
    "VLAdapterConfig",
    "ResolutionMode",
    "resolution_mode",
    "AdapterBlock",
    "VisionLanguageAdapter",
    "tile_images",
    "make_views",
    "view_names",
    "prepare_images",
]

MODES = ("rapid", "balanced", "high_res")


@runtime_checkable
class GridEncoder(Protocol):
    """What the adapter needs from an image encoder; both vision families implement it
    (:class:`mmafm.models.vit.VisionTransformer`, :class:`mmafm.models.vitdet.VisionTransformerDet`).

    ``forward_grid(images)`` returns ``(prefix, grid_tokens, (Gh, Gw))``: prefix tokens
    ``(B, P, num_features)`` ([CLS] or Register-Window registers; ``P`` may be 0) and the patch
    tokens ``(B, Gh * Gw, num_features)`` in row-major grid order, after the encoder's final
    norm or neck, never masked. :meth:`VisionLanguageAdapter.forward` takes them concatenated,
    prefix first.
    """

    num_features: int  # width of the prefix and grid tokens

    def forward_grid(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Prefix tokens, grid tokens and the grid ``(Gh, Gw)`` of ``images`` ``(B, C, H, W)``."""


def _square_side(num_tokens: int, name: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{name} must be a perfect square (pooled to side x side), got {num_tokens}")
    return side


@dataclass
class VLAdapterConfig:
    """The adapter and the resolution modes. Defaults are the 2025 on-device numbers."""

    vision_dim: int = field(default=1024, metadata={"min": 1})  # encoder output width (ViTDet-L 1024, ViT-g 1408)
    text_dim: int = field(default=2048, metadata={"min": 1})  # text model width the image tokens are fed at
    num_heads: int = field(default=16, metadata={"min": 1})  # heads of the adapter's transformer layer [open: the encoder's]
    mlp_ratio: float = field(default=4.0, metadata={"min": 0.0})  # MLP hidden = mlp_ratio x vision_dim [open: ViT's 4]
    norm_eps: float = field(default=1e-6, metadata={"min": 0.0})  # LayerNorm eps of the transformer layer
    conv_kernel: int = field(default=3, metadata={"min": 1})  # the 3x3 convolution [2nd]; odd, "same" padding
    num_image_tokens: int = field(default=144, metadata={"min": 1})  # tokens per view, balanced and high-res [2nd]; a square
    rapid_image_tokens: int = field(default=9, metadata={"min": 1})  # tokens of the rapid mode [2nd]; a square
    rapid_size: int = field(default=224, metadata={"min": 1})  # rapid-mode image side [2nd]
    balanced_size: int = field(default=672, metadata={"min": 1})  # balanced-mode image side = high-res tile side [2nd]
    high_res_tiles: int = field(default=2, metadata={"min": 1})  # high-res tiles per side: image side = tiles x balanced_size [2nd: 2]
    high_res_overview: bool = True  # high-res adds the whole image at balanced_size as a last view [2nd]

    def __post_init__(self) -> None:
        _square_side(self.num_image_tokens, "num_image_tokens")
        _square_side(self.rapid_image_tokens, "rapid_image_tokens")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (same padding), got {self.conv_kernel}")
        if self.vision_dim % self.num_heads:
            raise ValueError(
                f"vision_dim {self.vision_dim} must be divisible by num_heads {self.num_heads}"
            )


@dataclass(frozen=True)
class ResolutionMode:
    """One resolution mode: how an image becomes views and how many tokens each view gives."""

    name: str
    image_size: int  # side the whole image is brought to
    view_size: int  # side of every view the encoder sees
    tiles_per_side: int  # 1 = the image is the single view
    overview: bool  # a last view: the whole image resized to view_size (only when tiled)
    tokens_per_view: int  # square number of pooled tokens per view

    @property
    def num_views(self) -> int:
        return self.tiles_per_side**2 + int(self.overview)

    @property
    def num_tokens(self) -> int:
        """Image tokens one image contributes to the text sequence."""
        return self.num_views * self.tokens_per_view

    @property
    def pooled_side(self) -> int:
        return math.isqrt(self.tokens_per_view)


def resolution_mode(config: VLAdapterConfig, name: str) -> ResolutionMode:
    """The :class:`ResolutionMode` called ``name`` (one of :data:`MODES`) under ``config``."""
    if name == "rapid":
        return ResolutionMode("rapid", config.rapid_size, config.rapid_size, 1, False, config.rapid_image_tokens)
    if name == "balanced":
        return ResolutionMode(
            "balanced", config.balanced_size, config.balanced_size, 1, False, config.num_image_tokens
        )
    if name == "high_res":
        tiles = config.high_res_tiles
        return ResolutionMode(
            "high_res", tiles * config.balanced_size, config.balanced_size, tiles,
            config.high_res_overview and tiles > 1, config.num_image_tokens,
        )
    raise ValueError(f"unknown resolution mode {name!r}; expected one of {list(MODES)}")


# ------------------------------------------------------------------------------ images -> views
def prepare_images(images: torch.Tensor, mode: ResolutionMode) -> torch.Tensor:  # (N, C, S, S)
    """Bring a batch of images to ``mode.image_size``; smaller images are an error.

    Args:
        images: ``(N, C, H, W)``; letterbox non-square pictures beforehand (e.g.
            :func:`mmafm.data.images.fit_square`) to keep their aspect ratio.
        mode: The resolution mode.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    size = mode.image_size
    if height < size or width < size:
        raise ValueError(
            f"image {height}x{width} is too small for resolution mode {mode.name!r}, which needs "
            f"at least {size}x{size}; pass a larger image or pick a mode with a smaller size"
        )
    if (height, width) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def tile_images(images: torch.Tensor, tiles_per_side: int) -> torch.Tensor:  # (N * t * t, C, H/t, W/t)
    """Cut every image into ``t x t`` equal tiles, image-major, tiles row-major inside an image.

    Tile ``(i, j)`` (row ``i``, column ``j``) of image ``n`` is output ``n * t * t + i * t + j``.
    """
    num, channels, height, width = images.shape
    t = tiles_per_side
    if height % t or width % t:
        raise ValueError(f"image {height}x{width} does not split into {t}x{t} equal tiles")
    tiles = images.view(num, channels, t, height // t, t, width // t)  # (N, C, i, h, j, w)
    return tiles.permute(0, 2, 4, 1, 3, 5).reshape(num * t * t, channels, height // t, width // t)


def make_views(images: torch.Tensor, mode: ResolutionMode) -> torch.Tensor:  # (N * V, C, s, s)
    """The encoder inputs of ``images`` under ``mode``, ``mode.num_views`` per image, image-major.

    Per image: the tiles in row-major order, then (if ``mode.overview``) the whole image resized to
    ``mode.view_size``; see :func:`view_names`.
    """
    images = prepare_images(images, mode)
    if mode.tiles_per_side == 1:
        return images
    num = images.shape[0]
    tiles = tile_images(images, mode.tiles_per_side)  # (N * t * t, C, s, s)
    tiles = tiles.view(num, mode.tiles_per_side**2, *tiles.shape[1:])
    if mode.overview:
        overview = F.interpolate(
            images, size=(mode.view_size, mode.view_size), mode="bilinear", antialias=True,
            align_corners=False,
        )
        tiles = torch.cat([tiles, overview[:, None]], dim=1)  # (N, V, C, s, s)
    return tiles.flatten(0, 1)


def view_names(mode: ResolutionMode) -> list[str]:
    """Names of one image's views in token order, e.g. ``["tile(0,0)", ..., "overview"]``."""
    if mode.tiles_per_side == 1:
        return ["image"]
    t = mode.tiles_per_side
    names = [f"tile({i},{j})" for i in range(t) for j in range(t)]
    return names + (["overview"] if mode.overview else [])


# ------------------------------------------------------------------------------------ the adapter
class AdapterBlock(nn.Module):
    """Pre-LN transformer layer at the encoder width: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionLanguageAdapter(nn.Module):
    """Encoder tokens of one view -> ``tokens_per_view`` tokens at the text width.

    transformer layer (encoder width) -> drop prefix tokens -> linear to ``text_dim`` ->
    ``conv_kernel`` x ``conv_kernel`` convolution on the patch grid -> adaptive average pooling to
    ``side x side``.
    """

    def __init__(self, config: VLAdapterConfig):
        super().__init__()
        self.config = config
        self.block = AdapterBlock(
            config.vision_dim, config.num_heads, int(config.mlp_ratio * config.vision_dim), config.norm_eps
        )
        self.proj = nn.Linear(config.vision_dim, config.text_dim)
        self.conv = nn.Conv2d(
            config.text_dim, config.text_dim, config.conv_kernel, padding=config.conv_kernel // 2
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated normal (std 0.02) for the linears, zero biases (as the ViT blocks)."""
        trunc_normal_linears_(self)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, P + Gh * Gw, vision_dim): P prefix tokens, then the grid row-major
        grid: tuple[int, int],
        num_tokens: int | None = None,
    ) -> torch.Tensor:  # (B, num_tokens, text_dim)
        """Adapt one batch of views.

        Args:
            tokens: Encoder output, prefix tokens (if any) first.
            grid: ``(Gh, Gw)`` patch grid of the view.
            num_tokens: Square number of output tokens; default ``config.num_image_tokens``.
        """
        num_tokens = num_tokens or self.config.num_image_tokens
        side = _square_side(num_tokens, "num_tokens")
        height, width = grid
        num_prefix = tokens.shape[1] - height * width
        if num_prefix < 0:
            raise ValueError(
                f"adapter got {tokens.shape[1]} tokens for a {height}x{width} grid; expected at "
                f"least {height * width}"
            )
        if height < side or width < side:
            raise ValueError(
                f"a view's patch grid {height}x{width} is smaller than the {side}x{side} pooled "
                f"output ({num_tokens} tokens); use larger images for this mode"
            )
        x = self.block(tokens)[:, num_prefix:]  # (B, Gh * Gw, Cv)
        x = self.proj(x)  # (B, Gh * Gw, D)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)  # (B, D, Gh, Gw)
        x = self.conv(x)
        x = F.adaptive_avg_pool2d(x, side)  # (B, D, side, side)
        return x.flatten(2).transpose(1, 2)  # (B, side * side, D)
