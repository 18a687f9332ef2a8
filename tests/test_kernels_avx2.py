"""The kernels built without AVX-512 (AVX2 only) and without any vector extension or FMA (the
portable C every other CPU compiles), in a subprocess: most Intel desktops and laptops take the
first build's code paths (lut.c's AVX2 float LUT GEMV, q8.c's AVX2 int8 path, kernels.h's GEMV),
and the second's plain loops are what a CPU without FMA runs; this AVX-512 CI machine would
otherwise never run either. Checked against NumPy references of the same math, the packed chunk
against one-token steps bit for bit, and test_speculative's GEMV and chunk tests in the same build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmafm.inference import kernels


def _cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return False


SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    import mmafm
    from mmafm.compress import compress_model, set_act_dtype
    from mmafm.compress.packed import pack_codes
    from mmafm.inference import kernels
    from mmafm.inference.plan import build_plan

    assert kernels.kernels_available(), kernels.kernels_unavailable_reason()
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for bits in (2, 4, 8):
        for out, cols, group_rows in ((96, 64, 16), (50, 37, 16), (33, 200, 1)):
            codes = torch.randint(0, 1 << bits, (out, cols), generator=generator)
            table = torch.randn(-(-out // group_rows), 1 << bits, generator=generator)
            weight = table[torch.arange(out)[:, None] // group_rows, codes]  # (out, cols)
            for batch, threads in ((1, 1), (3, 2), (8, 1)):
                x = torch.randn(batch, cols, generator=generator)
                y = kernels.lut_linear(x, pack_codes(codes, bits), table, bits, group_rows, threads)
                want = x.double() @ weight.double().T
                bound = x.double().abs() @ weight.double().abs().T
                assert y is not None and bool(((y.double() - want).abs() <= 1e-5 * bound + 1e-6).all()), \\
                    (bits, out, cols, batch, float((y.double() - want).abs().max()))
                checked += 1
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=256).eval()
    compress_model(model, bits={"layers.0.ffn.w_up": 2, "layers.1.attn.q_proj": 8}, default_bits=4, embedding_bits=8)
    ids = torch.randint(1, 256, (2, 12), generator=generator)
    for act in ("float32", "int8"):
        set_act_dtype(model, act)
        with torch.no_grad():
            caches = [model.new_cache(2, 12) for _ in range(2)]
            plans = [build_plan(model, cache) for cache in caches]
            assert all(plan.packed for plan in plans)
            chunked = plans[0].chunk(ids)
            stepped = torch.stack([plans[1].step(ids[:, t]) for t in range(12)], 1)
        assert torch.equal(chunked, stepped), act
        if act == "float32":  # the float path against the dequantized model's modules
            from mmafm.compress import dequantized_copy
            with torch.no_grad():
                reference = dequantized_copy(model)(ids).float()
            assert torch.allclose(chunked, reference, rtol=1e-4, atol=1e-4), float((chunked - reference).abs().max())
    print("checked", checked)
""")

# the compiler flags each build adds after -march=native
BUILDS = {
    "avx2": ("-mno-avx512f",),
    "no_simd_no_fma": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-avx", "-mno-f16c", "-mno-avxvnni"),
}


@pytest.mark.slow  # builds the kernels once more (~10-30 s)
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.skipif(not (_cpu_has("avx2") and _cpu_has("fma")), reason="the CPU has no AVX2/FMA (or is not x86)")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
@pytest.mark.skipif(not kernels.kernels_available(), reason="native kernels unavailable")
def test_the_avx2_build_matches_the_references(tmp_path, build):
    wrapper = tmp_path / f"gcc-{build}"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("gcc")} "$@" {" ".join(BUILDS[build])}\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "MMAFM_CC": str(wrapper), "MMAFM_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked 27" in result.stdout
    # the float32 / bfloat16 GEMV's rows alone and in a batch, and a float32 model's verification
    # chunk of every width against one-token steps, bit for bit: test_speculative's own tests, run
    # against this build (without FMA they failed until the dot products shared MADD)
    tests = Path(__file__).with_name("test_speculative.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k",
         "test_gemv_rows_do_not_depend_on_the_batch or test_chunk_of_every_width_is_bit_identical_to_steps"],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("8 passed"), result.stdout[-3000:]
    built = list((tmp_path / "cache" / "native").glob("kernels_*.so"))
    assert built, "the AVX2 build did not happen in the test's cache"
    if shutil.which("nm"):  # the build is this source's: it has the newest symbol
        symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True).stdout
        assert "mmafm_lut_decode_chunk_f32" in symbols
