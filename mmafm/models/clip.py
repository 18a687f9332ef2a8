"""CLIP: contrastive image-text pretraining of the vision encoders (REFERENCE.md, "Vision encoders").

The 2025 report pretrains both image encoders (ViT-g/14 on the server, ViTDet-L with
Register-Window attention on device) with a CLIP-style contrastive loss on image-text pairs at
448x448 [paper+2nd]; ViT-g also uses FLIP patch masking [2nd]. The text tower is not published
[open]: ours is the CLIP text transformer (Radford et al. 2021, as in open_clip) built from
mmafm layers -- causal pre-norm blocks whose attention is :func:`mmafm.layers.attention.attend`,
pooled at the end-of-text token -- with the AFM text model's RMSNorm / RoPE / SwiGLU as options.

Any registered vision preset is the image tower (``image_preset``); its pooled
``forward_head(..., pre_logits=True)`` features and the text tower's pooled features are linearly
projected to a shared ``embed_dim`` and L2-normalized. Similarities are scaled by a learnable
``exp(logit_scale)`` (CLIP, initialized at 1/0.07 and clamped at 100) or, for the sigmoid loss
(SigLIP, Zhai et al. 2023), by a learnable scale and bias initialized at 10 and -10.

Captions become token ids through :class:`mmafm.tokenizer.CaptionTokenizer`: the data stage's
SentencePiece tokenizer or open_clip's bundled BPE (``"openclip"``, no download), laid out as
``[start] tokens [end] [pad]...``.

Presets: ``clip_tiny`` (CPU tests, tiny pipeline), ``clip_vit_base_patch16`` (the benchmark
shape), ``clip_vit_giant_patch14`` (server) and ``clip_vitdet_large_patch16_rw`` (on device).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mmafm.checkpoint import save_model
from mmafm.config import from_dict
from mmafm.layers.attention import attend
from mmafm.layers.mlp import Mlp
from mmafm.layers.norm import RMSNorm
from mmafm.layers.rope import apply_rope, rope_cos_sin
from mmafm.layers.swiglu import SwiGLU
from mmafm.registry import create_model, get_config, register_model
from mmafm.tokenizer import CaptionTokenizer

__all__ = [
    "TextTowerConfig",
    "CLIPConfig",
    "TEXT_TOWERS",
    "text_tower_config",
    "TextTransformer",
    "CLIP",
    "save_image_tower",
]


# ------------------------------------------------------------------------------------- configs
@dataclass
class TextTowerConfig:
    """The text transformer [open]. Defaults are CLIP ViT-B's text tower (open_clip shapes)."""

    vocab_size: int = field(default=49408, metadata={"min": 2})  # token ids; 49,408 = open_clip BPE, the stage sets its tokenizer's size
    context_length: int = field(default=77, metadata={"min": 2})  # tokens per caption incl. start/end (CLIP: 77)
    width: int = field(default=512, metadata={"min": 1})  # model width
    depth: int = field(default=12, metadata={"min": 1})  # transformer blocks
    num_heads: int = field(default=8, metadata={"min": 1})  # attention heads (width divisible by it)
    mlp_dim: int = field(default=2048, metadata={"min": 1})  # FFN hidden width (CLIP: 4 x width)
    ffn: str = field(default="gelu", metadata={"choices": ("gelu", "swiglu")})  # "gelu" = CLIP's MLP, "swiglu" = the AFM text model's FFN
    norm: str = field(default="layernorm", metadata={"choices": ("layernorm", "rmsnorm")})  # CLIP LayerNorm or AFM RMSNorm
    position: str = field(default="learned", metadata={"choices": ("learned", "rope")})  # CLIP learned absolute positions or AFM RoPE
    rope_theta: float = field(default=10000.0, metadata={"min": 1.0})  # RoPE base when position="rope" (captions are short: 10k) [open]
    norm_eps: float = field(default=1e-5, metadata={"min": 0.0})  # norm epsilon (torch LayerNorm default, as open_clip)
    pad_id: int = field(default=0, metadata={"min": 0})  # padding id after the end token
    eot_id: int = field(default=49407, metadata={"min": 0})  # end-of-text id: pooling reads the first one (open_clip BPE: 49407)

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"text width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.position == "rope" and (self.width // self.num_heads) % 2:
            raise ValueError(f"RoPE needs an even text head dim, got {self.width // self.num_heads}")
        for name in ("pad_id", "eot_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"text {name} {getattr(self, name)} must be < vocab_size {self.vocab_size}")


@dataclass
class CLIPConfig:
    """Image tower preset + text tower + projections + logit scale."""

    image_preset: str = "vit_base_patch16"  # any registered vision preset (mmafm.list_models())
    image_size: int = field(default=224, metadata={"min": 0})  # training resolution (the preset's img_size); 0 keeps the preset's [paper: 448]
    image_patch_size: int = field(default=0, metadata={"min": 0})  # override the preset's patch size (e.g. 32 for a ViT-B/32 shape); 0 keeps it
    mask_ratio: float = field(default=0.0, metadata={"min": 0.0, "max": 0.95})  # FLIP patch masking in training forwards; needs a preset with mask_ratio [2nd: ViT-g uses it; open: FLIP's 0.5]
    embed_dim: int = field(default=512, metadata={"min": 1})  # shared embedding width both towers project to [open]
    text: TextTowerConfig = field(default_factory=TextTowerConfig)  # the text tower [open]
    loss: str = field(default="clip", metadata={"choices": ("clip", "siglip")})  # softmax InfoNCE (CLIP) or sigmoid (SigLIP); decides the scale/bias init
    logit_scale_init: float | None = None  # initial exp(logit_scale); None = the loss's default: 1/0.07 (CLIP) or 10 (SigLIP)
    logit_bias_init: float | None = None  # initial logit bias; None = none for CLIP, -10 for SigLIP
    max_logit_scale: float = field(default=100.0, metadata={"min": 1.0})  # clamp of exp(logit_scale) (CLIP: 100)

    def __post_init__(self) -> None:
        if self.logit_scale_init is not None and self.logit_scale_init <= 0:
            raise ValueError(f"logit_scale_init must be > 0, got {self.logit_scale_init}")

    @property
    def initial_scale(self) -> float:
        if self.logit_scale_init is not None:
            return self.logit_scale_init
        return 10.0 if self.loss == "siglip" else 1 / 0.07

    @property
    def initial_bias(self) -> float | None:
        if self.logit_bias_init is not None:
            return self.logit_bias_init
        return -10.0 if self.loss == "siglip" else None

    def image_overrides(self) -> dict[str, Any]:
        """Overrides applied to the vision preset (resolution, FLIP masking); checked against it."""
        overrides: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(get_config(self.image_preset))}
        if self.image_size:
            if "img_size" not in fields:
                raise ValueError(f"image preset {self.image_preset!r} has no img_size to set to {self.image_size}")
            overrides["img_size"] = self.image_size
        if self.image_patch_size:
            if "patch_size" not in fields:
                raise ValueError(f"image preset {self.image_preset!r} has no patch_size to set to {self.image_patch_size}")
            overrides["patch_size"] = self.image_patch_size
        if self.mask_ratio > 0:
            if "mask_ratio" not in fields:
                raise ValueError(
                    f"image preset {self.image_preset!r} does not support FLIP patch masking "
                    f"(no mask_ratio field); use mask_ratio=0 or a plain ViT preset"
                )
            overrides["mask_ratio"] = self.mask_ratio
        return overrides


