"""Speed of mmafm's text decoder against transformers' Qwen3 of the same shape and weights, in one run.

    .venv/bin/python benchmarks/bench_text.py                         # short: 512 wide x 8 layers
    .venv/bin/python benchmarks/bench_text.py --threads 2 --repeats 7 --prompt 512 --new-tokens 64
    .venv/bin/python benchmarks/bench_text.py --background-load 0 1 3    # decode on a busy machine

The model is the 2024 on-device architecture (QK-norm, GQA, SwiGLU, tied embedding) at the size
given by the flags; transformers' ``Qwen3ForCausalLM`` gets the very same weights through
:func:`mmafm.interop.hf.to_hf`. Measured, as medians over ``--repeats`` with ours and theirs
interleaved (so background load hits both alike):

- prefill tokens/s: one forward over a ``--prompt``-token prompt that fills a KV cache, all
  positions' logits (ours under :func:`mmafm.inference.kernel_linears`, the linear dispatch its
  ``generate`` prefills with);
- decode tokens/s: greedy ``generate`` of ``N + 1`` tokens minus that of 1 token, per token (each
  library's own generate: ours :func:`mmafm.inference.generate`, theirs ``model.generate``);
- ratios ours/HF (issue 5's goals: prefill >= 1.0, decode >= 3);
- ``--dtype bfloat16`` runs both models with bf16 weights (and KV cache): decode then reads half
  the bytes per token (ours keeps activations in float32, HF computes in bf16);
- what the CPU allows: the prefill's matmul FLOP/s as a fraction of the measured matmul peak, and
  decode tokens/s against the memory-bandwidth bound (weight bytes read per token / measured
  copy bandwidth);
- KV-cache bytes per token of every text preset (bf16, at 4,096 tokens, from
  ``kv_cache_bytes``), with the 2025 device model's share of a plain model (35/56).

``--background-load N [N ...]`` measures decode only, once per N, while N competing CPU-bound
processes run (each a ``--load-threads``-thread torch matmul loop at normal priority, started
before and stopped after that measurement, as a second notebook would be): ours and HF's decode
tok/s and their ratio at each N (issue 12's goal: >= 1.0 at N = 0, 1 and 3), decode time per
round taken as genN - gen1 of that round (steadier under load than the difference of medians),
with the machine's 1-minute load average before the N processes start (other users' load).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Iterator

import torch

import mmafm
from _text_shape import add_shape_arguments, build_decoder
from mmafm.inference import generate, kernel_linears
from mmafm.interop.hf import to_hf
from mmafm.models.text import kv_cache_bytes
from mmafm.registry import model_family


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak_gflops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of a square matmul in ``dtype`` (the CPU's practical peak)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = [_timed(lambda: a @ b) for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times) / 1e9


def copy_bandwidth_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """Median memory bandwidth (GB/s) of reading one large buffer and writing another."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_timed(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def kv_bytes_per_token(seq_len: int = 4096) -> list[dict]:
    """KV-cache bytes per token (bf16) of every text preset at ``seq_len`` tokens."""
    rows = []
    for name in mmafm.list_models():
        if model_family(name) not in ("text", "ptmoe"):
            continue
        config = mmafm.get_config(name)
        shared = kv_cache_bytes(config, seq_len, 1, torch.bfloat16)
        row = {"preset": name, "kv_bytes_per_token": shared / seq_len}
        if config.kv_share_segments is not None:
            plain = dataclasses.replace(config, kv_share_segments=None)
            row["share_of_unshared"] = shared / kv_cache_bytes(plain, seq_len, 1, torch.bfloat16)
        rows.append(row)
    return rows


def build_pair(args: argparse.Namespace):
    ours = build_decoder(args, max_seq_len=args.prompt + args.new_tokens + 1)
    theirs = to_hf(ours).eval()
    theirs.generation_config.pad_token_id = 0
    dtype = getattr(torch, args.dtype)
    return ours.to(dtype), theirs.to(dtype)


# one competing process: a CPU-bound torch matmul loop on argv[1] threads; "ready" once running
LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
a @ a
print("ready", flush=True)
while True:
    a @ a
