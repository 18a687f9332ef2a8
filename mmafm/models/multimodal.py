"""The AFM vision-language model: image encoder -> adapter -> image tokens spliced into the decoder.

REFERENCE.md, "Vision encoders" and "Vision-language adapter (2025)": the on-device model pairs
ViTDet-L with Register-Window attention with the 2025 on-device decoder, the server model pairs
ViT-g/14 with the PT-MoE server decoder; in both the adapter turns each image into a fixed number
of text-width tokens (9 / 144 / 720 by resolution mode, see :mod:`mmafm.models.adapter`). Stage 2
of the report trains encoder, adapter and a small decoder jointly on image-caption data with a
captioning loss (:mod:`mmafm.stages.vl_alignment`).

How an image enters the text (our choice, [open]): the text holds one placeholder token
(``<image>``, id 8 in :mod:`mmafm.tokenizer`) per image. :func:`expand_image_placeholders`
replaces each placeholder by ``num_image_tokens(mode)`` slots; the model fills the slots with the
adapter's output in place of token embeddings and calls the decoder with ``inputs_embeds``. Images
are matched to placeholders in reading order (row by row, left to right). Image positions never
carry a loss target: a position whose *next* token is an image token is not trained to predict it.

Works with every decoder built on :class:`mmafm.models.text.DecoderLM` (dense, KV-shared, MoE,
PT-MoE) and every encoder with the :class:`mmafm.models.adapter.GridEncoder` interface
(``forward_grid``: both vision families, ``VisionTransformer`` with its [CLS] as prefix,
``VisionTransformerDet`` with its registers).

The config names each tower by preset and nests its overrides, as open_clip nests ``vision_cfg``
/ ``text_cfg``: ``MultimodalConfig(text={"vocab_size": 512})`` applies ``vocab_size=512`` to the
text preset, validated against that preset's config dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from mmafm.config import ConfigError, coerce_fields
from mmafm.models.adapter import (
    MODES,
    GridEncoder,
    ResolutionMode,
    VisionLanguageAdapter,
    VLAdapterConfig,
    make_views,
    resolution_mode,
)
from mmafm.registry import create_model, get_config, register_model

__all__ = [
    "MultimodalConfig",
    "MultimodalModel",
    "VLOutput",
    "ExpandedInputs",
    "expand_image_placeholders",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100  # target value the decoder's loss skips (DecoderLM.loss default)


@dataclass
class MultimodalConfig:
    """Which towers, and the adapter between them. Defaults are the tiny CPU model."""

    vision_preset: str = "vitdet_large_patch16_rw_tiny"  # image encoder preset (ViT or ViTDet family)
    text_preset: str = "afm_2025_device_tiny"  # decoder preset (TextModel or PTMoEModel)
    vision: dict[str, Any] = field(default_factory=dict)  # overrides of the vision preset's config (ViTConfig / ViTDetConfig fields), e.g. {"img_size": 448} = a CLIP tower's position grid
    text: dict[str, Any] = field(default_factory=dict)  # overrides of the text preset's config, e.g. {"vocab_size": <tokenizer's>, "max_seq_len": ...}; image tokens count against max_seq_len
    image_token_id: int = field(default=8, metadata={"min": 0})  # placeholder id; mmafm.tokenizer reserves 8 for "<image>"
    pad_token_id: int = field(default=0, metadata={"min": 0})  # id used to pad rows of unequal length (tokenizer <pad>)
    adapter_heads: int = field(default=0, metadata={"min": 0})  # heads of the adapter layer; 0 = the encoder's [open]
    adapter_mlp_ratio: float = field(default=4.0, metadata={"min": 0.0})  # adapter MLP hidden / encoder width [open]
    num_image_tokens: int = field(default=144, metadata={"min": 1})  # tokens per view, balanced and high-res [2nd]
    rapid_image_tokens: int = field(default=9, metadata={"min": 1})  # tokens of the rapid mode [2nd]
    rapid_size: int = field(default=224, metadata={"min": 1})  # rapid-mode image side [2nd]
    balanced_size: int = field(default=672, metadata={"min": 1})  # balanced-mode side = high-res tile side [2nd]
    high_res_tiles: int = field(default=2, metadata={"min": 1})  # high-res tiles per side [2nd: 2x2]
    high_res_overview: bool = True  # high-res adds an overview view [2nd]
    default_mode: str = field(default="balanced", metadata={"choices": MODES})  # mode when a call names none

    def __post_init__(self) -> None:
        # validated here, so a bad key fails when the config is built (from_dict, get_config,
        # a checkpoint's metadata), not halfway through building the towers
        self.vision = _tower_overrides("vision", self.vision_preset, self.vision)
        self.text = _tower_overrides("text", self.text_preset, self.text)

    def adapter_config(self, vision_dim: int, text_dim: int, vision_heads: int) -> VLAdapterConfig:
        """The :class:`VLAdapterConfig` this config describes, for towers of the given widths."""
        return VLAdapterConfig(
            vision_dim=vision_dim, text_dim=text_dim, num_heads=self.adapter_heads or vision_heads,
            mlp_ratio=self.adapter_mlp_ratio, num_image_tokens=self.num_image_tokens,
            rapid_image_tokens=self.rapid_image_tokens, rapid_size=self.rapid_size,
            balanced_size=self.balanced_size, high_res_tiles=self.high_res_tiles,
            high_res_overview=self.high_res_overview,
        )


def _tower_overrides(role: str, preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` of tower preset ``preset``, checked against its config dataclass and coerced.

    Args:
        role: ``"vision"`` or ``"text"``, the :class:`MultimodalConfig` field (for messages).
        preset: The tower's preset name (or model YAML).
        overrides: Config fields of that preset to change.

    Raises:
        ConfigError: naming the field, the preset and the offending key or value.
    """
    where = f"MultimodalConfig.{role} (overrides of {role} preset {preset!r})"
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: expected a mapping of config fields, got {overrides!r}")
    base = get_config(preset)
    values = coerce_fields(type(base), overrides, source=where)
    try:
        replace(base, **values)  # the tower config's own checks (__post_init__)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
    return values


