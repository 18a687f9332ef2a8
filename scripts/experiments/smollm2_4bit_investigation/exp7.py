# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Perplexity on 1024 tokens of English prose (GPL-3 text) for each variant."""
import sys, os, copy
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
import mmafm
from mmafm.interop.smollm2 import load_smollm2, load_smollm2_tokenizer
from mmafm.compress import dequantized_copy
from common import CACHE as cache, perplexity_printer, prose_ids, q4_0, q8_0, variant
fp = load_smollm2().eval()
dq = dequantized_copy(mmafm.load_model(cache / "smollm2_lut4_emb4").eval())
tok = load_smollm2_tokenizer()
ids = prose_ids(tok)
ev = perplexity_printer(fp, ids)
rs = torch.load("scripts/experiments/smollm2_4bit_investigation/rowscaled.pt")
dm = dict(dq.named_modules())
ours_l = lambda n, w: dm[n].weight; ours_e = lambda n, w: dm[n].weight
ev(fp, "float32")
ev(dq, "ours: LUT4 linears + 4-bit per-row embedding")
ev(variant(fp, lin=ours_l), "ours LUT4 linears only")
ev(variant(fp, emb=ours_e), "ours 4-bit per-row embedding only")
ev(variant(fp, lin=lambda n, w: q4_0(w), emb=lambda n, w: q8_0(w)), "llama.cpp-like Q4_0 linears + Q8_0 embedding")
ev(variant(fp, emb=lambda n, w: q4_0(w)), "Q4_0 embedding only")
ev(variant(fp, lin=lambda n, w: rs[n + ".weight"]), "LUT4 with per-row fp16 scale, linears only")
ev(variant(fp, lin=lambda n, w: rs[n + ".weight"], emb=ours_e), "LUT4 per-row scale + ours 4-bit embedding")