# Text tower shapes by name [open]: open_clip's text towers of the matching image encoders.
TEXT_TOWERS = {
    "tiny": dict(width=64, depth=2, num_heads=4, mlp_dim=256),  # CPU tests, tiny pipeline
    "base": dict(width=512, depth=12, num_heads=8, mlp_dim=2048),  # open_clip ViT-B-16 / ViT-B-32
    "large": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),  # open_clip ViT-L-14
    "giant": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),  # open_clip ViT-g-14
}


def text_tower_config(name: str, **overrides: Any) -> TextTowerConfig:
    """The text tower shape ``name`` (a key of :data:`TEXT_TOWERS`) with ``overrides``."""
    if name not in TEXT_TOWERS:
        raise ValueError(f"unknown text tower {name!r}; expected one of {sorted(TEXT_TOWERS)}")
    return from_dict(TextTowerConfig, {**TEXT_TOWERS[name], **overrides}, source=f"text tower {name!r}")


# ---------------------------------------------------------------------------------- text tower
def _norm(config: TextTowerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.width, eps=config.norm_eps)
    return nn.LayerNorm(config.width, eps=config.norm_eps)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention over caption tokens (fused ``qkv``, optional RoPE)."""

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.width // config.num_heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # 2 x (B, T, D)
    ) -> torch.Tensor:  # (B, T, C)
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class TextBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = _norm(config)
        self.mlp = Mlp(config.width, config.mlp_dim) if config.ffn == "gelu" else SwiGLU(config.width, config.mlp_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


def eot_positions(tokens: torch.Tensor, eot_id: int, pad_id: int) -> torch.Tensor:  # (B,)
    """Index of each row's first end-of-text token; rows without one use their last non-pad token."""
    is_eot = tokens == eot_id  # (B, T)
    first_eot = is_eot.int().argmax(dim=1)
    last_token = ((tokens != pad_id).sum(dim=1) - 1).clamp(min=0)
    return torch.where(is_eot.any(dim=1), first_eot, last_token)


