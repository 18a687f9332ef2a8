"""Inference: the decode loop, sampling, the decode plan and the native CPU kernels.

The models in :mod:`mmafm.models` are plain torch and know nothing of this package; it reads
them. :mod:`~mmafm.inference.generate` holds the one decode loop (text and multimodal prompts),
the sampler and the text helpers; :mod:`~mmafm.inference.plan` decides, from the modules, which
layers of a decode step run in a kernel; :mod:`~mmafm.inference.kernels` builds and binds the C in
``csrc/``. See ``docs/text_model.md``, "Inference". On top of the loop:
:mod:`~mmafm.inference.guided` (typed, grammar-constrained generation),
:mod:`~mmafm.inference.tools` (tool calling) and :mod:`~mmafm.inference.speculative` (draft and
verify); see ``docs/guided_generation.md``. They are imported from their modules (the engines load
on first use).

>>> from mmafm.inference import generate, generate_text, kernels_disabled
"""

from mmafm.inference.generate import (
    Constraint,
    Decoded,
    Step,
    decode,
    decode_steps,
    decode_tokens_per_second,
    generate,
    generate_text,
    left_pad,
    prefill,
    sample_next_token,
    sampling_probs,
)
from mmafm.inference.kernels import kernel_linears, kernels_available, kernels_disabled
from mmafm.inference.plan import DecodePlan, LayerPlan, build_plan

__all__ = [
    "generate",
    "generate_text",
    "decode",
    "decode_steps",
    "Decoded",
    "Step",
    "Constraint",
    "sampling_probs",
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
