"""Speed of mmafm's text decoder against transformers' Qwen3 of the same shape and weights, in one run.

    .venv/bin/python benchmarks/bench_text.py                         # short: 512 wide x 8 layers
    .venv/bin/python benchmarks/bench_text.py --threads 2 --repeats 7 --prompt 512 --new-tokens 64

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import mmafm
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
    torch.manual_seed(0)
    ours = mmafm.create_model(
        "afm_2024_device_tiny", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
        n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim, ffn_dim=args.ffn,
        max_seq_len=args.prompt + args.new_tokens + 1,
    ).eval()
    theirs = to_hf(ours).eval()
    theirs.generation_config.pad_token_id = 0
    dtype = getattr(torch, args.dtype)
    return ours.to(dtype), theirs.to(dtype)


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    ours, theirs = build_pair(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    mask = torch.ones_like(prompt)
    total_new = args.new_tokens + 1

    def our_prefill():
        with kernel_linears():
            ours(prompt, cache=ours.new_cache(1, args.prompt + total_new))

    def their_prefill():
        theirs(input_ids=prompt, attention_mask=mask, use_cache=True)

    def our_generate(count: int):
        return lambda: generate(ours, prompt, max_new_tokens=count)

    def their_generate(count: int):
        return lambda: theirs.generate(
            prompt, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False,
            eos_token_id=None,
        )

    # the same greedy tokens first: the comparison is between equal computations
    same = generate(ours, prompt, max_new_tokens=8)[0] == theirs.generate(
        prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None
    )[0, args.prompt:].tolist()
    jobs = {
        "prefill_ours": our_prefill, "prefill_hf": their_prefill,
        "gen1_ours": our_generate(1), "gen1_hf": their_generate(1),
        "genN_ours": our_generate(total_new), "genN_hf": their_generate(total_new),
    }
    for job in jobs.values():  # warm-up
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            times[name].append(_timed(job))
    med = {name: statistics.median(values) for name, values in times.items()}

    params = sum(p.numel() for p in ours.parameters())
    non_embed = params - ours.embed.weight.numel()
    result = {"greedy_tokens_equal": same}
    for side in ("ours", "hf"):
        decode_s = max(med[f"genN_{side}"] - med[f"gen1_{side}"], 1e-9) / args.new_tokens
        result[f"prefill_tok_s_{side}"] = args.prompt / med[f"prefill_{side}"]
        result[f"decode_tok_s_{side}"] = 1.0 / decode_s
    result["prefill_ratio"] = result["prefill_tok_s_ours"] / result["prefill_tok_s_hf"]
    result["decode_ratio"] = result["decode_tok_s_ours"] / result["decode_tok_s_hf"]
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
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=2048, help="the tiny pipeline's tokenizer size")
    parser.add_argument("--prompt", type=int, default=256, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights (and KV cache) of both models; bf16 decode reads half the bytes")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = {k: getattr(args, k) for k in ("dim", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab")}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; shape {shape}; prompt {args.prompt}, "
          f"{args.new_tokens} decode steps, median of {args.repeats}")
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
