"""Long-context prefill speed: mmafm's inference wing against transformers on the same weights.

    .venv/bin/python benchmarks/bench_long_context.py                       # 1k, 2k, 4k; 512 wide x 8 layers
    .venv/bin/python benchmarks/bench_long_context.py --lengths 4096 --repeats 7 --threads 2
    .venv/bin/python benchmarks/bench_long_context.py --json benchmarks/results/long_context_2thread.json

Issue 13's goal: prefill tokens/s at a 4k context >= 1.0 x transformers'. The model is the 2024
on-device architecture at the shape of ``benchmarks/_text_shape.py`` (the one bench_text.py
times), with ``max_seq_len`` raised to the longest length; transformers' ``Qwen3ForCausalLM``
gets the very same weights through :func:`mmafm.interop.hf.to_hf`. One prefill is what a long
prompt costs before the first generated token:

- ours: :func:`mmafm.inference.prefill` (the decode loop's own prefill: the modules under the
  kernels' linear dispatch, a KV cache of the prompt's length, the head on the last position);
- theirs: ``model(input_ids, attention_mask, use_cache=True, logits_to_keep=1)`` (what
  ``generate`` runs first: a DynamicCache, the head on the last position).

Both last-position logits are compared first (max abs difference printed; the comparison is
between equal computations). Times are medians over ``--repeats`` with ours and theirs
interleaved (background load hits both alike), after one warm-up each, at
``torch.set_num_threads(--threads)``; attention's share of the FLOPs is printed because at 4k it
is no longer small.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _text_shape import add_shape_arguments, build_decoder
from mmafm.inference import prefill
from mmafm.interop.hf import to_hf


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prefill_flops(model: torch.nn.Module, length: int) -> tuple[float, float]:
    """(matmul FLOPs of the weights, attention-score FLOPs) of one causal prefill of ``length``
    tokens: 2 per weight per token (head once), and QK^T + PV over the causal half."""
    config = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))
    attention = 2 * 2 * config.n_layers * config.n_heads * config.head_dim * length * (length + 1) / 2
    return 2 * weights * length + 2 * config.dim * config.vocab_size, attention


@torch.no_grad()
def measure(args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    ours = build_decoder(args, max(args.lengths))  # float32
    theirs = to_hf(ours, dtype=dtype).eval()  # a copy of the weights
    ours = ours.to(dtype)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        prompt = torch.randint(0, args.vocab, (1, length), generator=generator)
        mask = torch.ones_like(prompt)

        def our_prefill():
            return prefill(ours, ours.new_cache(1, length), prompt)  # (1, V)

        def their_prefill():
            return theirs(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1).logits[:, -1]

        difference = (our_prefill().float() - their_prefill().float()).abs().max().item()  # also the warm-up
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        for _ in range(args.repeats):  # interleaved: ours, theirs, ours, theirs, ...
            times["ours"].append(_timed(our_prefill))
            times["hf"].append(_timed(their_prefill))
        med = {side: statistics.median(values) for side, values in times.items()}
        matmul, attention = prefill_flops(ours, length)
        row = {
            "length": length,
            "prefill_tok_s_ours": length / med["ours"],
            "prefill_tok_s_hf": length / med["hf"],
            "ratio": med["hf"] / med["ours"],
            "max_abs_logit_difference": difference,
            "attention_share_of_flops": attention / (matmul + attention),
            "gflop_s_ours": (matmul + attention) / med["ours"] / 1e9,
            "times_s": times,
        }
        rows.append(row)
        print(f"{length:>7}{row['prefill_tok_s_ours']:>12.0f}{row['prefill_tok_s_hf']:>12.0f}{row['ratio']:>8.2f}"
              f"{row['attention_share_of_flops']:>12.0%}{row['gflop_s_ours']:>10.1f}{difference:>12.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if min(args.lengths) < 1 or args.repeats < 1:
        parser.error("lengths and repeats must be >= 1")
    torch.set_num_threads(args.threads)
    shape = {k: getattr(args, k) for k in ("dim", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab")}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; shape {shape}; median of {args.repeats}, "
          "interleaved")
    print(f"{'tokens':>7}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}{'attn FLOPs':>12}{'GFLOP/s':>10}{'max |dlogit|':>12}")
    rows = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "prefill": rows}, indent=2))


if __name__ == "__main__":
    main()
