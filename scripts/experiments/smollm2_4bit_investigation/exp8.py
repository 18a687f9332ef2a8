# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
import sys, os, copy, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from mmafm.interop.smollm2 import load_smollm2
from mmafm.compress import kmeans
from mmafm.compress.palettize import fit_lut
kmeans.SUMMARY_BINS = 64
fp = load_smollm2().eval()
sd = {}
t = time.time()
with torch.no_grad():
    for n, mod in fp.named_modules():
        if isinstance(mod, torch.nn.Linear):
            c, lut = fit_lut(mod.weight.data, 4, 1, 0)
            sd[n + ".weight"] = lut.float().gather(1, c)
print("per-row LUT fitted", time.time() - t)
torch.save(sd, "scripts/experiments/smollm2_4bit_investigation/perrow.pt")
