# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
import time, torch, statistics, sys
import mmafm
from mmafm.interop.smollm2 import load_smollm2
from mmafm.inference import generate
from mmafm.inference.plan import build_plan
t = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(t)
models = {"float32": load_smollm2(), "lut4": mmafm.load_model("/root/.cache/mmafm/bench_compress/smollm2_lut4_emb4")}
prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for name, m in models.items():
        c = m.new_cache(1, 64); m(prompt, cache=c); print(name, build_plan(m, c).describe().splitlines()[0])
        generate(m, prompt, max_new_tokens=2)
    times = {n: [] for n in models}
    for r in range(3):
        for n, m in models.items():
            a = time.perf_counter(); generate(m, prompt, max_new_tokens=1); b = time.perf_counter()
            generate(m, prompt, max_new_tokens=33); c = time.perf_counter()
            times[n].append(((c - b) - (b - a)) / 32)
for n, v in times.items():
    print(n, f"{1/statistics.median(v):.1f} tok/s")
print("ratio", statistics.median(times["float32"]) / statistics.median(times["lut4"]))
