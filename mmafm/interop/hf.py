"""Hugging Face transformers interop for the dense text models: export to Qwen3 / Llama, import back.

The dense AFM text model (2024 on-device layout, REFERENCE.md "Text model": pre-RMSNorm, GQA,
QK RMSNorm per head, SwiGLU, RoPE in the rotate-half convention, tied embedding) is, tensor for
tensor, the architecture transformers calls ``Qwen3ForCausalLM``; with QK-norm switched off it is
``LlamaForCausalLM``. So a trained mmafm checkpoint can be served by any tool that reads those
formats, and a real pretrained Llama-layout model (see :mod:`mmafm.interop.smollm2`) can be loaded
into :class:`mmafm.models.text.TextModel`.

Only the *dense* variants map: KV sharing (2025 device), sliding-window / NoPE layer interleaves
and PT-MoE (2025 server) have no counterpart in these layouts and are refused with an error.

Usage::

    from mmafm.interop.hf import to_hf, save_hf, from_hf
    hf_model = to_hf(model)                 # transformers.Qwen3ForCausalLM (qk_norm=True)
    save_hf(model, "export/afm_tiny")       # save_pretrained folder (config.json + safetensors)
    model = from_hf("export/afm_tiny")      # back to TextModel
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "InteropError",
    "LAYOUTS",
    "default_layout",
    "check_dense",
    "hf_config",
    "text_config_from_hf",
    "state_dict_to_hf",
    "state_dict_from_hf",
    "to_hf",
    "save_hf",
    "from_hf",
    "from_hf_state_dict",
    "new_hf_model",
    "load_hf_weights",
    "hf_module_name",
    "module_name_from_hf",
]

LAYOUTS = ("qwen3", "llama")

# ours -> transformers, per decoder layer (``{i}`` is the layer index)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# (TextConfig field, transformers config field) that carry the same number under two names
_CONFIG_NAMES = (
    ("vocab_size", "vocab_size"),
    ("dim", "hidden_size"),
    ("ffn_dim", "intermediate_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("n_kv_heads", "num_key_value_heads"),
    ("max_seq_len", "max_position_embeddings"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
)


# (TextConfig field, value) a plain dense decoder has; anything else has no transformers layout
_DENSE_FIELDS = (
    ("kv_share_segments", None),  # 2025 device: segment-2 layers reuse segment 1's K/V
    ("local_global_pattern", None),  # 2025 server: sliding-window + NoPE global layers
    ("num_experts", 0),  # MoE teacher / PT-MoE experts
    ("num_tracks", 1),  # PT-MoE tracks
)


class InteropError(ValueError):
    """A model or checkpoint that does not fit the requested transformers layout."""


def default_layout(config: Any) -> str:
    """``"qwen3"`` for a model with QK-norm, ``"llama"`` without (the layouts that match it)."""
    return "qwen3" if config.qk_norm else "llama"


def check_dense(config: Any, layout: str | None = None) -> str:
    """Refuse configs a plain transformers decoder cannot represent; returns the layout to use.

    Raises:
        InteropError: naming the offending config field and the value the layout needs.
    """
    layout = layout or default_layout(config)
    if layout not in LAYOUTS:
        raise InteropError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if layout == "qwen3" and not config.qk_norm:
        raise InteropError("the qwen3 layout has QK-norm in every layer; this config has qk_norm=False "
                           "(export with layout='llama')")
    if layout == "llama" and config.qk_norm:
        raise InteropError("the llama layout has no QK-norm; this config has qk_norm=True "
                           "(export with layout='qwen3')")
    for name, dense_value in _DENSE_FIELDS:
        value = getattr(config, name)
        if value != dense_value:
            raise InteropError(
                f"only dense text models export to transformers: config field {name}={value!r}, "
                f"expected {dense_value!r}"
            )
    return layout


def hf_config(config: Any, layout: str | None = None, **extra: Any):
    """The ``transformers`` config (``Qwen3Config`` or ``LlamaConfig``) of a dense TextConfig.

    Args:
        extra: passed on to the transformers config, e.g. ``bos_token_id``, ``eos_token_id``.
    """
    from transformers import LlamaConfig, Qwen3Config

    layout = check_dense(config, layout)
    common = {hf_name: getattr(config, name) for name, hf_name in _CONFIG_NAMES}
    common.update(
        head_dim=config.head_dim,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
    )
    common.update(extra)
    if layout == "qwen3":
        return Qwen3Config(use_sliding_window=False, **common)
    return LlamaConfig(mlp_bias=False, **common)


def text_config_from_hf(hf_cfg: Any, **overrides: Any):
    """A :class:`~mmafm.models.text.TextConfig` for a transformers Qwen3 / Llama config.

    Raises:
        InteropError: for another architecture, biases, sliding windows or rope scaling.
    """
    from mmafm.models.text import TextConfig

    model_type = getattr(hf_cfg, "model_type", None)
    if model_type not in LAYOUTS:
        raise InteropError(f"expected a transformers config of model_type in {list(LAYOUTS)}, got {model_type!r}")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise InteropError(f"{model_type} config has attention_bias/mlp_bias=True; TextModel has no biases")
    if getattr(hf_cfg, "use_sliding_window", False):
        raise InteropError(f"{model_type} config has use_sliding_window=True; expected False")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise InteropError(f"{model_type} config has hidden_act={hf_cfg.hidden_act!r}; expected 'silu' (SwiGLU)")
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InteropError(f"{model_type} config has rope_type={rope.get('rope_type')!r}; expected 'default'")
    rope_theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    values = {name: getattr(hf_cfg, hf_name) for name, hf_name in _CONFIG_NAMES}
    values.update(
        head_dim=head_dim,
        norm_eps=float(hf_cfg.rms_norm_eps),
        rope_theta=float(rope_theta),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )
    values.update(overrides)
    return TextConfig(**values)


_HF_LAYER_NAMES = {hf: ours for ours, hf in _LAYER_NAMES.items()}  # transformers -> ours
_HF_GLOBAL_NAMES = {hf: ours for ours, hf in _GLOBAL_NAMES.items()}


def _renamed(name: str, to_hf: bool, kind: str, suffix: str = "") -> str:
    """``name`` in the other convention: ours -> transformers with ``to_hf``, else back.

    One renaming for tensors and modules alike: a module path is renamed as its ``suffix``
    tensor (``.weight``), which is then cut off again.

    Raises:
        InteropError: ``name`` (a ``kind``, e.g. "tensor") has no counterpart in the other layout.
    """
    if to_hf:
        layer_table, global_table, layer_re, layer_prefix = _LAYER_NAMES, _GLOBAL_NAMES, _OURS_LAYER, "model.layers."
        source, target = "TextModel", "the transformers layout"
    else:
        layer_table, global_table, layer_re, layer_prefix = _HF_LAYER_NAMES, _HF_GLOBAL_NAMES, _HF_LAYER, "layers."
        source, target = "transformers", "TextModel"
    match = layer_re.match(name + suffix)
    if match:
        index, rest = match.groups()
        other = f"{layer_prefix}{index}.{layer_table[rest]}" if rest in layer_table else None
    else:
        other = global_table.get(name + suffix)
    if other is None:
        raise InteropError(f"{source} {kind} {name!r} has no counterpart in {target}")
    return other[: len(other) - len(suffix)]


def hf_module_name(name: str) -> str:
    """A TextModel module path in transformers' names (``layers.3.attn.q_proj`` ->
    ``model.layers.3.self_attn.q_proj``), e.g. for LoRA adapters (:mod:`mmafm.lora.peft`).

    Raises:
        InteropError: a module with no transformers counterpart.
    """
    return _renamed(name, True, "module", ".weight")


def module_name_from_hf(hf_name: str) -> str:
    """The inverse of :func:`hf_module_name` (``model.layers.3.mlp.up_proj`` -> ``layers.3.ffn.w_up``)."""
    return _renamed(hf_name, False, "module", ".weight")


def state_dict_to_hf(state_dict: dict[str, torch.Tensor], config: Any, layout: str | None = None) -> dict[str, torch.Tensor]:
    """Rename a TextModel state dict to transformers' names (tied output: no ``lm_head``).

    Raises:
        InteropError: a tensor that has no place in the layout (e.g. QK-norm in llama layout).
    """
    check_dense(config, layout)
    return {_renamed(name, True, "tensor"): tensor for name, tensor in state_dict.items()
            if not (name == "lm_head.weight" and config.tie_embeddings)}


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename a transformers Qwen3/Llama state dict to TextModel's names.

    Rotary ``inv_freq`` buffers are dropped (TextModel computes its own from ``rope_theta``);
    with tied embeddings ``lm_head.weight`` is dropped too.
    """
    return {_renamed(name, False, "tensor"): tensor for name, tensor in hf_state_dict.items()
            if not (name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings))}


