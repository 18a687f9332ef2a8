"""Model compression with accuracy recovery (docs/compression.md; WAVE2.md "Compression").

- :mod:`~mmafm.compress.kmeans`: exact 1-D k-means (dynamic programming) for lookup tables;
- :mod:`~mmafm.compress.packed`: packed 2/4/8-bit codes + fp16 tables as linear / embedding modules;
- :mod:`~mmafm.compress.palettize`: post-training palettization (2024) and per-channel embeddings;
- :mod:`~mmafm.compress.qat`: 2-bit quantization-aware training with a learnable clip (2025);
- :mod:`~mmafm.compress.bits`: bits per weight, counted and in closed form;
- :mod:`~mmafm.compress.storage`: compressed checkpoints (packed codes + tables in safetensors).
"""

from mmafm.compress.bits import bits_per_weight, closed_form_bpw, compressed_megabytes
from mmafm.compress.kmeans import kmeans_1d
from mmafm.compress.packed import PackedEmbedding, PackedLinear, pack_codes, set_act_dtype, unpack_codes
from mmafm.compress.palettize import compress_model, dequantized_copy, fit_lut, quantize_embedding
from mmafm.compress.qat import QATEmbedding, QATLinear, convert_qat, fake_quantize, prepare_qat
from mmafm.compress.storage import load_compressed, save_compressed

__all__ = [
    "bits_per_weight", "closed_form_bpw", "compressed_megabytes", "kmeans_1d", "PackedLinear", "PackedEmbedding",
    "pack_codes", "unpack_codes", "set_act_dtype", "compress_model", "dequantized_copy", "fit_lut", "quantize_embedding",
    "QATLinear", "QATEmbedding", "prepare_qat", "convert_qat", "fake_quantize", "save_compressed", "load_compressed",
]