"""


@contextlib.contextmanager
def background_load(count: int, threads: int = 2) -> Iterator[None]:
    """``count`` competing processes (a ``threads``-thread matmul loop each) for the block's duration."""
    processes: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            processes.append(subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(threads)],
                                              stdout=subprocess.PIPE, text=True))
        for process in processes:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"background load process {process.pid} did not start (exit {process.poll()})")
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def generate_jobs(ours, theirs, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy generation of 1 and ``new_tokens + 1`` tokens by each library (no EOS stop)."""
    mask = torch.ones_like(prompt)
    total_new = new_tokens + 1

    def our_generate(count: int):
        return lambda: generate(ours, prompt, max_new_tokens=count)

    def their_generate(count: int):
        return lambda: theirs.generate(
            prompt, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False,
            eos_token_id=None,
        )

    return {"gen1_ours": our_generate(1), "gen1_hf": their_generate(1),
            "genN_ours": our_generate(total_new), "genN_hf": their_generate(total_new)}


def interleaved_times(jobs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each job in each of ``repeats`` rounds, the jobs interleaved within each round
    (after one warm-up call each), so load that comes and goes hits all of them alike."""
    for job in jobs.values():
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(_timed(job))
    return times


def interleaved_medians(jobs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each job (:func:`interleaved_times`)."""
    return {name: statistics.median(values) for name, values in interleaved_times(jobs, repeats).items()}


def decode_rates(med: dict[str, float], new_tokens: int) -> dict[str, float]:
    """Decode tok/s of each side from the medians of generating N + 1 and 1 tokens, and the ratio."""
    rates = {f"decode_tok_s_{side}": new_tokens / max(med[f"genN_{side}"] - med[f"gen1_{side}"], 1e-9)
             for side in ("ours", "hf")}
    rates["decode_ratio"] = rates["decode_tok_s_ours"] / rates["decode_tok_s_hf"]
    return rates


@torch.no_grad()
def measure_under_load(args: argparse.Namespace, loads: list[int]) -> list[dict]:
    """Decode speed of both libraries at each background load (fresh processes for each)."""
    ours, theirs = build_pair(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    jobs = generate_jobs(ours, theirs, prompt, args.new_tokens)
    rows = []
    for count in loads:
        load_before = os.getloadavg()[0]
        with background_load(count, args.load_threads):
            time.sleep(1.0)  # let the competitors reach their steady state
            times = interleaved_times(jobs, args.repeats)
        # under load the per-round difference genN - gen1 (taken seconds apart) is steadier than
        # the difference of the two medians
        med = {f"genN_{side}": statistics.median(n - one for n, one in zip(times[f"genN_{side}"], times[f"gen1_{side}"]))
               for side in ("ours", "hf")}
        med.update(gen1_ours=0.0, gen1_hf=0.0)
        rows.append({"background_processes": count, "load_threads": args.load_threads,
                     "loadavg_1min_before": load_before, **decode_rates(med, args.new_tokens),
                     "times_s": times})
        print(f"  load {count}: ours {rows[-1]['decode_tok_s_ours']:.0f} tok/s, HF {rows[-1]['decode_tok_s_hf']:.0f} "
              f"tok/s, ratio {rows[-1]['decode_ratio']:.2f}", flush=True)
    return rows


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    ours, theirs = build_pair(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    mask = torch.ones_like(prompt)

    def our_prefill():
        with kernel_linears():
            ours(prompt, cache=ours.new_cache(1, args.prompt + args.new_tokens + 1))

    def their_prefill():
        theirs(input_ids=prompt, attention_mask=mask, use_cache=True)

    # the same greedy tokens first: the comparison is between equal computations
    same = generate(ours, prompt, max_new_tokens=8)[0] == theirs.generate(
        prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None
    )[0, args.prompt:].tolist()
    jobs = {"prefill_ours": our_prefill, "prefill_hf": their_prefill,
            **generate_jobs(ours, theirs, prompt, args.new_tokens)}
    med = interleaved_medians(jobs, args.repeats)

    params = sum(p.numel() for p in ours.parameters())
    non_embed = params - ours.embed.weight.numel()
    result = {"greedy_tokens_equal": same}
    for side in ("ours", "hf"):
        result[f"prefill_tok_s_{side}"] = args.prompt / med[f"prefill_{side}"]
    result.update(decode_rates(med, args.new_tokens))
    result["prefill_ratio"] = result["prefill_tok_s_ours"] / result["prefill_tok_s_hf"]
    # 2 FLOPs per weight per token for the matmuls (attention's T^2 term is small at these lengths)
    prefill_flops = 2 * (non_embed + ours.embed.weight.numel()) * args.prompt
    peak = matmul_peak_gflops(dtype=ours.embed.weight.dtype)
    bandwidth = copy_bandwidth_gbps()
    result["matmul_peak_gflops"] = peak
    result["prefill_frac_of_peak_ours"] = prefill_flops / med["prefill_ours"] / 1e9 / peak
    result["prefill_frac_of_peak_hf"] = prefill_flops / med["prefill_hf"] / 1e9 / peak
    result["copy_bandwidth_gbps"] = bandwidth
    weight_bytes = params * ours.embed.weight.element_size()
    result["decode_bound_tok_s"] = bandwidth * 1e9 / weight_bytes  # every weight read once per token
    result["params_M"] = params / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--prompt", type=int, default=256, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights (and KV cache) of both models; bf16 decode reads half the bytes")
    parser.add_argument("--background-load", type=int, nargs="+", metavar="N",
                        help="measure decode only, once per N, with N competing CPU-bound processes running")
    parser.add_argument("--load-threads", type=int, default=2, help="torch threads of each competing process")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.background_load and min(args.background_load) < 0:
        parser.error(f"--background-load counts must be >= 0, got {args.background_load}")
    torch.set_num_threads(args.threads)

    shape = {k: getattr(args, k) for k in ("dim", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab")}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; shape {shape}; prompt {args.prompt}, "
          f"{args.new_tokens} decode steps, median of {args.repeats}")
    if args.background_load:
        print(f"decode with N competing processes ({args.load_threads}-thread matmul loops) on "
              f"{os.cpu_count()} cores:", flush=True)
        rows = measure_under_load(args, args.background_load)
        print(f"{'N':>3}{'load avg before':>17}{'ours tok/s':>12}{'HF tok/s':>10}{'ratio':>8}")
        for row in rows:
            print(f"{row['background_processes']:>3}{row['loadavg_1min_before']:>17.1f}{row['decode_tok_s_ours']:>12.0f}"
                  f"{row['decode_tok_s_hf']:>10.0f}{row['decode_ratio']:>8.2f}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"args": vars(args), "background_load": rows}, handle, indent=2)
        return
    result = measure(args)
    print(f"greedy tokens equal (ours vs HF): {result['greedy_tokens_equal']}")
    print(f"{'':10}{'ours':>12}{'HF Qwen3':>12}{'ratio':>8}")
    for what in ("prefill", "decode"):
        print(f"{what + ' tok/s':16}{result[f'{what}_tok_s_ours']:>6.0f}{result[f'{what}_tok_s_hf']:>12.0f}"
              f"{result[f'{what}_ratio']:>8.2f}")
    print(f"prefill matmul FLOP/s as a share of the {result['matmul_peak_gflops']:.0f} GFLOP/s {args.dtype} peak: "
          f"ours {result['prefill_frac_of_peak_ours']:.0%}, HF {result['prefill_frac_of_peak_hf']:.0%}")
    print(f"decode bound at {result['copy_bandwidth_gbps']:.1f} GB/s for {result['params_M']:.1f}M {args.dtype} "
          f"weights: {result['decode_bound_tok_s']:.0f} tok/s (ours reaches "
          f"{result['decode_tok_s_ours'] / result['decode_bound_tok_s']:.0%})")
    kv = kv_bytes_per_token()
    print("\nKV cache per token (bf16, 4096-token context):")
    for row in kv:
        share = f"  ({row['share_of_unshared']:.4f} of the unshared model)" if "share_of_unshared" in row else ""
        print(f"  {row['preset']:28}{row['kv_bytes_per_token']:>12,.0f} B{share}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "speed": result, "kv_bytes_per_token": kv}, handle, indent=2)


if __name__ == "__main__":
    main()
