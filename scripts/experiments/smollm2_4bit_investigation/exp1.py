# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Issue 15 helper: where does the 4-bit palettized SmolLM2's logit error come from."""
import sys, time, copy
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
import mmafm
from mmafm.interop.smollm2 import load_smollm2, chat_prompt, load_smollm2_tokenizer
from mmafm.compress import dequantized_copy
from mmafm.inference import generate
from pathlib import Path
import os

cache = Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm")) / "bench_compress"
t0 = time.time()
fp = load_smollm2().eval()
q = mmafm.load_model(cache / "smollm2_lut4_emb4").eval()
dq = dequantized_copy(q).eval()
print("loaded", time.time() - t0)
tok = load_smollm2_tokenizer()
prompt = chat_prompt(tok, "Explain why the sky is blue in a short paragraph.")
with torch.no_grad():
    reply = torch.tensor(generate(fp, prompt, max_new_tokens=64))
seq = torch.cat([prompt, reply], 1)
print("prompt", prompt.shape, "reply:", tok.decode(reply[0]))
torch.save({"seq": seq, "plen": prompt.shape[1]}, "scripts/experiments/smollm2_4bit_investigation/seq.pt")

def logits(m):
    with torch.no_grad():
        return m(seq)[0]  # (T, V)

ref = logits(fp)
P = prompt.shape[1]
def score(lg, name):
    out = {}
    for part, sl in (("reply", slice(P - 1, seq.shape[1] - 1)), ("prompt", slice(0, P - 1))):
        a, b = lg[sl], ref[sl]
        out[part] = (float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                     float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean()))
    print(f"{name:40s} reply top1 {out['reply'][0]:.3f} err {out['reply'][1]:.3f} | prompt top1 {out['prompt'][0]:.3f} err {out['prompt'][1]:.3f}", flush=True)
    return out

score(logits(dq), "all quantized (dequantized module path)")

# per-tensor relative weight error
fsd = dict(fp.named_parameters()); qsd = dict(dq.named_parameters())
rows = []
for n, w in fsd.items():
    if w.dim() == 2:
        e = float((qsd[n] - w).norm() / w.norm())
        rows.append((n, e))
import statistics
kinds = {}
for n, e in rows:
    k = n.split(".")[-2] if "layers" in n else n
    kinds.setdefault(k, []).append(e)
for k, v in kinds.items():
    print(f"weight rel err {k:20s} mean {statistics.mean(v):.4f} max {max(v):.4f}")

def hybrid(pred):
    m = copy.deepcopy(fp)
    qmods = dict(dq.named_modules())
    for n, mod in list(m.named_modules()):
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and pred(n):
            mod.weight.data.copy_(qmods[n].weight.data)
    return m

score(logits(hybrid(lambda n: n == "embed")), "only embedding (+tied head) quantized")
score(logits(hybrid(lambda n: n != "embed")), "only linears quantized")
for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"):
    names = [n for n, _ in fp.named_modules() if n.endswith(k) or n.split(".")[-1].startswith(k) or k in n.split(".")[-1]]
    score(logits(hybrid(lambda n, k=k: n != "embed" and k in n.split(".")[-1])), f"only *{k}* quantized")