def _load_exact(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load tensors that must cover every parameter of ``model`` (tied weights counted once).

    ``model`` may be built on the meta device or without initialisation: the tensors are
    assigned, and any parameter or buffer left on meta afterwards is an error.
    """
    own = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(p for p in params if p not in tensors)
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in tensors.items()
             if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise InteropError(f"{what} does not fit {type(model).__name__}: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}, shape mismatches {wrong[:4]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise InteropError(f"{what}: {type(model).__name__} tensors left unset: {left[:6]}")


def new_hf_model(cls: type, hf_cfg: Any) -> nn.Module:
    """A transformers model built without random initialisation (its weights are loaded next)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return cls(hf_cfg)


def load_hf_weights(hf_model: nn.Module, tensors: dict[str, torch.Tensor], what: str = "weights") -> nn.Module:
    """Load every parameter of a :func:`new_hf_model` model, re-tie its head, set eval mode.

    Raises:
        InteropError: a missing, unexpected or mis-shaped tensor (named in the message).
    """
    tied = hf_model.config.tie_word_embeddings
    if tied:  # no_init_weights skipped the tying; tie first so lm_head is not asked for
        hf_model.tie_weights()
    _load_exact(hf_model, tensors, what)
    if tied:  # assigning the embedding replaced the shared Parameter: tie the head to the new one
        hf_model.tie_weights()
    return hf_model.eval()


def to_hf(model: nn.Module, layout: str | None = None, dtype: torch.dtype | None = None, **config_extra: Any):
    """A transformers ``Qwen3ForCausalLM`` / ``LlamaForCausalLM`` holding ``model``'s weights."""
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    config = model.config
    layout = check_dense(config, layout)
    cfg = hf_config(config, layout, **config_extra)
    cls = Qwen3ForCausalLM if layout == "qwen3" else LlamaForCausalLM
    param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    # the base only: LoRA factors (mmafm.lora) export separately, in peft's format
    ours = {k: v for k, v in model.state_dict().items() if k in param_names and not k.endswith((".lora_A", ".lora_B"))}
    tensors = state_dict_to_hf(ours, config, layout)
    hf_model = new_hf_model(cls, cfg)
    load_hf_weights(hf_model, {k: v.detach().clone() for k, v in tensors.items()}, f"{type(model).__name__} export")
    return hf_model.to(dtype) if dtype is not None else hf_model


def save_hf(model: nn.Module, path: str | Path, layout: str | None = None, tokenizer: Any = None,
            **config_extra: Any) -> Path:
    """Write ``model`` as a transformers ``save_pretrained`` folder (and ``tokenizer`` if given)."""
    path = Path(path)
    hf_model = to_hf(model, layout, **config_extra)
    hf_model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def from_hf(source: Any, **config_overrides: Any):
    """A :class:`~mmafm.models.text.TextModel` from a transformers model or ``save_pretrained`` folder.

    Args:
        source: a ``Qwen3ForCausalLM`` / ``LlamaForCausalLM`` instance, or a folder path.
        config_overrides: TextConfig fields to set beyond those read from the transformers config.
    """
    if isinstance(source, (str, Path)):
        from transformers import AutoModelForCausalLM

        if not Path(source).is_dir():
            raise InteropError(f"transformers model folder not found: {source}")
        source = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    return from_hf_state_dict(source.config, source.state_dict(), **config_overrides)


def from_hf_state_dict(hf_cfg: Any, hf_state_dict: dict[str, torch.Tensor], **config_overrides: Any):
    """A :class:`~mmafm.models.text.TextModel` (eval mode, float32) from a transformers config and
    state dict in transformers' names (what :func:`from_hf` reads off a model)."""
    from mmafm.models.text import TextModel

    config = text_config_from_hf(hf_cfg, **config_overrides)
    with torch.device("meta"):  # no random init: every parameter is assigned below
        model = TextModel(config)
    tensors = state_dict_from_hf(hf_state_dict, config)
    _load_exact(model, {k: v.detach().float().clone() for k, v in tensors.items()}, "transformers state dict")
    return model.eval()
