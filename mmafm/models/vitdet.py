"""ViTDet: the 2025 on-device image encoder, ViTDet-L/16, plain or with Register-Window attention.

REFERENCE.md, "Vision encoders": ViTDet-L [paper ~300M params; code "ViTDet L16"] is a plain ViT
(24 blocks, width 1024, 16 heads, 16-pixel patches) whose blocks attend inside 14x14 windows of
the patch grid except blocks 5, 11, 17 and 23, which attend globally (Li et al. 2022, "Exploring
Plain Vision Transformer Backbones for Object Detection"). Windows are zero-padded at the
bottom/right when the grid is not a multiple of 14. Like ViTDet and SAM we use decomposed
relative position biases and absolute position embeddings; module and parameter names follow
timm's ``samvit`` so ``samvit_large_patch16`` (SAM's ViT-L image encoder) weights load by name.

Register-Window (RW) [paper, wording only: "a global register token interacts with each local
window before the global aggregation, so windows see global context and the image keeps local
detail"]. The mechanics are not published; **our reading** (REFERENCE.md's "sound reading"):

1. ``num_registers`` learned register tokens start next to the patch tokens (no position
   embedding: they belong to no place in the image).
2. In a *windowed* block every window gets its own copy of the registers prepended, so each
   window's patches attend to the registers (global context in) and the registers attend to the
   window (local detail out). Afterwards the per-window copies are merged into one set per image
   (``register_merge``: mean by default, the reading in REFERENCE.md; element-wise max offered).
   Merging after *every* windowed block is what lets information written by one window reach all
   others in the next block, before any global block.
3. A *global* block attends over registers and patches together, like a ViT's [CLS] token.
4. Registers get no relative-position bias (zero in their rows and columns of the bias).

With ``num_registers=0`` the model is exactly ViTDet (tested against timm's ``samvit``). The
number of registers is [open]; we take the wording's "a global register token": 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mmafm.interop.timm_weights import register_timm_entrypoint
from mmafm.layers.mlp import Mlp
from mmafm.layers.patch import PatchEmbed, resample_pos_embed, take_indices
from mmafm.layers.vision_attention import Attention, decomposed_rel_pos_bias
from mmafm.layers.window import (
    REGISTER_MERGES,
    add_window_registers,
    merge_window_registers,
    window_partition,
    window_unpartition,
)
from mmafm.layers.init import trunc_normal_linears_
from mmafm.models.vit import TimmInterface, drop_path
from mmafm.registry import register_model

__all__ = ["ViTDetConfig", "VisionTransformerDet", "DetBlock", "LayerNorm2d"]


@dataclass
class ViTDetConfig:
    """ViTDet. Defaults are ViTDet-B/16 (detectron2); ViTDet-L changes five fields (presets)."""

    img_size: int = field(default=448, metadata={"min": 1})  # pos-embed grid = img_size // patch_size; 448 = CLIP pretraining resolution [paper+2nd]; other sizes resample
    patch_size: int = field(default=16, metadata={"min": 1})  # pixels per patch side
    in_chans: int = field(default=3, metadata={"min": 1})  # image channels
    embed_dim: int = field(default=768, metadata={"min": 1})  # model width
    depth: int = field(default=12, metadata={"min": 1})  # transformer blocks
    num_heads: int = field(default=12, metadata={"min": 1})  # attention heads
    mlp_dim: int = field(default=3072, metadata={"min": 1})  # MLP hidden width (4 x width)
    qkv_bias: bool = True  # bias on the fused qkv projection
    window_size: int = field(default=14, metadata={"min": 1})  # side of the attention windows, in patches
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)  # blocks attending across windows; all others windowed
    use_rel_pos: bool = True  # decomposed relative position bias in attention (ViTDet, SAM) [open for Apple's; needed for SAM weights]
    use_abs_pos: bool = True  # learned absolute position embedding on the patch grid
    norm_eps: float = field(default=1e-6, metadata={"min": 0.0})  # LayerNorm eps (SAM/timm)
    neck_channels: int = field(default=0, metadata={"min": 0})  # 0: final channel LayerNorm, width kept; >0: SAM's conv neck (1x1, LN, 3x3, LN) to this width (256 = SAM)
    num_registers: int = field(default=0, metadata={"min": 0})  # Register-Window tokens; 0 = plain ViTDet [open]
    register_merge: str = field(default="mean", metadata={"choices": REGISTER_MERGES})  # how per-window register copies are merged after windowed blocks [open]
    num_classes: int = field(default=0, metadata={"min": 0})  # head width after average pooling; 0 = no head
    drop_path_rate: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # stochastic depth, linear over blocks

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        self.global_blocks = tuple(self.global_blocks)
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_blocks {bad} out of range: expected indices in 0..{self.depth - 1}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DetBlock(nn.Module):
    """A ViTDet block on ``(B, R + Gh*Gw, C)`` tokens: ``R`` registers, then the patch grid.

    Args:
        config: The model config.
        window_size: Attention window side in patches; 0 = global attention.
        drop_path_rate: Stochastic-depth rate of this block.
    """

    def __init__(self, config: ViTDetConfig, window_size: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.register_merge = config.register_merge
        self.drop_path_rate = drop_path_rate
        rel_size = (window_size,) * 2 if window_size else (config.grid_size,) * 2
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.attn = Attention(
            config.embed_dim, config.num_heads, config.qkv_bias,
            rel_pos_size=rel_size if config.use_rel_pos else None,
        )
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mlp = Mlp(config.embed_dim, config.mlp_dim)

    def windowed_attention(
        self,
        tokens: torch.Tensor,  # (B, R + H*W, C), already normed
        grid: tuple[int, int],
        num_registers: int,
    ) -> torch.Tensor:  # (B, R + H*W, C)
        """Attention inside windows, each window with its own copy of the registers."""
        batch, _, channels = tokens.shape
        window = self.window_size
        registers = tokens[:, :num_registers]  # (B, R, C)
        patches = tokens[:, num_registers:].reshape(batch, *grid, channels)  # (B, H, W, C)
        windows, padded = window_partition(patches, window)  # (B*nW, w*w, C)
        if num_registers:
            windows = add_window_registers(windows, registers)  # (B*nW, R + w*w, C)
        out = self.attn(windows, grid=(window, window))
        patches = window_unpartition(out[:, num_registers:], window, grid, padded).flatten(1, 2)
        if not num_registers:
            return patches
        merged = merge_window_registers(out[:, :num_registers], batch, self.register_merge)
        return torch.cat([merged, patches], dim=1)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, R + H*W, C)
        grid: tuple[int, int],
        num_registers: int = 0,
    ) -> torch.Tensor:  # (B, R + H*W, C)
        normed = self.norm1(tokens)
        if self.window_size:
            attended = self.windowed_attention(normed, grid, num_registers)
        else:
            attended = self.attn(normed, grid=grid)
        tokens = tokens + drop_path(attended, self.drop_path_rate, self.training)
        return tokens + drop_path(self.mlp(self.norm2(tokens)), self.drop_path_rate, self.training)


class VisionTransformerDet(TimmInterface, nn.Module):
    """ViTDet / ViTDet with Register-Window, with timm's model interface.

    ``forward_features`` returns the final feature map ``(B, num_features, Gh, Gw)`` (timm
    ``samvit`` convention); :meth:`forward_tokens` also returns the registers (before the neck);
    :meth:`forward_grid` is mmafm's encoder interface, shared with the ViT.
    """

    def __init__(self, config: ViTDetConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.num_features = config.neck_channels or config.embed_dim
        self.num_classes = config.num_classes
        self.num_registers = config.num_registers
        self.grad_checkpointing = False

        grid = config.grid_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim)) if config.use_abs_pos else None
        )
        if config.num_registers:
            self.registers = nn.Parameter(torch.zeros(1, config.num_registers, config.embed_dim))
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            DetBlock(config, 0 if i in config.global_blocks else config.window_size, rate)
            for i, rate in enumerate(rates)
        )
        if config.neck_channels:
            width = config.neck_channels
            self.neck = nn.Sequential(
                nn.Conv2d(config.embed_dim, width, 1, bias=False),
                LayerNorm2d(width, eps=1e-6),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                LayerNorm2d(width, eps=1e-6),
            )
        else:
            self.neck = LayerNorm2d(config.embed_dim, eps=1e-6)
        self.head = (
            nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated normal (std 0.02) for linears, position embeddings and registers."""
        trunc_normal_linears_(self)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.num_registers:
            nn.init.trunc_normal_(self.registers, std=0.02)

    # ----------------------------------------------------------------------------- timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "registers"} if self.num_registers else {"pos_embed"}

    @property
    def num_prefix_tokens(self) -> int:
        """Register tokens before the patches in a global block."""
        return self.num_registers

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, R + Gh*Gw, C)`` registers then patches (plus position embeddings)."""
        patches = self.patch_embed(x)  # (B, Gh, Gw, C)
        grid = tuple(patches.shape[1:3])
        if self.pos_embed is not None:
            patches = patches + resample_pos_embed(self.pos_embed, grid)
        tokens = patches.flatten(1, 2)
        if self.num_registers:
            registers = self.registers.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([registers, tokens], dim=1)
        return tokens, grid

    def _block(self, index: int, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                block, tokens, grid, self.num_registers, use_reentrant=False
            )
        return block(tokens, grid, self.num_registers)

    def _to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = tokens[:, self.num_registers :]
        return patches.reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2)  # (B, C, Gh, Gw)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Registers ``(B, R, C)`` and the patch map ``(B, C, Gh, Gw)`` after the last block,
        before the neck."""
        tokens, grid = self._embed(x)
        for index in range(len(self.blocks)):
            tokens = self._block(index, tokens, grid)
        return tokens[:, : self.num_registers], self._to_map(tokens, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, num_features, Gh, Gw)
        """The final feature map after the neck (a channel LayerNorm unless a conv neck is set)."""
        return self.neck(self.forward_tokens(x)[1])

    def forward_grid(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:  # (B, P, F), (B, Gh*Gw, F), (Gh, Gw)
        """The encoder interface the vision-language adapter reads (shared with the ViT).

        Args:
            x: Images ``(B, in_chans, H, W)``, H and W multiples of the patch size.

        Returns:
            ``(prefix, grid_tokens, (Gh, Gw))``: the patch tokens are :meth:`forward_features`'s
            map (after the neck) in row-major order. The prefix is the registers as the last
            block leaves them (the neck works on maps, so they skip it); they are returned only
            while the neck keeps the width (``num_features == embed_dim``), else, as for plain
            ViTDet, the prefix is empty ``(B, 0, num_features)``.
        """
        registers, feature_map = self.forward_tokens(x)  # (B, R, C), (B, C, Gh, Gw)
        feature_map = self.neck(feature_map)  # (B, F, Gh, Gw)
        grid = (feature_map.shape[-2], feature_map.shape[-1])
        patches = feature_map.flatten(2).transpose(1, 2)  # (B, Gh*Gw, F)
        if registers.shape[-1] != patches.shape[-1]:  # a conv neck changed the width
            registers = patches[:, :0]  # (B, 0, F)
        return registers, patches, grid

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pool the feature map and apply the head unless ``pre_logits``."""
        pooled = x.mean(dim=(2, 3))
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
        """Patch feature maps ``(B, C, Gh, Gw)`` of chosen blocks (timm's signature).

        Args:
            x: Images ``(B, in_chans, H, W)``.
            indices: None = every block, int n = the last n, or a list of block indices
                (e.g. the global blocks ``config.global_blocks``).
            norm: Pass each map through the neck (as timm's ``samvit``).
            stop_early: Stop after the last requested block (only with ``intermediates_only``).
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list.
            scales: One power-of-two factor per returned map, e.g. ``(4, 2, 1, 0.5)`` gives
                strides 4/8/16/32: ViTDet's simple feature pyramid without its learned layers.

        Returns:
            The list of maps, or ``(final feature map, maps)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"ViTDet intermediates are feature maps: output_fmt must be 'NCHW', got {output_fmt!r}")
        taken = take_indices(len(self.blocks), indices)
        if scales is not None and len(scales) != len(taken):
            raise ValueError(
                f"scales needs one factor per returned block ({len(taken)}), got {list(scales)}"
            )
        tokens, grid = self._embed(x)

        def take(tokens: torch.Tensor) -> torch.Tensor:
            feature = self._to_map(tokens, grid)  # (B, C, Gh, Gw)
            return self.neck(feature) if norm else feature

        tokens, intermediates = self._collect_intermediates(
            tokens,
            taken,
            stop_early and intermediates_only,
            scales,
            lambda index, tokens: self._block(index, tokens, grid),
            take,
        )
        if intermediates_only:
            return intermediates
        return self.neck(self._to_map(tokens, grid)), intermediates

    # ---------------------------------------------------------------------- looking inside (notebook)
    @torch.no_grad()
    def attention_map(
        self, x: torch.Tensor, block_index: int, query: str | tuple[int, int] = "register"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where one query token looks in block ``block_index`` (mean over heads).

        Args:
            x: Images ``(B, in_chans, H, W)``.
            block_index: Which block's attention to read.
            query: ``"register"`` (register 0; in a windowed block each window's copy, so every
                window shows its own copy's map) or a patch position ``(row, col)``.

        Returns:
            ``(B, Gh, Gw)`` attention weights on the patches and ``(B, nW)`` (windowed) or
            ``(B, 1)`` (global) total weight the query puts on the registers.
        """
        if query == "register" and not self.num_registers:
            raise ValueError("query='register' needs a model with num_registers > 0")
        if not 0 <= block_index < len(self.blocks):
            raise ValueError(f"block_index must be in 0..{len(self.blocks) - 1}, got {block_index}")
        grid_h, grid_w = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        if query != "register" and not (0 <= query[0] < grid_h and 0 <= query[1] < grid_w):
            raise ValueError(f"query patch {tuple(query)} outside the {grid_h}x{grid_w} patch grid")
        tokens, grid = self._embed(x)
        for index in range(block_index):
            tokens = self.blocks[index](tokens, grid, self.num_registers)
        block, num_registers = self.blocks[block_index], self.num_registers
        normed = block.norm1(tokens)
        batch, channels = normed.shape[0], normed.shape[-1]
        if block.window_size:
            window = block.window_size
            patches = normed[:, num_registers:].reshape(batch, *grid, channels)
            seqs, padded = window_partition(patches, window)
            seqs = add_window_registers(seqs, normed[:, :num_registers]) if num_registers else seqs
            probs = _attention_probs(block.attn, seqs, (window, window)).mean(1)  # (B*nW, T, T)
            probs = probs.view(batch, -1, *probs.shape[1:])  # (B, nW, T, T)
            if query == "register":
                rows = probs[:, :, 0]  # (B, nW, T): each window's copy of register 0
            else:
                row, col = query
                window_index = (row // window) * (padded[1] // window) + col // window
                position = num_registers + (row % window) * window + col % window
                rows = torch.zeros_like(probs[:, :, 0])  # other windows are out of reach: 0
                rows[:, window_index] = probs[:, window_index, position]
            on_patches = rows[..., num_registers:].flatten(0, 1)[..., None]  # (B*nW, w*w, 1)
            patch_weights = window_unpartition(on_patches, window, grid, padded)[..., 0]
            return patch_weights, rows[..., :num_registers].sum(-1)
        probs = _attention_probs(block.attn, normed, grid).mean(1)  # (B, T, T)
        position = 0 if query == "register" else num_registers + query[0] * grid[1] + query[1]
        weights = probs[:, position]
        patch_weights = weights[:, num_registers:].reshape(batch, *grid)
        return patch_weights, weights[:, :num_registers].sum(-1, keepdim=True)


def _attention_probs(attn: Attention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Explicit softmax attention weights ``(B, H, N, N)`` of ``attn`` on ``x`` (for figures)."""
    batch, length, _ = x.shape
    qkv = attn.qkv(x).view(batch, length, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = q @ k.transpose(-2, -1) * attn.head_dim**-0.5
    if attn.use_rel_pos:
        prefix = length - grid[0] * grid[1]
        bias = decomposed_rel_pos_bias(q[:, :, prefix:], attn.rel_pos_h, attn.rel_pos_w, grid)
        logits = logits + F.pad(bias, (prefix, 0, prefix, 0))
    return logits.softmax(-1)


# --------------------------------------------------------------------------------------- presets
def _vitdet_base() -> ViTDetConfig:
    """ViTDet-B/16 (detectron2's base), the config ViTDet-L is written against."""
    return ViTDetConfig()


@register_model("vitdet_large_patch16", builder=VisionTransformerDet)
def vitdet_large_patch16() -> ViTDetConfig:
    """ViTDet-L/16, the 2025 on-device encoder [paper ~300M; code "ViTDet L16"]: ViTDet-B with
    five fields changed, as in detectron2."""
    return replace(
        _vitdet_base(), embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096,
        global_blocks=(5, 11, 17, 23),
    )


@register_model("vitdet_large_patch16_rw", builder=VisionTransformerDet)
def vitdet_large_patch16_rw() -> ViTDetConfig:
    """ViTDet-L/16 with Register-Window attention (see the module docstring for our reading)."""
    return replace(vitdet_large_patch16(), num_registers=1, register_merge="mean")


@register_model("vitdet_large_patch16_tiny", builder=VisionTransformerDet)
def vitdet_large_patch16_tiny() -> ViTDetConfig:
    """ViTDet-L's layout at toy size: 4 blocks (1 and 3 global), width 64, 3x3 windows, so a
    112-pixel image (7x7 grid) exercises window padding."""
    return replace(
        vitdet_large_patch16(), img_size=112, embed_dim=64, depth=4, num_heads=4, mlp_dim=256,
        window_size=3, global_blocks=(1, 3),
    )


@register_model("vitdet_large_patch16_rw_tiny", builder=VisionTransformerDet)
def vitdet_large_patch16_rw_tiny() -> ViTDetConfig:
    """The RW variant at toy size, with two registers so the merge is exercised per register."""
    return replace(vitdet_large_patch16_tiny(), num_registers=2, register_merge="mean")


# Also buildable as timm.create_model("mmafm_<preset>") (mmafm/__init__.py imports this module).
for _name in (
    "vitdet_large_patch16", "vitdet_large_patch16_rw", "vitdet_large_patch16_tiny",
    "vitdet_large_patch16_rw_tiny",
):
    register_timm_entrypoint(_name)


def plot_register_window_attention(
    model: VisionTransformerDet,
    pixels: torch.Tensor,  # (3, S, S) in [0, 1], for display
    image: torch.Tensor,  # (1, 3, S, S), model input
    query: tuple[int, int] | None = None,
    windowed_block: int | None = None,
    global_block: int | None = None,
):
    """Figure: the window grid, where a patch and the register look in a windowed block, and where
    the register looks in a global block (mean over heads).

    Args:
        model: A ViTDet with ``num_registers > 0``.
        pixels: The image for display.
        image: The same image as model input.
        query: Patch ``(row, col)`` whose attention to show; default: the grid centre.
        windowed_block: Block to read windowed attention from; default the first windowed one.
        global_block: Block to read global attention from; default the first global one.

    Returns:
        A matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    config = model.config
    size, patch, window = pixels.shape[-1], config.patch_size, config.window_size
    grid = size // patch
    windowed = [i for i, b in enumerate(model.blocks) if b.window_size]
    global_ = [i for i, b in enumerate(model.blocks) if not b.window_size]
    windowed_block = windowed[0] if windowed_block is None else windowed_block
    global_block = global_[0] if global_block is None else global_block
    query = (grid // 2, grid // 2) if query is None else query

    patch_map, _ = model.attention_map(image, windowed_block, query)
    register_local, register_share = model.attention_map(image, windowed_block, "register")
    register_global, global_share = model.attention_map(image, global_block, "register")

    picture = pixels.permute(1, 2, 0).numpy()
    extent = (0, size, size, 0)
    share = register_share[0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 5))
    panels = [
        (None, f"{grid}x{grid} patches of {patch} px, {window}x{window}-patch windows\n"
               f"(grey: padding; star: the patch query)"),
        (patch_map[0], f"block {windowed_block} (windowed): patch {tuple(query)} attends\n"
                       "to its own window (and the registers) only"),
        (register_local[0], f"block {windowed_block}: each window's register copy (its own\n"
                            f"distribution; {float(share.min()):.2f}-{float(share.max()):.2f} kept on registers), "
                            f"then {config.register_merge}-merged"),
        (register_global[0], f"block {global_block} (global): the merged register over the\n"
                             f"whole image ({float(global_share[0].sum()):.2f} kept on registers)"),
    ]
    padded = -(-grid // window) * window
    for index, (axis, (heat, title)) in enumerate(zip(axes, panels)):
        axis.imshow(picture)
        if heat is not None:
            axis.imshow(heat.numpy(), cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
        if index < 3:  # the window grid, where windows matter
            for line in range(0, padded + 1, window):
                axis.axhline(min(line, grid) * patch, color="yellow", lw=0.8)
                axis.axvline(min(line, grid) * patch, color="yellow", lw=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    if padded != grid:
        axes[0].add_patch(Rectangle((grid * patch, 0), (padded - grid) * patch, padded * patch,
                                    color="gray", alpha=0.4, clip_on=False))
        axes[0].add_patch(Rectangle((0, grid * patch), grid * patch, (padded - grid) * patch,
                                    color="gray", alpha=0.4, clip_on=False))
    axes[0].plot((query[1] + 0.5) * patch, (query[0] + 0.5) * patch, "r*", ms=14)
    fig.tight_layout()
    return fig
