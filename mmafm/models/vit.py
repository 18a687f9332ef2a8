"""Plain Vision Transformer: the 2025 server image encoder ViT-g/14 (REFERENCE.md, "Vision encoders").

ViT-g/14 [paper ~1B params; code "g14-paper"]: 40 pre-LN blocks of width 1408, 16 heads, MLP
6144, 14-pixel patches -- the shape of open_clip's ``ViT-g-14`` and timm's
``vit_giant_patch14_clip_224``, whose weights load here through
:mod:`mmafm.interop.timm_weights`. Parameter and buffer names follow timm's ``VisionTransformer``.

Contrastive pretraining runs at 448x448 with FLIP-style random patch masking [2nd]: with
``mask_ratio > 0`` a training forward keeps a random ``1 - mask_ratio`` of the patch tokens per
image (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"). Any resolution that is a
multiple of the patch works; the position embeddings are resampled bicubically.

Also here: ViT-B/16 and ViT-L/16 presets (timm's shapes, used by the speed benchmark and as small
CLIP towers), :func:`vision_encoder_summary` (params, tokens, FLOPs per resolution) and
:func:`demo_image` (a bundled photograph for figures).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.utils.checkpoint
from torch import nn

from mmafm.interop.timm_weights import register_timm_entrypoint
from mmafm.layers.mlp import Mlp
from mmafm.layers.patch import (
    PatchEmbed,
    resample_feature_map,
    resample_pos_embed_tokens,
    take_indices,
)
from mmafm.layers.vision_attention import Attention
from mmafm.layers.init import trunc_normal_linears_
from mmafm.registry import register_model

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "Block",
    "drop_path",
    "random_masking",
    "vision_encoder_summary",
]


@dataclass
class ViTConfig:
    """A plain ViT. Defaults are ViT-B/16 as in timm; presets below change what differs."""

    img_size: int = field(default=224, metadata={"min": 1})  # pretraining side; pos-embed grid = img_size // patch_size, other sizes resample it
    patch_size: int = field(default=16, metadata={"min": 1})  # pixels per patch side
    in_chans: int = field(default=3, metadata={"min": 1})  # image channels
    embed_dim: int = field(default=768, metadata={"min": 1})  # model width
    depth: int = field(default=12, metadata={"min": 1})  # transformer blocks
    num_heads: int = field(default=12, metadata={"min": 1})  # attention heads (embed_dim divisible by it)
    mlp_dim: int = field(default=3072, metadata={"min": 1})  # MLP hidden width
    qkv_bias: bool = True  # bias on the fused qkv projection
    class_token: bool = True  # prepend a learned [CLS] token (its own position embedding row)
    pre_norm: bool = False  # LayerNorm after embedding, before the blocks (CLIP's ln_pre)
    patch_bias: bool = True  # bias of the patch projection (CLIP's conv1 has none)
    norm_eps: float = field(default=1e-6, metadata={"min": 0.0})  # LayerNorm eps (timm 1e-6, open_clip 1e-5)
    global_pool: str = field(default="token", metadata={"choices": ("token", "avg")})  # forward_head pooling: [CLS] or mean of patches
    num_classes: int = field(default=0, metadata={"min": 0})  # head output width; 0 = no head (features)
    drop_path_rate: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # stochastic depth, linear over blocks
    mask_ratio: float = field(default=0.0, metadata={"min": 0.0, "max": 0.95})  # FLIP: share of patches dropped in training forwards [open: FLIP uses 0.5]

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


def random_masking(
    tokens: torch.Tensor,  # (B, N, C)
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, K, C), (B, K)
    """Keep a random ``K = round(N * (1 - mask_ratio))`` tokens per sample (FLIP / MAE).

    Returns the kept tokens, in their original order, and their indices.
    """
    batch, length, channels = tokens.shape
    num_keep = max(1, int(round(length * (1 - mask_ratio))))
    noise = torch.rand(batch, length, device=tokens.device, generator=generator)
    keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values  # (B, K)
    return tokens.gather(1, keep[..., None].expand(batch, num_keep, channels)), keep


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: ViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.attn = Attention(config.embed_dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mlp = Mlp(config.embed_dim, config.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class TimmInterface:
    """The timm methods both vision families share (``self.config.patch_size``, ``self.head``,
    ``self.num_prefix_tokens``: [CLS] for ViT, registers for ViTDet-RW)."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens the blocks see for an unmasked ``height x width`` image (patches + prefix)."""
        patch = self.config.patch_size
        return (height // patch) * (width // patch) + self.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _collect_intermediates(
        self,
        tokens: torch.Tensor,
        taken: list[int],
        stop_early: bool,
        scales: tuple[float, ...] | list[float] | None,
        run_block: Callable[[int, torch.Tensor], torch.Tensor],
        take: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block loop of ``forward_intermediates``, written once for both families.

        Runs ``run_block(index, tokens)`` over the blocks (up to ``taken[-1]`` when
        ``stop_early``), keeps ``take(tokens)`` after each block in ``taken`` and, with
        ``scales``, resamples each kept map by its factor (a simple feature pyramid).

        Returns:
            The tokens after the last block run, and the kept intermediates.
        """
        last = taken[-1] if stop_early else len(self.blocks) - 1
        intermediates = []
        for index in range(last + 1):
            tokens = run_block(index, tokens)
            if index in taken:
                intermediates.append(take(tokens))
        if scales is not None:
            intermediates = [resample_feature_map(m, s) for m, s in zip(intermediates, scales)]
        return tokens, intermediates


class VisionTransformer(TimmInterface, nn.Module):
    """ViT with timm's model interface (``forward_features``, ``forward_head``,
    ``forward_intermediates``, ``set_grad_checkpointing``, ``no_weight_decay``) and mmafm's
    encoder interface :meth:`forward_grid`."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.num_features = self.embed_dim = config.embed_dim
        self.num_classes = config.num_classes
        self.num_prefix_tokens = int(config.class_token)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            config.patch_size, config.in_chans, config.embed_dim, bias=config.patch_bias
        )
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, config.embed_dim)) if config.class_token else None
        )
        num_positions = self.num_prefix_tokens + config.grid_size**2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, config.embed_dim))
        self.norm_pre = (
            nn.LayerNorm(config.embed_dim, eps=config.norm_eps) if config.pre_norm else nn.Identity()
        )
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.head = (
            nn.Linear(config.embed_dim, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) for linears and position embeddings."""
        trunc_normal_linears_(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    # ----------------------------------------------------------------------------- timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patches plus (resampled) position embeddings, without prefix tokens."""
        grid_tokens = self.patch_embed(x)  # (B, Gh, Gw, C)
        grid = tuple(grid_tokens.shape[1:3])
        stored = (self.config.grid_size,) * 2
        pos_embed = self.pos_embed
        if grid != stored:
            pos_embed = resample_pos_embed_tokens(pos_embed, grid, self.num_prefix_tokens, stored)
        tokens = grid_tokens.flatten(1, 2) + pos_embed[:, self.num_prefix_tokens :]  # (B, N, C)
        return tokens, grid

    def _add_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)  # (B, 1 + N, C)

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _encode(
        self, x: torch.Tensor, mask_ratio: float | None
    ) -> tuple[torch.Tensor, tuple[int, int]]:  # (B, P + N_kept, C), (Gh, Gw)
        """Tokens after the final norm (prefix first) and the unmasked patch grid."""
        tokens, grid = self._embed(x)
        ratio = (self.config.mask_ratio if self.training else 0.0) if mask_ratio is None else mask_ratio
        if ratio > 0:
            tokens, _ = random_masking(tokens, ratio)
        tokens = self.norm_pre(self._add_prefix(tokens))
        for index in range(len(self.blocks)):
            tokens = self._block(index, tokens)
        return self.norm(tokens), grid

    def forward_features(
        self, x: torch.Tensor, mask_ratio: float | None = None
    ) -> torch.Tensor:  # (B, P + N_kept, C)
        """Tokens after the final norm, prefix ([CLS]) first.

        Args:
            x: Images ``(B, in_chans, H, W)``, H and W multiples of the patch size.
            mask_ratio: FLIP masking ratio for this call; None uses ``config.mask_ratio`` in
                training mode and no masking in eval mode.
        """
        return self._encode(x, mask_ratio)[0]

    def forward_grid(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:  # (B, P, C), (B, Gh*Gw, C), (Gh, Gw)
        """The encoder interface the vision-language adapter reads (shared with ViTDet).

        Never masked, whatever ``config.mask_ratio`` and the training mode: FLIP masking drops
        patches, and a consumer of the grid needs every one of them in place.

        Args:
            x: Images ``(B, in_chans, H, W)``, H and W multiples of the patch size.

        Returns:
            ``(prefix, grid_tokens, (Gh, Gw))``: the [CLS] token (``(B, 0, C)`` without one) and
            the patch tokens in row-major grid order, both after the final norm, as
            :meth:`forward_features` returns them with ``mask_ratio=0``.
        """
        tokens, grid = self._encode(x, mask_ratio=0.0)  # (B, P + Gh*Gw, C)
        return tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :], grid

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of :meth:`forward_features` (``[CLS]`` or mean of patches) and
        apply the head unless ``pre_logits``."""
        if self.config.global_pool == "token":
            pooled = x[:, 0]
        else:
            pooled = x[:, self.num_prefix_tokens :].mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        scales: tuple[float, ...] | list[float] | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps of chosen blocks (timm's signature), never masked.

        Args:
            x: Images ``(B, in_chans, H, W)``.
            indices: None = every block, int n = the last n, or a list of block indices.
            norm: Apply the final norm to each intermediate.
            stop_early: Stop after the last requested block (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` maps or ``"NLC"`` token sequences (patch tokens only).
            intermediates_only: Return only the list.
            scales: One power-of-two factor per returned map (``NCHW`` only), e.g.
                ``(4, 2, 1, 0.5)`` for strides 4/8/16/32 from a /16 encoder: ViTDet's simple
                feature pyramid without its learned layers, for multi-scale consumers.

        Returns:
            The list of intermediates, or ``(final tokens after norm, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken = take_indices(len(self.blocks), indices)
        if scales is not None and (output_fmt != "NCHW" or len(scales) != len(taken)):
            raise ValueError(
                f"scales needs output_fmt='NCHW' and one factor per returned block "
                f"({len(taken)}), got {list(scales)} with {output_fmt!r}"
            )
        tokens, grid = self._embed(x)
        tokens = self.norm_pre(self._add_prefix(tokens))

        def take(tokens: torch.Tensor) -> torch.Tensor:
            out = self.norm(tokens) if norm else tokens
            out = out[:, self.num_prefix_tokens :]  # (B, N, C)
            if output_fmt == "NCHW":
                out = out.reshape(out.shape[0], *grid, -1).permute(0, 3, 1, 2)  # (B, C, Gh, Gw)
            return out

        tokens, intermediates = self._collect_intermediates(
            tokens, taken, stop_early and intermediates_only, scales, self._block, take
        )
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates


# --------------------------------------------------------------------------------------- presets
@register_model("vit_base_patch16", builder=VisionTransformer)
def vit_base_patch16() -> ViTConfig:
    """ViT-B/16 at 224 in timm's layout (``vit_base_patch16_224``): benchmark and small CLIP tower."""
    return ViTConfig()


