# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""What would help (not a fix of a bug): per-row scale before the shared LUT; searched embedding clip."""
import sys, os, copy, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
import mmafm
from mmafm.interop.smollm2 import load_smollm2
from mmafm.compress import kmeans
from mmafm.compress.palettize import fit_lut, quantize_uniform
from common import load_seq, logit_scorer
kmeans.SUMMARY_BINS = 64
fp = load_smollm2().eval()
seq, P = load_seq()
score = logit_scorer(fp, seq, P)

E = fp.embed.weight.data
codes, scale = quantize_uniform(E, 4, None)
Eq = scale.float()[:, None] * (codes.float() - 7.5)
print("embedding 4-bit per row, searched clip: weight rel err", float((Eq - E).norm() / E.norm()))
m = copy.deepcopy(fp); m.embed.weight.data.copy_(Eq); score(m, "only embedding 4-bit per row, searched clip")

t = time.time()
m = copy.deepcopy(fp)
errs = []
with torch.no_grad():
    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            W = mod.weight.data
            s = W.abs().amax(1, keepdim=True).half().float()  # fp16 per-row scale (+16 bits / row)
            c, lut = fit_lut(W / s, 4, 16, 0)
            Wq = lut.float()[torch.arange(W.shape[0])[:, None] // 16, c] * s
            errs.append(float((Wq - W).norm() / W.norm()))
            mod.weight.copy_(Wq)
print(f"per-row-scaled LUT4 fitted in {time.time() - t:.0f}s; weight rel err mean {sum(errs)/len(errs):.4f}", flush=True)
score(m, "linears LUT4 with a per-row scale, float embedding")
m2 = copy.deepcopy(m); m2.embed.weight.data.copy_(Eq)
score(m2, "  + embedding 4-bit searched clip")
torch.save({n: p for n, p in m.state_dict().items()}, "scripts/experiments/smollm2_4bit_investigation/rowscaled.pt")
