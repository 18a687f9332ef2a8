# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Perplexity on 1024 tokens of English prose (GPL-3 text) for each variant."""
import sys, os, copy
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
import mmafm
import torch.nn.functional as F
from mmafm.interop.smollm2 import load_smollm2, load_smollm2_tokenizer
from mmafm.compress import dequantized_copy
from pathlib import Path
cache = Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm")) / "bench_compress"
fp = load_smollm2().eval()
dq = dequantized_copy(mmafm.load_model(cache / "smollm2_lut4_emb4").eval())
tok = load_smollm2_tokenizer()
text = open("/usr/share/common-licenses/GPL-3").read()[3000:12000]
ids = torch.tensor([tok(text, add_special_tokens=False).input_ids[:1024]])
def q4_0(w, g=32):
    r, c = w.shape
    x = w.reshape(r, c // g, g)
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True)); dd = mx / -8
    inv = torch.where(dd != 0, 1 / dd, torch.zeros_like(dd))
    return ((torch.clamp(torch.trunc(x * inv + 8.5), 0, 15) - 8) * dd).reshape(r, c)
def q8_0(w, g=32):
    r, c = w.shape; x = w.reshape(r, c // g, g); dd = x.abs().amax(-1, keepdim=True) / 127
    return (torch.round(x / dd.clamp_min(1e-30)) * dd).reshape(r, c)
with torch.no_grad():
    ref = fp(ids)[0]
def ev(m, name):
    with torch.no_grad():
        lg = m(ids)[0]
    nll = F.cross_entropy(lg[:-1], ids[0, 1:])
    print(f"{name:50s} ppl {float(nll.exp()):7.2f}  top1 vs float {float((lg.argmax(-1) == ref.argmax(-1)).float().mean()):.3f}  "
          f"rel logit err {float(((lg - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()):.3f}", flush=True)
rs = torch.load("scripts/experiments/smollm2_4bit_investigation/rowscaled.pt")
dm = dict(dq.named_modules())
def variant(lin=None, emb=None):
    m = copy.deepcopy(fp)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and lin: mod.weight.copy_(lin(n, mod.weight))
            if isinstance(mod, torch.nn.Embedding) and emb: mod.weight.copy_(emb(n, mod.weight))
    return m
ours_l = lambda n, w: dm[n].weight; ours_e = lambda n, w: dm[n].weight
ev(fp, "float32")
ev(dq, "ours: LUT4 linears + 4-bit per-row embedding")
ev(variant(lin=ours_l), "ours LUT4 linears only")
ev(variant(emb=ours_e), "ours 4-bit per-row embedding only")
ev(variant(lin=lambda n, w: q4_0(w), emb=lambda n, w: q8_0(w)), "llama.cpp-like Q4_0 linears + Q8_0 embedding")
ev(variant(emb=lambda n, w: q4_0(w)), "Q4_0 embedding only")
ev(variant(lin=lambda n, w: rs[n + ".weight"]), "LUT4 with per-row fp16 scale, linears only")
ev(variant(lin=lambda n, w: rs[n + ".weight"], emb=ours_e), "LUT4 per-row scale + ours 4-bit embedding")
