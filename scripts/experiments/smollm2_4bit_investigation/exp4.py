# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Output error with real activations per linear: LUT4 (ours) vs Q4_0; per-layer logit blame."""
import sys, os, copy
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from common import load_models, load_seq, q4_0
fp, q, dq = load_models()
seq, P = load_seq()

inputs = {}
hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0][0].detach()))
         for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)]
with torch.no_grad():
    ref = fp(seq)[0]
for h in hooks: h.remove()
dmods = dict(dq.named_modules())
kinds = {}
worst = []
for n, m in fp.named_modules():
    if not isinstance(m, torch.nn.Linear): continue
    W = m.weight.data; X = inputs[n]
    Y = X @ W.T
    e_lut = float((X @ (dmods[n].weight.data - W).T).norm() / Y.norm())
    Wq = q4_0(W)
    e_q40 = float((X @ (Wq - W).T).norm() / Y.norm())
    # error on the largest 0.1% |w| vs all
    dl, d0 = (dmods[n].weight.data - W).abs(), (Wq - W).abs()
    thr = W.abs().flatten().kthvalue(int(W.numel() * 0.999)).values
    big = W.abs() > thr
    k = n.split(".")[-1]
    kinds.setdefault(k, []).append((e_lut, e_q40, float(dl[big].mean() / W.abs()[big].mean()), float(d0[big].mean() / W.abs()[big].mean()),
                                    float(dl.max()), float(d0.max()), float(W.abs().max())))
    worst.append((e_lut / e_q40, e_lut, e_q40, n))
print("kind: output rel err LUT4 / Q4_0 (mean, max); rel err on top-0.1% |w| LUT4 / Q4_0; max |dW| LUT4 / Q4_0 / max|W|")
for k, v in kinds.items():
    a = np.array(v)
    print(f"{k:8s} out {a[:,0].mean():.3f}/{a[:,1].mean():.3f} (max {a[:,0].max():.3f}/{a[:,1].max():.3f})  "
          f"big-w {a[:,2].mean():.3f}/{a[:,3].mean():.3f}  max|dW| {a[:,4].max():.3f}/{a[:,5].max():.3f}/{a[:,6].max():.3f}")
worst.sort(reverse=True)
for r in worst[:8]: print("  worst ratio", f"{r[0]:.2f} lut {r[1]:.3f} q40 {r[2]:.3f}", r[3])
# activation outliers into down_proj / q_proj
for n in ("layers.0.attn.q_proj", "layers.15.attn.q_proj", "layers.3.ffn.w_down", "layers.20.ffn.w_down", "layers.29.ffn.w_down"):
    X = inputs[n]; e = X.pow(2).mean(0)
    print(n, "input channel energy max/median", float(e.max() / e.median()), "top-1% channels' share", float(e.sort().values[-max(1, len(e)//100):].sum() / e.sum()))

def score(m):
    with torch.no_grad():
        lg = m(seq)[0]
    sl = slice(0, P - 1)
    a, b = lg[sl], ref[sl]
    return float((a.argmax(-1) == b.argmax(-1)).float().mean()), float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean())
nl = fp.config.n_layers
print("per-layer blame (only layer i's linears LUT4; prompt positions top1, err)")
res = []
for i in range(nl):
    m = copy.deepcopy(fp)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and n.startswith(f"layers.{i}."):
                mod.weight.copy_(dmods[n].weight)
    res.append(score(m))
print(" ".join(f"{i}:{t:.2f}/{e:.2f}" for i, (t, e) in enumerate(res)))