class ExpandedInputs(NamedTuple):
    """Token rows after every image placeholder became ``tokens_per_image`` image slots."""

    input_ids: torch.Tensor  # (B, T') placeholder id in image slots, pad id in padding
    image_mask: torch.Tensor  # (B, T') bool, True at image slots
    attention_mask: torch.Tensor | None  # (B, T') 1 = real token; None when nothing is padded
    labels: torch.Tensor | None  # (B, T') IGNORE_INDEX at image slots and padding


class VLOutput(NamedTuple):
    """What :meth:`MultimodalModel.forward` returns."""

    logits: torch.Tensor  # (B, T', V) float32
    image_mask: torch.Tensor  # (B, T') True at image positions
    input_ids: torch.Tensor  # (B, T') the expanded ids
    labels: torch.Tensor | None  # (B, T') expanded unshifted labels (IGNORE_INDEX at image slots)
    loss: torch.Tensor | None  # captioning loss when labels were given
    metrics: dict[str, float]  # ce, ppl, ... of the loss; empty without labels


def expand_image_placeholders(
    input_ids: torch.Tensor,  # (B, T)
    image_token_id: int,
    tokens_per_image: int,
    pad_id: int = 0,
    attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token
    labels: torch.Tensor | None = None,  # (B, T) unshifted; IGNORE_INDEX = no loss
    padding_side: str = "right",
) -> ExpandedInputs:
    """Replace every placeholder by ``tokens_per_image`` image slots.

    Rows holding different numbers of placeholders come out with different lengths; they are
    padded (``"right"`` for training, ``"left"`` for generation) and an attention mask marks the
    real tokens. Labels at image slots and padding become :data:`IGNORE_INDEX`.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must match input_ids {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    is_image = input_ids == image_token_id  # (B, T)
    repeats = torch.where(is_image, tokens_per_image, 1)  # (B, T)
    ends = repeats.cumsum(dim=1)  # (B, T) one past each source token's last output slot
    lengths = ends[:, -1] if length else repeats.new_zeros(batch)  # (B,)
    width = int(lengths.max()) if batch and length else 0
    offset = (width - lengths) if padding_side == "left" else torch.zeros_like(lengths)  # (B,)
    slots = torch.arange(width, device=input_ids.device).expand(batch, width)  # (B, T')
    real = (slots >= offset[:, None]) & (slots < (offset + lengths)[:, None])  # (B, T')
    # the source token of every output slot: the first token whose end lies beyond the slot
    source = torch.searchsorted(ends, (slots - offset[:, None]).contiguous(), right=True)
    source = source.clamp(max=max(length - 1, 0))  # (B, T'); padding slots are masked below
    image_mask = is_image.gather(1, source) & real
    ids = input_ids.gather(1, source).masked_fill(~real, pad_id)
    out_attention = None
    if attention_mask is not None or bool((lengths != width).any()):
        out_attention = real.long()
        if attention_mask is not None:
            out_attention = attention_mask.long().gather(1, source) * out_attention
    out_labels = None
    if labels is not None:
        out_labels = labels.gather(1, source).masked_fill(~real | image_mask, IGNORE_INDEX)
    return ExpandedInputs(ids, image_mask, out_attention, out_labels)


class MultimodalModel(nn.Module):
    """Image encoder (``vision``), :class:`VisionLanguageAdapter` (``adapter``) and decoder (``text``).

    Parameter names: ``vision.*`` (the encoder's own, so a CLIP image tower loads with
    ``load_into(model.vision, ...)``), ``adapter.*``, ``text.*`` (the decoder's own).
    """

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.config = config
        self.vision = create_model(config.vision_preset, **config.vision)
        self.text = create_model(config.text_preset, **config.text)
        if not isinstance(self.vision, GridEncoder):
            raise TypeError(f"vision preset {config.vision_preset!r} is not an image encoder (no forward_grid)")
        if not hasattr(self.text, "embed_tokens") or not hasattr(self.text, "new_cache"):
            raise TypeError(f"text preset {config.text_preset!r} is not a decoder (no embed_tokens/new_cache)")
        self.adapter = VisionLanguageAdapter(
            config.adapter_config(self.vision.num_features, self.text.config.dim, self.vision.config.num_heads)
        )
        vocab = self.text.config.vocab_size
        for name in ("image_token_id", "pad_token_id"):
            if getattr(config, name) >= vocab:
                raise ValueError(f"{name}={getattr(config, name)} is outside the text vocabulary of {vocab} ids")

    # ------------------------------------------------------------------------------ modes, tokens
    def resolution_mode(self, mode: str | None = None) -> ResolutionMode:
        """The :class:`ResolutionMode` named ``mode`` (default ``config.default_mode``)."""
        return resolution_mode(self.adapter.config, mode or self.config.default_mode)

    def num_image_tokens(self, mode: str | None = None) -> int:
        """Tokens one image adds to the text in ``mode``, in closed form (9 / 144 / 720 at full size)."""
        return self.resolution_mode(mode).num_tokens

    # ------------------------------------------------------------------------------ freezing
    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "adapter": self.adapter, "text": self.text}

    def set_trainable(self, vision: bool | None = None, adapter: bool | None = None,
                      text: bool | None = None) -> "MultimodalModel":
        """Freeze (False) or unfreeze (True) each part; None leaves a part as it is."""
        for name, flag in (("vision", vision), ("adapter", adapter), ("text", text)):
            if flag is not None:
                self.parts()[name].requires_grad_(flag)
        return self

    def trainable_parts(self) -> dict[str, bool]:
        """Whether each part has any parameter that requires a gradient."""
        return {name: any(p.requires_grad for p in part.parameters()) for name, part in self.parts().items()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = set()
        for prefix, part in (("vision", self.vision), ("text", self.text)):
            if hasattr(part, "no_weight_decay"):
                names.update(f"{prefix}.{name}" for name in part.no_weight_decay())
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------ images
    def encode_images(self, images: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Image tokens ``(N, num_image_tokens(mode), text_dim)`` of ``images`` ``(N, C, H, W)``.

        The encoder runs without autograd when it is frozen (less memory).
        """
        resolution = self.resolution_mode(mode)
        views = make_views(images, resolution)  # (N * V, C, s, s)
        vision_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(vision_trains):
            prefix, patches, grid = self.vision.forward_grid(views)  # (N * V, P, C), (N * V, Gh*Gw, C)
        tokens = torch.cat([prefix, patches], dim=1)  # (N * V, P + Gh*Gw, C)
        adapted = self.adapter(tokens, grid, resolution.tokens_per_view)  # (N * V, k, D)
        return adapted.reshape(images.shape[0], resolution.num_tokens, adapted.shape[-1])

    # ------------------------------------------------------------------------------ text side
    def _count_images(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> None:
        placeholders = int((input_ids == self.config.image_token_id).sum())
        given = 0 if images is None else images.shape[0]
        if placeholders != given:
            raise ValueError(
                f"input_ids hold {placeholders} image placeholder(s) (token id "
                f"{self.config.image_token_id}) but {given} image(s) were given; expected exactly one "
                f"image per placeholder"
            )

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,  # (B, T)
        images: torch.Tensor | None = None,  # (N, C, H, W)
        mode: str | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, ExpandedInputs]:
        """Decoder input embeddings ``(B, T', D)`` with image tokens spliced in, and the expansion."""
        self._count_images(input_ids, images)
        expanded = expand_image_placeholders(
            input_ids, self.config.image_token_id, self.num_image_tokens(mode), self.config.pad_token_id,
            attention_mask, labels, padding_side,
        )
        device = self.text.embed.weight.device  # ids may live elsewhere (e.g. CPU ids, meta model)
        expanded = ExpandedInputs(*(t.to(device) if t is not None else None for t in expanded))
        embeds = self.text.embed_tokens(expanded.input_ids)  # (B, T', D)
        if images is not None and images.shape[0]:
            image_tokens = self.encode_images(images, mode).to(embeds.dtype)  # (N, K, D)
            slots = expanded.image_mask[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(slots, image_tokens)
        return embeds, expanded

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) with one placeholder per image
        images: torch.Tensor | None = None,  # (N, C, H, W) in placeholder order
        *,
        mode: str | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token
        labels: torch.Tensor | None = None,  # (B, T) unshifted targets; IGNORE_INDEX = no loss
        cache=None,
        padding_side: str = "right",
    ) -> VLOutput:
        """Logits over the expanded sequence, and the captioning loss when ``labels`` are given.

        The loss is the decoder's (cross-entropy + z-loss, + MoE balance loss) on next-token
        targets ``labels[:, 1:]``; image positions and padding are never targets.
        """
        embeds, expanded = self.prepare_inputs(input_ids, images, mode, attention_mask, labels, padding_side)
        logits = self.text(inputs_embeds=embeds, cache=cache, attention_mask=expanded.attention_mask)
        loss, metrics = None, {}
        if expanded.labels is not None:
            targets = torch.full_like(expanded.labels, IGNORE_INDEX)
            targets[:, :-1] = expanded.labels[:, 1:]
            loss, metrics = self.text.loss(logits, targets, ignore_index=IGNORE_INDEX)
            metrics["target_tokens"] = float((targets != IGNORE_INDEX).sum())
        return VLOutput(logits, expanded.image_mask, expanded.input_ids, expanded.labels, loss, metrics)

    # ------------------------------------------------------------------------------ generation
    def _prompt_ids(self, prompt: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids ``(B, T)`` and their attention mask from str / ids / tensor."""
        if isinstance(prompt, torch.Tensor):
            ids = prompt[None] if prompt.ndim == 1 else prompt
            return ids.long(), torch.ones_like(ids, dtype=torch.long)
        if isinstance(prompt, str):
            prompt = [prompt]
        rows: list[list[int]] = []
        for item in prompt:
            if isinstance(item, str):
                if tokenizer is None:
                    raise ValueError("a text prompt needs tokenizer=...; or pass token ids")
                rows.append(tokenizer.encode(item, bos=True))
            elif isinstance(item, int):
                rows = [list(prompt)]
                break
            else:
                rows.append([int(t) for t in item])
        width = max(len(r) for r in rows)
        pad = self.config.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None = None,
        prompt: str | Sequence[int] | Sequence[Sequence[int]] | Sequence[str] | torch.Tensor | None = None,
        *,
        mode: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        eos_id: int | None = None,
        tokenizer: Any = None,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Continue ``prompt`` (holding one placeholder per image) with the KV cache.

        One prefill over the expanded prompt, then one decoder call per new token. Greedy when
        ``temperature`` is 0, else sampling (optionally from the ``top_k`` most likely tokens).
        Rows stop at ``eos_id`` (default: the tokenizer's EOS, if a tokenizer is given); finished
        rows are filled with ``eos_id``.

        Returns:
            New token ids ``(B, max_new_tokens)``, and with ``return_logits`` the float32 logits
            each token was chosen from ``(B, max_new_tokens, V)``.
        """
        if prompt is None or len(prompt) == 0:
            raise ValueError(
                "generate needs a prompt holding one image placeholder per image, e.g. "
                "tokenizer.encode('<image>', bos=True) or the text '<image>' with tokenizer=..."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if eos_id is None and tokenizer is not None:
            eos_id = tokenizer.eos_id
        # The one decode loop (sampling, stop tokens, the KV cache, the decode plan) lives in
        # mmafm.inference, which imports the models: imported here, at call time, so that
        # models/ depends on nothing in it and holds no decoding or kernel logic of its own.
        from mmafm.inference.generate import decode

        device = self.text.embed.weight.device
        ids, mask = self._prompt_ids(prompt, tokenizer)
        ids, mask = ids.to(device), mask.to(device)
        if images is not None:
            images = images.to(device=device, dtype=next(self.vision.parameters()).dtype)
        embeds, expanded = self.prepare_inputs(ids, images, mode, attention_mask=mask, padding_side="left")
        decoded = decode(
            self.text, inputs_embeds=embeds, attention_mask=expanded.attention_mask, max_new_tokens=max_new_tokens,
            temperature=max(temperature, 0.0), top_k=top_k or None, generator=generator,
            stop_tokens=() if eos_id is None else (eos_id,), keep_logits=return_logits,
        )
        # a row that stopped is filled with eos_id: the stop token, then the same again
        rows = [tokens + [eos_id] * (max_new_tokens - len(tokens)) for tokens in decoded.tokens]
        new_tokens = torch.tensor(rows, dtype=torch.long, device=device)  # (B, max_new_tokens)
        if return_logits:
            return new_tokens, decoded.logits
        return new_tokens


# --------------------------------------------------------------------------------------- presets
@register_model("afm_vl_tiny", builder=MultimodalModel)
def afm_vl_tiny() -> MultimodalConfig:
    """Tiny ViTDet-RW + tiny 2025 device decoder for CPU runs: the real layout, toy numbers.

    Modes keep the real proportions at small sizes (patch 16): rapid 48 px (3x3 grid) -> 4 tokens,
    balanced 96 px (6x6 grid) -> 16 tokens, high-res 192 px = 2x2 tiles of 96 + overview -> 80.
    """
    return MultimodalConfig(
        vision_preset="vitdet_large_patch16_rw_tiny", text_preset="afm_2025_device_tiny",
        num_image_tokens=16, rapid_image_tokens=4, rapid_size=48, balanced_size=96,
    )


@register_model("afm_vl_2025_device", builder=MultimodalModel)
def afm_vl_2025_device() -> MultimodalConfig:
    """2025 on-device VLM: ViTDet-L/16 with Register-Window + the 2025 on-device decoder;
    9 / 144 / 720 image tokens in rapid / balanced / high-res [2nd]."""
    return MultimodalConfig(vision_preset="vitdet_large_patch16_rw", text_preset="afm_2025_device")


@register_model("afm_vl_2025_server", builder=MultimodalModel)
def afm_vl_2025_server() -> MultimodalConfig:
    """2025 server VLM: ViT-g/14 + the PT-MoE server decoder (same adapter and modes [open for
    the server: the sources give the modes for the on-device model])."""
    return MultimodalConfig(vision_preset="vit_giant_patch14", text_preset="afm_2025_server")