@register_model("vit_large_patch16", builder=VisionTransformer)
def vit_large_patch16() -> ViTConfig:
    """ViT-L/16 at 224 in timm's layout (``vit_large_patch16_224``), ~304M params."""
    return replace(vit_base_patch16(), embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)


@register_model("vit_giant_patch14", builder=VisionTransformer)
def vit_giant_patch14() -> ViTConfig:
    """ViT-g/14, the 2025 server encoder [paper ~1B; code "g14-paper"], in open_clip's layout."""
    return replace(
        vit_base_patch16(),
        img_size=448,  # contrastive pretraining resolution [paper+2nd]; 224 weights load resampled
        patch_size=14,
        embed_dim=1408,
        depth=40,
        num_heads=16,
        mlp_dim=6144,
        pre_norm=True,  # open_clip ln_pre
        patch_bias=False,  # open_clip conv1 has no bias
        norm_eps=1e-5,  # torch LayerNorm default, as open_clip
    )


@register_model("vit_giant_patch14_tiny", builder=VisionTransformer)
def vit_giant_patch14_tiny() -> ViTConfig:
    """ViT-g/14's layout at toy size for CPU tests and the tiny pipeline."""
    return replace(vit_giant_patch14(), img_size=56, embed_dim=64, depth=2, num_heads=4, mlp_dim=176)