class TextTransformer(nn.Module):
    """Causal text transformer pooled at the end-of-text token (CLIP's text tower)."""

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.config = config
        self.num_features = config.width
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = (
            nn.Parameter(torch.zeros(config.context_length, config.width)) if config.position == "learned" else None
        )
        self.blocks = nn.ModuleList(TextBlock(config) for _ in range(config.depth))
        self.norm = _norm(config)
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's text init: embeddings std 0.02 / positions 0.01, residual outputs scaled by depth."""
        width, depth = self.config.width, self.config.depth
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if self.positional_embedding is not None:
            nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)
            for name, linear in block.mlp.named_children():
                is_output = name in ("fc2", "w_down")
                nn.init.normal_(linear.weight, std=proj_std if is_output else (2 * width) ** -0.5)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        """Every token's features after the final norm."""
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"captions of {length} tokens exceed context_length {self.config.context_length}")
        x = self.token_embedding(tokens)  # (B, T, C)
        rope = None
        if self.positional_embedding is not None:
            x = x + self.positional_embedding[:length]
        else:
            positions = torch.arange(length, device=tokens.device).expand(tokens.shape[0], -1)
            head_dim = self.config.width // self.config.num_heads
            rope = rope_cos_sin(positions, head_dim, self.config.rope_theta, dtype=x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, C)
        """Pooled caption features: the end-of-text token's output."""
        features = self.forward_features(tokens)
        index = eot_positions(tokens, self.config.eot_id, self.config.pad_id)
        return features[torch.arange(features.shape[0], device=features.device), index]


