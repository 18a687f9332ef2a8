"""Inference: the decode loop, sampling, the decode plan and the native CPU kernels.

The models in :mod:`mmafm.models` are plain torch and know nothing of this package; it reads
them. :mod:`~mmafm.inference.generate` holds the one decode loop (text and multimodal prompts),
the sampler and the text helpers; :mod:`~mmafm.inference.plan` decides, from the modules, which
layers of a decode step run in a kernel; :mod:`~mmafm.inference.kernels` builds and binds the C in
``csrc/``. See ``docs/text_model.md``, "Inference".

>>> from mmafm.inference import generate, generate_text, kernels_disabled
"""

from mmafm.inference.generate import (
    Decoded,
    decode,
    decode_tokens_per_second,
    generate,
    generate_text,
    left_pad,
    prefill,
    sample_next_token,
)
from mmafm.inference.kernels import kernel_linears, kernels_available, kernels_disabled
from mmafm.inference.plan import DecodePlan, LayerPlan, build_plan

__all__ = [
    "generate",
    "generate_text",
    "decode",
    "Decoded",
    "prefill",
    "sample_next_token",
    "left_pad",
    "decode_tokens_per_second",
    "build_plan",
    "DecodePlan",
    "LayerPlan",
    "kernels_available",
    "kernels_disabled",
    "kernel_linears",
]
