# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation).
"""What several of the investigation's scripts share, written once: where their inputs lie, the
llama.cpp 4/8-bit references, and the two ways they score a model variant against float SmolLM2.

Imported by the scripts of this folder (``from common import ...``: Python puts a script's folder
first on ``sys.path``); run them from the repo root, exp1 first, as before.
"""
import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = "scripts/experiments/smollm2_4bit_investigation"  # relative to the repo root, where they run
CACHE = Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm")) / "bench_compress"


def load_models():
    """Float SmolLM2, the cached 4-bit model (``bench_compress``'s ``smollm2_lut4_emb4``) and its
    dequantized float copy, all in eval mode."""
    import mmafm
    from mmafm.compress import dequantized_copy
    from mmafm.interop.smollm2 import load_smollm2

    fp = load_smollm2().eval()
    q = mmafm.load_model(CACHE / "smollm2_lut4_emb4").eval()
    return fp, q, dequantized_copy(q).eval()


def load_seq():
    """exp1's prompt + float reply ``(1, T)`` and the prompt length ``P``."""
    d = torch.load(f"{HERE}/seq.pt")
    return d["seq"], d["plen"]


# --- llama.cpp's quantizers, written independently of mmafm (group g along the input dim) ---
def q4_1(w, g=32):  # affine RTN per group of g along the input dim (llama.cpp Q4_1 math)
    r, c = w.shape
    x = w.reshape(r, c // g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-12)
    return (torch.round((x - lo) / s).clamp(0, 15) * s + lo).reshape(r, c)


def q4_0(w, g=32):  # llama.cpp Q4_0: d = signed absmax / -8, q = clamp(round(x/d) + 8, 0, 15)
    r, c = w.shape
    x = w.reshape(r, c // g, g)
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    dd = mx / -8
    inv = torch.where(dd != 0, 1 / dd, torch.zeros_like(dd))
    return ((torch.clamp(torch.trunc(x * inv + 8.5), 0, 15) - 8) * dd).reshape(r, c)


def q8_0(w, g=32):
    r, c = w.shape
    x = w.reshape(r, c // g, g)
    dd = x.abs().amax(-1, keepdim=True) / 127
    return (torch.round(x / dd.clamp_min(1e-30)) * dd).reshape(r, c)


# --- scoring a variant ---
def logit_scorer(fp, seq, P):
    """``score(m, name)``: prints top-1 agreement and mean relative logit error of ``m`` against
    ``fp`` on ``seq``, on the reply positions and on the prompt positions (``fp`` runs once, here)."""
    with torch.no_grad():
        ref = fp(seq)[0]

    def score(m, name):
        with torch.no_grad():
            lg = m(seq)[0]
        out = []
        for sl in (slice(P - 1, seq.shape[1] - 1), slice(0, P - 1)):
            a, b = lg[sl], ref[sl]
            out += [float((a.argmax(-1) == b.argmax(-1)).float().mean()), float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean())]
        print(f"{name:55s} reply top1 {out[0]:.3f} err {out[1]:.3f} | prompt top1 {out[2]:.3f} err {out[3]:.3f}", flush=True)

    return score


def prose_ids(tok):
    """``(1, 1024)``: 1024 tokens of English prose (GPL-3 text)."""
    text = open("/usr/share/common-licenses/GPL-3").read()[3000:12000]
    return torch.tensor([tok(text, add_special_tokens=False).input_ids[:1024]])


def perplexity_printer(fp, ids):
    """``ev(m, name)``: prints ``m``'s perplexity on ``ids`` and its top-1 agreement and mean
    relative logit error against ``fp`` (which runs once, here)."""
    with torch.no_grad():
        ref = fp(ids)[0]

    def ev(m, name):
        with torch.no_grad():
            lg = m(ids)[0]
        nll = F.cross_entropy(lg[:-1], ids[0, 1:])
        print(f"{name:50s} ppl {float(nll.exp()):7.2f}  top1 vs float {float((lg.argmax(-1) == ref.argmax(-1)).float().mean()):.3f}  "
              f"rel logit err {float(((lg - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()):.3f}", flush=True)

    return ev


def variant(fp, lin=None, emb=None):
    """A copy of ``fp`` whose linear / embedding weights are ``lin(name, weight)`` /
    ``emb(name, weight)`` (each left as is where None)."""
    m = copy.deepcopy(fp)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and lin: mod.weight.copy_(lin(n, mod.weight))
            if isinstance(mod, torch.nn.Embedding) and emb: mod.weight.copy_(emb(n, mod.weight))
    return m
