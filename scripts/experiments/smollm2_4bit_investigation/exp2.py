# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Independent references: RTN 4-bit group-32 on the same float weights; embedding variants."""
import sys, time, copy, os
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from common import load_models, load_seq, logit_scorer, q4_0, q4_1, q8_0

fp, q, dq = load_models()
seq, P = load_seq()
score = logit_scorer(fp, seq, P)

def perrow4(w, clip=1.0):  # ours, independently: balanced grid s*(c-7.5), s = max|w|/7.5
    s = (clip * w.abs().amax(1, keepdim=True) / 7.5)
    return (torch.round(w / s - 0.5).clamp(-8, 7) + 0.5) * s

def build(lin=None, emb=None, lin_from_dq=False, emb_from_dq=False):
    m = copy.deepcopy(fp)
    dmods = dict(dq.named_modules())
    with torch.no_grad():
        for n, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear):
                if lin_from_dq: mod.weight.copy_(dmods[n].weight)
                elif lin is not None: mod.weight.copy_(lin(mod.weight))
            elif isinstance(mod, torch.nn.Embedding):
                if emb_from_dq: mod.weight.copy_(dmods[n].weight)
                elif emb is not None: mod.weight.copy_(emb(mod.weight))
    return m

def werr(f, w): return float((f(w) - w).norm() / w.norm())
E = fp.embed.weight.data
print("embedding shape", tuple(E.shape), "per-row max/rms: median", float((E.abs().amax(1) / E.pow(2).mean(1).sqrt()).median()),
      "max", float((E.abs().amax(1) / E.pow(2).mean(1).sqrt()).max()))
print("embedding weight rel err: ours(dq)", float((dq.embed.weight - E).norm() / E.norm()),
      "indep perrow4", werr(perrow4, E), "q4_0 g32", werr(q4_0, E), "q4_1 g32", werr(q4_1, E), "q8_0", werr(q8_0, E))
print("independent per-row-4bit == ours:", float((perrow4(E) - dq.embed.weight).abs().max()))
W = fp.layers[0].ffn.w_up.weight.data if hasattr(fp.layers[0], "ffn") else None
for n, mod in fp.named_modules():
    if n.endswith("layers.5.ffn.w_up") or n.endswith("layers.5.attn.q_proj"):
        w = mod.weight.data
        print(n, "rel err: lut4(ours)", float((dict(dq.named_modules())[n].weight - w).norm() / w.norm()),
              "q4_0", werr(q4_0, w), "q4_1", werr(q4_1, w))

score(build(lin=q4_0, emb=q8_0), "llama.cpp-like: linears Q4_0, embedding Q8_0")
score(build(lin=q4_1, emb=None), "linears Q4_1 g32 RTN, float embedding")
score(build(lin=q4_0, emb=None), "linears Q4_0 g32 RTN, float embedding")
score(build(lin=None, emb=q8_0), "only embedding Q8_0")
score(build(lin=None, emb=q4_0), "only embedding Q4_0 g32")
score(build(lin=None, emb=perrow4), "only embedding 4-bit per row (independent)")
score(build(lin_from_dq=True, emb=None), "ours linears LUT4, float embedding")
score(build(lin_from_dq=True, emb=q8_0), "ours linears LUT4, Q8_0 embedding")
score(build(lin_from_dq=True, emb=q4_0), "ours linears LUT4, Q4_0 g32 embedding")
score(build(lin_from_dq=True, emb_from_dq=True), "ours all (LUT4 + per-row 4-bit emb)")
