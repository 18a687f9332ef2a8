# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
import torch, mmafm, time
from mmafm.compress import compress_model, dequantized_copy
from mmafm.inference.plan import build_plan
from mmafm.inference import kernels
torch.manual_seed(0)
for emb in (8, 4):
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=256).eval()
    compress_model(model, bits={"layers.0.ffn.w_up": 2, "layers.1.attn.q_proj": 8}, default_bits=4, embedding_bits=emb)
    ref = dequantized_copy(model)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        model(ids[:, :6], cache=cache)
        plan = build_plan(model, cache)
        print(plan.describe().splitlines()[0], type(plan._step.step).__name__ if plan.whole_step else None)
        rc = ref.new_cache(2, 20)
        ref(ids[:, :6], cache=rc)
        for t in range(6, 10):
            a = plan.step(ids[:, t])
            b = ref(ids[:, t:t+1], cache=rc)[:, -1]
            print((a - b).abs().max().item(), b.abs().max().item())
