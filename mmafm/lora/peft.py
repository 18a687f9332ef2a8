"""LoRA adapters to and from peft's format, for the base exported to transformers.

The dense text models export to transformers as ``Qwen3ForCausalLM`` / ``LlamaForCausalLM``
(:func:`mmafm.interop.hf.to_hf`); an adapter over such a model maps one to one onto a peft LoRA
adapter over the export (peft 0.21, ``LoraConfig`` + ``PeftModel``):

- folder: ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``
  ...) and ``adapter_model.safetensors``;
- tensors: ``base_model.model.<transformers module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
  (out, r), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` for our
  ``layers.0.attn.q_proj.lora_A``; the scale is ``lora_alpha / r`` as ours (``use_rslora``:
  ``lora_alpha / sqrt(r)``, imported as alpha ``lora_alpha * sqrt(r)``).

>>> to_peft(adapters, "export/date_place_peft", "date_place")           # PeftModel.from_pretrained reads it
>>> from_peft(adapters, "peft_run/checkpoint-100", name="from_peft")    # a LoRA trained with peft

What peft can express and ours cannot (DoRA, LoRA biases, ``modules_to_save``, per-module ranks
or alphas, ``fan_in_fan_out``) is refused with an :class:`~mmafm.interop.hf.InteropError`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from mmafm.interop.hf import InteropError, check_dense, hf_module_name, module_name_from_hf
from mmafm.io import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from mmafm.lora.adapters import AdapterInfo, Adapters

__all__ = ["PEFT_PREFIX", "peft_config", "to_peft_state_dict", "to_peft", "from_peft_state_dict", "from_peft"]

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _check_base(adapters: "Adapters") -> None:
    config = getattr(adapters.model, "config", None)
    if config is None or not hasattr(config, "kv_share_segments"):
        raise InteropError(f"peft export needs a dense text model, got {type(adapters.model).__name__}")
    check_dense(config)


def _target_modules(hf_modules: list[str], all_hf_modules: list[str]) -> list[str]:
    """Leaf names when the adapter covers every module of those leaves, else the full names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in hf_modules})
    every = [name for name in all_hf_modules if name.rsplit(".", 1)[-1] in leaves]
    return leaves if sorted(every) == sorted(hf_modules) else sorted(hf_modules)


def peft_config(adapters: "Adapters", name: str, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of adapter ``name`` (a plain LoRA ``LoraConfig``)."""
    info = adapters.info(name)
    hf_modules = [hf_module_name(module) for module in info.modules]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": info.rank,
        "lora_alpha": info.alpha,
        "lora_dropout": adapters.dropout,
        "target_modules": _target_modules(hf_modules, [hf_module_name(m) for m in adapters.modules]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def to_peft_state_dict(adapters: "Adapters", name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` under peft's tensor names (what ``adapter_model.safetensors`` holds)."""
    _check_base(adapters)
    out = {}
    for key, tensor in adapters.state(name).items():
        module, factor = key.rsplit(".", 1)
        out[f"{PEFT_PREFIX}{hf_module_name(module)}.{factor}.weight"] = tensor.contiguous()
    return out


def to_peft(adapters: "Adapters", path: str | Path, name: str | None = None,
            base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write adapter ``name`` (default the active one) as a peft adapter folder; returns it.
    ``PeftModel.from_pretrained(to_hf(model), path)`` then computes what ours does."""
    name = name or adapters.active
    if name is None:
        raise ValueError("to_peft: no adapter named and none active")
    path = Path(path)
    tensors = {k: v.to("cpu", dtype or v.dtype) for k, v in to_peft_state_dict(adapters, name).items()}
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(path / CONFIG_FILE, peft_config(adapters, name, base_model_name_or_path))
    return path


def _alpha(config: dict[str, Any]) -> tuple[int, float]:
    """``(rank, alpha in our convention)`` of a peft LoRA config; refuses what ours cannot hold."""
    def refuse(what: str) -> InteropError:
        return InteropError(f"peft adapter with {what} has no mmafm LoRA counterpart")

    peft_type = config.get("peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":  # a PeftType enum or its string
        raise refuse(f"peft_type={config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        raise refuse("use_dora=True (DoRA)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise refuse(f"bias={config.get('bias')!r} / lora_bias={config.get('lora_bias')!r}")
    if config.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out=True (Conv1D-style weights)")
    if config.get("modules_to_save"):
        raise refuse(f"modules_to_save={config.get('modules_to_save')!r} (fully trained modules)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise refuse("rank_pattern / alpha_pattern (per-module ranks or alphas)")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # peft scales by alpha / sqrt(r); ours by alpha / r
    return rank, alpha


def from_peft_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft tensor names (with or without the ``base_model.model.`` prefix and an adapter name
    before ``.weight``) -> ours ``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}``."""
    out = {}
    for key, tensor in tensors.items():
        stem = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        parts = stem.split(".")
        factor_at = next((i for i, part in enumerate(parts) if part in ("lora_A", "lora_B")), None)
        if factor_at is None or parts[-1] != "weight":
            raise InteropError(f"peft tensor {key!r} is not a LoRA factor (lora_A / lora_B weight)")
        module = module_name_from_hf(".".join(parts[:factor_at]))
        out[f"{module}.{parts[factor_at]}"] = tensor
    return out


def from_peft(adapters: "Adapters", source: str | Path | Any, name: str = "peft",
              adapter_name: str = "default") -> "AdapterInfo":
    """Load a peft LoRA adapter (a folder ``save_pretrained`` wrote, or a live ``PeftModel``
    with adapter ``adapter_name``) into a slot of ``adapters`` as adapter ``name``.

    Raises:
        InteropError: a config ours cannot express, or a tensor with no counterpart.
    """
    _check_base(adapters)
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise InteropError(f"{folder} is not a peft adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    else:
        from peft import get_peft_model_state_dict

        config = source.peft_config[adapter_name].to_dict()
        tensors = {k: v.detach() for k, v in get_peft_model_state_dict(source, adapter_name=adapter_name).items()}
    rank, alpha = _alpha(config)
    ours = from_peft_state_dict(tensors)
    reference = next(iter(adapters.modules.values())).lora_A
    ours = {k: v.to(reference.device, reference.dtype) for k, v in ours.items()}
    targets = config.get("target_modules")
    summary = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "use_rslora": config.get("use_rslora"),
               "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
               "base_model_name_or_path": config.get("base_model_name_or_path")}
    return adapters.put(name, ours, rank, alpha, metadata={"imported_from": "peft", "peft_config": summary})
