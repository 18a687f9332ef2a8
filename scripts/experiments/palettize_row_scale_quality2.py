# Experiment record (issue 15, 2026-11-30; docs/compression.md, "Row scales"): run from the repo root.
"""Linears alone (float embedding), with and without row scales; and the packed whole step of the
cached rowscale model against its dequantized copy."""
import sys, math
import torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
import bench_compress
from mmafm.compress import kmeans, compress_model, dequantized_copy, set_act_dtype
from mmafm.inference.plan import build_plan
from mmafm.interop.smollm2 import load_smollm2, load_smollm2_tokenizer

kmeans.SUMMARY_BINS = 64
tok = load_smollm2_tokenizer()
ids = torch.tensor(tok.encode(open("/usr/share/common-licenses/GPL-3").read())[:1024])[None]
ppl = lambda lg: math.exp(torch.nn.functional.cross_entropy(lg[:-1], ids[0, 1:]).item())
with torch.no_grad():
    ref = load_smollm2()(ids).float()[0]
    for pcs in (False, True):
        model = load_smollm2()
        compress_model(model, bits=4, embedding_bits=None, per_channel_scale=pcs)
        lg = model(ids).float()[0]
        print(f"lut4 linears only per_channel_scale={pcs}: ppl {ppl(lg):.2f} top-1 {(lg.argmax(-1) == ref.argmax(-1)).float().mean():.3f} "
              f"rel logit err {((lg - ref).norm() / ref.norm()):.3f}", flush=True)
    model = bench_compress.compressed_smollm2(4, 4, per_channel_scale=True)
    reference = dequantized_copy(model)
    for act in ("float32", "int8"):
        set_act_dtype(model, act)
        caches = [m.new_cache(1, 48) for m in (model, reference)]
        for m, c in zip((model, reference), caches):
            m(ids[:, :16], cache=c)
        plan = build_plan(model, caches[0])
        errs, agree = [], []
        for t in range(16, 48):
            ours = plan.step(ids[:, t]); theirs = reference(ids[:, t:t + 1], cache=caches[1])[:, -1].float()
            errs.append(float((ours - theirs).norm() / theirs.norm())); agree.append(bool(ours.argmax() == theirs.argmax()))
        print(f"whole step {act} ({plan.describe().splitlines()[0]}): max rel logit err {max(errs):.2e} top-1 {sum(agree)/len(agree):.3f}", flush=True)
