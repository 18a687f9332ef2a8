# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Packed whole-step vs dequantized module path; k-means vs an independent exact DP."""
import sys, time, os
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from mmafm.compress import set_act_dtype
from mmafm.compress import kmeans
from mmafm.compress.palettize import fit_lut
from mmafm.inference.plan import build_plan
from common import load_models, load_seq

fp, q, dq = load_models()
seq, P = load_seq()
set_act_dtype(q, "float32")
with torch.no_grad():
    ref = dq(seq)[0]
    c = q.new_cache(1, seq.shape[1])
    q(seq[:, :P - 1], cache=c)
    plan = build_plan(q, c)
    print(plan.describe().splitlines()[0])
    steps = torch.cat([plan.step(seq[:, t]) for t in range(P - 1, seq.shape[1] - 1)])
    # the packed model's own module path (PackedLinear.forward -> lut_linear GEMV, full sequence)
    own = q(seq)[0]
sl = slice(P - 1, seq.shape[1] - 1)
for name, lg in (("packed whole step", steps), ("packed module path", own[sl])):
    b = ref[sl]
    print(f"{name} vs dequantized F.linear: max rel err {float(((lg - b).norm(dim=-1) / b.norm(dim=-1)).max()):.2e}, "
          f"top1 {float((lg.argmax(-1) == b.argmax(-1)).float().mean()):.3f}")

# --- k-means on one weight group vs an independent exact DP (numpy) ---
name = "layers.5.ffn.w_up"
w = dict(fp.named_modules())[name].weight.data
pm = dict(q.named_modules())[name]
print(name, pm)

def sse(x, lut):
    lut = np.sort(lut)
    b = (lut[1:] + lut[:-1]) / 2
    return float(((x - lut[np.searchsorted(b, x)]) ** 2).sum())

def exact_dp(x, k):
    x = np.sort(x.astype(np.float64)); n = len(x)
    s1 = np.concatenate([[0], np.cumsum(x)]); s2 = np.concatenate([[0], np.cumsum(x * x)])
    def cost(j, i):  # points j..i-1 (arrays)
        cnt = i - j; t = s1[i] - s1[j]
        return np.where(cnt > 0, s2[i] - s2[j] - t * t / np.maximum(cnt, 1), np.inf)
    D = cost(np.zeros(n + 1, dtype=int), np.arange(n + 1)); D[0] = 0
    back = []
    for _ in range(1, k):
        # divide and conquer optimisation (monotone split points): exact for 1-D k-means
        new = np.full(n + 1, np.inf); arg = np.zeros(n + 1, dtype=int)
        def solve(lo, hi, olo, ohi):
            if lo > hi: return
            mid = (lo + hi) // 2
            js = np.arange(olo, min(mid, ohi) + 1)
            v = D[js] + cost(js, np.full_like(js, mid))
            a = int(np.argmin(v)); new[mid] = v[a]; arg[mid] = js[a]
            solve(lo, mid - 1, olo, js[a]); solve(mid + 1, hi, js[a], ohi)
        solve(0, n, 0, n)
        D = new; back.append(arg)
    # recover centroids
    cents = []; end = n
    for c in range(k - 1, -1, -1):
        beg = back[c - 1][end] if c > 0 else 0
        cents.append((s1[end] - s1[beg]) / max(end - beg, 1)); end = beg
    return np.array(cents[::-1]), float(D[n])

sys.setrecursionlimit(10000)
for g in (0, 7, 40):
    x = w[16 * g:16 * (g + 1)].reshape(-1).double().numpy()
    cached = pm.lut[g].float().numpy()
    t = time.time(); cents, opt = exact_dp(x, 16); tdp = time.time() - t
    fresh = {}
    for bins in (64, 128):
        kmeans.SUMMARY_BINS = bins
        fresh[bins] = kmeans.kmeans_1d(torch.from_numpy(x)[None], 16)[0].numpy()
    rtn = x.reshape(16, -1, 32)
    print(f"group {g}: n={len(x)} distinct={len(np.unique(x))} exact-DP SSE {opt:.5e} ({tdp:.0f}s) | cached fp16 LUT SSE {sse(x, cached):.5e} "
          f"ratio {sse(x, cached)/opt:.4f} | fresh bins64 {sse(x, fresh[64])/opt:.4f} bins128 {sse(x, fresh[128])/opt:.4f} "
          f"| exact fp16 {sse(x, cents.astype(np.float16).astype(np.float64))/opt:.4f}", flush=True)
    print("   cached LUT", np.round(cached, 4))
    print("   exact  LUT", np.round(cents, 4))
# also: the whole layer's weight relative error, cached vs exact group-wise
