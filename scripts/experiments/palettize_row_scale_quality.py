# Experiment record (issue 15, 2026-11-30; docs/compression.md, "Row scales"): run from the repo root.
"""Quality of 4-bit palettized SmolLM2 with and without per-channel (row) scales:
perplexity on GPL-3's first 1024 tokens and top-1 agreement with float."""
import sys, math, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
import bench_compress
from mmafm.compress import kmeans, bits_per_weight
from mmafm.interop.smollm2 import load_smollm2, load_smollm2_tokenizer

kmeans.SUMMARY_BINS = 64  # as bench_compress's default
tok = load_smollm2_tokenizer()
text = open("/usr/share/common-licenses/GPL-3").read()
ids = torch.tensor(tok.encode(text)[:1024])[None]

def logits(model):
    with torch.no_grad():
        return model(ids).float()[0]  # (T, V)

def ppl(lg):
    return math.exp(torch.nn.functional.cross_entropy(lg[:-1], ids[0, 1:]).item())

ref = logits(load_smollm2())
print(f"float32: ppl {ppl(ref):.2f}", flush=True)
for pcs in (False, True):
    start = time.time()
    model = bench_compress.compressed_smollm2(4, 4, per_channel_scale=pcs)
    lg = logits(model)
    agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"lut4 emb4 per_channel_scale={pcs}: bpw {bits_per_weight(model):.4f} "
          f"(linears {bits_per_weight(model, include_embedding=False):.4f}) ppl {ppl(lg):.2f} "
          f"top-1 agreement {agree:.3f} ({time.time() - start:.0f} s)", flush=True)
