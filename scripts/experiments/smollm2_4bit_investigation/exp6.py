# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
import sys, os, copy, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
import mmafm
from mmafm.interop.smollm2 import load_smollm2
from mmafm.compress import kmeans, dequantized_copy
from mmafm.compress.palettize import fit_lut
from common import CACHE as cache, load_seq, logit_scorer
fp = load_smollm2().eval()
q = mmafm.load_model(cache / "smollm2_lut4_emb4").eval()
dq = dequantized_copy(q)
seq, P = load_seq()
score = logit_scorer(fp, seq, P)
# the group holding the largest |w| of one matrix, with its table
pm = dict(q.named_modules()); W = dict(fp.named_modules())["layers.29.ffn.w_down"].weight.data
r = int(W.abs().amax(1).argmax()); g = r // 16
grp = W[16 * g:16 * g + 16]
print("layers.29.ffn.w_down: group", g, "row max|w|", [round(float(x), 2) for x in grp.abs().amax(1)])
print("  group table", [round(float(x), 3) for x in pm["layers.29.ffn.w_down"].lut[g].float()])
print("  |w| > 1 in group:", int((grp.abs() > 1).sum()), "of", grp.numel(), "; rms", float(grp.pow(2).mean().sqrt()))
kmeans.SUMMARY_BINS = 128
m = copy.deepcopy(fp); t = time.time()
with torch.no_grad():
    for n, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            c, lut = fit_lut(mod.weight.data, 4, 16, 0)
            mod.weight.copy_(lut.float()[torch.arange(c.shape[0])[:, None] // 16, c])
print(f"refit bins128 in {time.time()-t:.0f}s")
score(m, "linears LUT4 refit with 128 summary bins, float emb")
score(dq, "cached (bins 64), all")
m.embed.weight.data.copy_(dq.embed.weight.data)
score(m, "bins128 linears + ours emb")
