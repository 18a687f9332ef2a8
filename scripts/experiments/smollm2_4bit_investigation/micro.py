# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
import time, torch
from mmafm.compress.packed import pack_codes
from mmafm.inference import kernels
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
for out, cols in [(1536, 576), (576, 1536), (49152, 576)]:
    for bits in (4, 2):
        codes = pack_codes(torch.randint(0, 1 << bits, (out, cols), generator=g), bits)
        table = torch.randn(out // 16, 1 << bits)
        x = torch.randn(1, cols)
        w = torch.randn(out, cols)
        with torch.no_grad():
            for _ in range(3): kernels.lut_linear(x, codes, table, bits, 16); kernels.linear(x, w)
            n = 50 if out < 10000 else 5
            a = time.thread_time(); 
            for _ in range(n): kernels.lut_linear(x, codes, table, bits, 16)
            b = time.thread_time()
            for _ in range(n): kernels.linear(x, w)
            c = time.thread_time()
        print(out, cols, bits, f"lut {(b-a)/n*1e3:.3f} ms ({out*cols/((b-a)/n)/1e9:.1f} Gw/s)  f32 {(c-b)/n*1e3:.3f} ms")