@register_model("vit_base_patch16_tiny", builder=VisionTransformer)
def vit_base_patch16_tiny() -> ViTConfig:
    """ViT-B/16's (timm) layout at toy size, mean-pooled, for a tiny CLIP tower."""
    return replace(
        vit_base_patch16(), img_size=64, embed_dim=64, depth=2, num_heads=4, mlp_dim=256,
        global_pool="avg",
    )


# ------------------------------------------------------------------------------ summary helpers
def vision_encoder_summary(
    names: list[str], resolutions: tuple[int, ...] = (224, 448, 672)
) -> list[dict]:
    """Params, tokens and forward FLOPs per resolution for vision presets, built on ``meta``.

    FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a meta-device
    forward of one image (matmuls, convolutions and attention; 1 multiply-add = 2 FLOPs).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from mmafm.registry import create_model

    rows = []
    for name in names:
        model = create_model(name, device="meta").eval()
        row = {"preset": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        patch = model.config.patch_size
        for resolution in resolutions:
            size = math.ceil(resolution / patch) * patch
            image = torch.empty(1, model.config.in_chans, size, size, device="meta")
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model.forward_features(image)
            row[f"tokens@{resolution}"] = model.num_tokens(size, size)
            row[f"GFLOPs@{resolution}"] = counter.get_total_flops() / 1e9
        rows.append(row)
    return rows


# Also buildable as timm.create_model("mmafm_<preset>") (mmafm/__init__.py imports this module).
for _name in (
    "vit_base_patch16", "vit_base_patch16_tiny", "vit_large_patch16", "vit_giant_patch14",
    "vit_giant_patch14_tiny",
):
    register_timm_entrypoint(_name)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_IMAGES = (  # photographs shipped by Debian packages (tuxpaint-stamps, openclipart-png)
    "/usr/share/tuxpaint/stamps/animals/mammals/bears/european-bear.png",
    "/usr/share/tuxpaint/stamps/animals/birds/helmeted_guineafowl.png",
    "/usr/share/openclipart/png/animals/bison_leif_lodahl_01.png",
)


def demo_image(size: int, path: str = "") -> tuple[torch.Tensor, torch.Tensor, str]:
    """A real picture for figures: ``path``, else the first bundled Debian photo found, else a
    procedurally drawn scene (said so in the returned description).

    Returns:
        ``(pixels (3, size, size) in [0, 1], normalized model input (1, 3, size, size),
        description of the source)``.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    from mmafm.data.images import fit_square, to_rgb

    candidates = [path] if path else list(DEMO_IMAGES)
    found = next((Path(p) for p in candidates if p and Path(p).is_file()), None)
    if path and found is None:
        raise FileNotFoundError(f"image_path {path!r} does not exist")
    if found is not None:
        image, source = fit_square(to_rgb(Image.open(found)), size), str(found)
    else:
        image = Image.new("RGB", (size, size), (135, 190, 235))  # sky
        draw = ImageDraw.Draw(image)
        s = size / 100
        draw.rectangle([0, 70 * s, size, size], fill=(90, 160, 70))  # grass
        draw.ellipse([70 * s, 8 * s, 90 * s, 28 * s], fill=(250, 210, 60))  # sun
        draw.rectangle([20 * s, 45 * s, 55 * s, 75 * s], fill=(180, 80, 60))  # house
        draw.polygon([(15 * s, 45 * s), (37.5 * s, 25 * s), (60 * s, 45 * s)], fill=(110, 50, 40))
        draw.rectangle([33 * s, 58 * s, 42 * s, 75 * s], fill=(70, 40, 30))  # door
        source = "procedurally drawn scene (no bundled Debian image found)"
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return pixels, ((pixels - mean) / std)[None], source
