"""LoRA adapters over a frozen base: attach, train, hot-swap, mix per row, merge, save, interop.

:mod:`~mmafm.lora.adapters` attaches LoRA to any registered model and drives the slots;
:mod:`~mmafm.lora.files` writes and reads adapter files bound to their base;
:mod:`~mmafm.lora.sizes` computes adapter sizes of the full-size presets;
:mod:`~mmafm.lora.peft` converts adapters to and from peft's format (for the base exported to
transformers). The module type itself is :class:`mmafm.layers.lora.LoRALinear`. See
``docs/adapters.md``.

>>> from mmafm.lora import attach_lora, adapters_of
"""

from mmafm.layers.lora import LoRALinear
from mmafm.lora.adapters import DEFAULT_TARGETS, AdapterInfo, Adapters, adapters_of, attach_lora, target_modules
from mmafm.lora.files import AdapterFileError, BaseMismatchError, base_fingerprint, read_adapter
from mmafm.lora.sizes import adapter_size, adapter_size_table

__all__ = [
    "attach_lora",
    "adapters_of",
    "Adapters",
    "AdapterInfo",
    "LoRALinear",
    "DEFAULT_TARGETS",
    "target_modules",
    "base_fingerprint",
    "read_adapter",
    "AdapterFileError",
    "BaseMismatchError",
    "adapter_size",
    "adapter_size_table",
]