# --------------------------------------------------------------------------------------- CLIP
class CLIP(nn.Module):
    """Image tower (any vision preset) + text tower + projections + learnable logit scale.

    ``encode_image``/``encode_text`` give L2-normalized embeddings; ``forward`` returns them with
    the scale (and SigLIP bias) as a dict in open_clip's ``output_dict`` form, ready for
    ``open_clip.loss.ClipLoss`` / ``SigLipLoss``.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = create_model(config.image_preset, **config.image_overrides())
        self.text = TextTransformer(config.text)
        self.image_proj = nn.Linear(self.visual.num_features, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.initial_scale)))
        bias = config.initial_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        nn.init.normal_(self.image_proj.weight, std=self.visual.num_features**-0.5)
        nn.init.normal_(self.text_proj.weight, std=config.text.width**-0.5)
        self.tokenizer: CaptionTokenizer | None = None  # attached by mmafm.load_model / the stage

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale", "text.positional_embedding"}
        if self.logit_bias is not None:  # SigLIP's bias only
            names.add("logit_bias")
        if hasattr(self.visual, "no_weight_decay"):
            names |= {f"visual.{name}" for name in self.visual.no_weight_decay()}
        return names

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.visual, "set_grad_checkpointing"):
            self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable

    def image_features(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, Cv)
        """The image tower's pooled features, before the projection."""
        return self.visual.forward_head(self.visual.forward_features(images), pre_logits=True)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:  # (B, E)
        """Embed normalized images ``(B, 3, H, W)`` (the data stage's pixel normalization)."""
        embedding = self.image_proj(self.image_features(images))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_text(self, tokens: torch.Tensor | Sequence[str], normalize: bool = True) -> torch.Tensor:  # (B, E)
        """Embed captions: token ids ``(B, T)`` or, with a tokenizer attached, a list of strings."""
        if not isinstance(tokens, torch.Tensor):
            tokens = self.tokenize(tokens).to(self.logit_scale.device)
        embedding = self.text_proj(self.text(tokens))
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:  # (B, T)
        """Token ids of ``texts`` with the attached tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError(
                "this CLIP has no tokenizer attached; pass token ids, or set model.tokenizer = "
                "mmafm.tokenizer.load_caption_tokenizer(spec, context_length)"
            )
        return self.tokenizer(texts)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at ``max_logit_scale`` (a scalar tensor)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both embeddings plus the scale (and bias) -- open_clip's ``output_dict`` form."""
        out = {
            "image_features": self.encode_image(images),  # (B, E)
            "text_features": self.encode_text(tokens),  # (B, E)
            "logit_scale": self.scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def get_logits(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image (B_img, B_txt), logits_per_text)`` as in open_clip."""
        out = self(images, tokens)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        if "logit_bias" in out:
            logits = logits + out["logit_bias"]
        return logits, logits.T


# -------------------------------------------------------------------------------- checkpoints
def save_image_tower(model: CLIP, path: str | Path) -> Path:
    """Write the image tower alone (:func:`mmafm.save_model`; :func:`mmafm.load_model` reads it
    back), recorded without FLIP masking: the preset's own ``mask_ratio``, as later stages use the
    tower on whole images (``load_model(..., overrides={"mask_ratio": 0.5})`` puts it back)."""
    tower = model.visual
    config = tower.config
    if "mask_ratio" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, mask_ratio=get_config(model.config.image_preset).mask_ratio)
    return save_model(path, tower, {"num_features": int(tower.num_features)}, config=config)


# ------------------------------------------------------------------------------------ presets
@register_model("clip_tiny", builder=CLIP)
def clip_tiny() -> CLIPConfig:
    """A few-hundred-thousand-parameter CLIP for CPU tests and the tiny pipeline (64 px, 16-pixel patches)."""
    return CLIPConfig(
        image_preset="vit_base_patch16_tiny",
        image_size=64,
        embed_dim=64,
        text=text_tower_config("tiny", context_length=32),
    )


@register_model("clip_vit_base_patch16", builder=CLIP)
def clip_vit_base_patch16() -> CLIPConfig:
    """open_clip's ``ViT-B-16`` shape: ViT-B/16 at 224, 512-wide 12-layer text tower, 512-d embeddings."""
    return CLIPConfig(image_preset="vit_base_patch16", image_size=224, embed_dim=512)


@register_model("clip_vit_giant_patch14", builder=CLIP)
def clip_vit_giant_patch14() -> CLIPConfig:
    """The server encoder's pretraining: ViT-g/14 at 448 with FLIP masking [paper+2nd].

    Text tower and embedding width follow open_clip's ``ViT-g-14`` (1024 wide, 24 layers, 16
    heads, 1024-d embeddings) [open]; mask ratio 0.5 as in FLIP [open].
    """
    return CLIPConfig(
        image_preset="vit_giant_patch14", image_size=448, mask_ratio=0.5, embed_dim=1024,
        text=text_tower_config("giant"),
    )


@register_model("clip_vitdet_large_patch16_rw", builder=CLIP)
def clip_vitdet_large_patch16_rw() -> CLIPConfig:
    """The on-device encoder's pretraining: ViTDet-L/16 with Register-Window attention at 448
    [paper]; text tower as open_clip's ``ViT-L-14`` (768 wide, 12 layers, 12 heads), 768-d
    embeddings [open]."""
    return CLIPConfig(
        image_preset="vitdet_large_patch16_rw", image_size=448, embed_dim=768,
        text=text_tower_config("large"),
    )
