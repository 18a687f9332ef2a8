# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
import time, torch, statistics, sys
import mmafm
from mmafm.inference import generate
from mmafm.inference.plan import build_plan
torch.set_num_threads(int(sys.argv[1]))
m = mmafm.load_model("/root/.cache/mmafm/bench_compress/" + sys.argv[2] + "")
prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    c = m.new_cache(1, 200); m(prompt, cache=c); plan = build_plan(m, c)
    tok = torch.tensor([5])
    for _ in range(3): plan.step(tok)
    a = time.process_time(); w = time.perf_counter()
    for _ in range(40): plan.step(tok)
    print("step cpu ms", (time.process_time() - a) / 40 * 1e3, "wall ms", (time.perf_counter() - w) / 40 * 1e3)
    a = time.process_time(); generate(m, prompt, max_new_tokens=1); b = time.process_time()
    generate(m, prompt, max_new_tokens=41); c2 = time.process_time()
    print("generate per token cpu ms", ((c2 - b) - (b - a)) / 40 * 1e3)
