"""LoRA adapters, ours (mmafm.lora) against peft on the same model and the same adapters, in one run.

    .venv/bin/python benchmarks/bench_lora.py                              # short: 512 wide x 8 layers
    .venv/bin/python benchmarks/bench_lora.py --threads 2 --repeats 7 --json benchmarks/results/lora.json
    .venv/bin/python benchmarks/bench_lora.py --threads 1 --cpu-time    # on a machine shared with other jobs

The base is the 2024 on-device architecture at the size the flags give; peft gets it through
:func:`mmafm.interop.hf.to_hf` (transformers' ``Qwen3ForCausalLM``, same weights) and wraps it with
``get_peft_model`` / ``LoraConfig`` over the same seven projections; every adapter is made once
in ours and copied into peft through :func:`mmafm.lora.peft.to_peft` (so both compute the same
function, checked before timing). Measured as medians over ``--repeats``, ours and theirs
interleaved (background load hits both alike):

- training step: forward, cross-entropy on all positions, backward, AdamW over the adapter
  (``--batch`` rows of ``--seq`` tokens); the goal is ours >= 1.0x peft;
- mixed batch: 8 rows over 4 adapters (2 rows each), ours one gathered batched matmul per LoRA
  factor (``Adapters.mixed``: slot-major GEMMs for few tokens per row, gathered ones else), peft's ``adapter_names=`` path (a sub-batch per adapter): one
  forward over ``--seq`` tokens per row (a prefill), and greedy generation of ``--new-tokens``
  tokens per row from 16-token prompts (each library's generate; serving, where the per-adapter
  loop is paid in every layer of every step; ours decodes the mixed batch in the native whole
  step, each row's adapter added inside it, ``csrc/lora.c``); beside the forward, our bare base's
  forward on the same rows (no adapter: what a free adapter path would cost, so peft's time over
  it bounds the forward's speedup); and the adapter mechanism alone: one LoRA'd
  projection (``--dim`` -> ``--ffn``, layer 0's FFN up projection) on the same 8 rows, 1 token
  (a decode step) and ``--seq`` tokens per row; goal >= 2x;
- hot swap: switching among loaded adapters (ours ``set_adapter``: a buffer write per module;
  peft ``set_adapter``), and replacing the active adapter from a file (ours ``Adapters.load``
  into its slot, peft ``hotswap_adapter``), in milliseconds;
- decode with one adapter: greedy tokens/s of the LoRA'd model against the bare base
  (:func:`mmafm.inference.decode_tokens_per_second`); goal >= 0.9x.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _text_shape import add_shape_arguments, build_decoder
from mmafm.inference import build_plan, decode_tokens_per_second, generate
from mmafm.interop.hf import to_hf
from mmafm.lora import attach_lora
from mmafm.lora.peft import to_peft

ADAPTERS = ("a", "b", "c", "d")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


CLOCK = {"now": time.perf_counter}  # --cpu-time: time.process_time


def _timed(fn) -> float:
    now = CLOCK["now"]
    start = now()
    fn()
    return now() - start


def interleaved(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours()`` and ``theirs()``, alternating, after one warm-up each."""
    ours(), theirs()
    times_ours, times_theirs = [], []
    for _ in range(repeats):
        times_ours.append(_timed(ours))
        times_theirs.append(_timed(theirs))
    return statistics.median(times_ours), statistics.median(times_theirs)


def build(args: argparse.Namespace, folder: Path):
    """Our LoRA'd base with 4 random adapters in 4 slots, and peft's model holding the same 4."""
    from peft import PeftModel

    model = build_decoder(args, max_seq_len=max(1024, args.seq))
    plain = copy.deepcopy(model)
    base = to_hf(model)  # the same weights, before any adapter
    adapters = attach_lora(model, args.rank, args.alpha, slots=len(ADAPTERS), name=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ADAPTERS:
            slot = adapters.add(name, args.rank, args.alpha, seed=len(name) + ord(name)).slot
            for module in adapters.modules.values():
                module.lora_B[slot].copy_(torch.randn(module.lora_B[slot].shape, generator=generator) * 0.02)
    for name in ADAPTERS:
        to_peft(adapters, folder / name, name)
    peft_model = PeftModel.from_pretrained(base, str(folder / "a"), adapter_name="a", is_trainable=True)
    for name in ADAPTERS[1:]:
        peft_model.load_adapter(str(folder / name), adapter_name=name)
    return plain, model, adapters, peft_model


def check_equal(model, adapters, peft_model, ids: torch.Tensor) -> float:
    """Largest logit difference between ours and peft under adapter "b" (they must agree)."""
    adapters.set_adapter("b")
    peft_model.set_adapter("b")
    with torch.no_grad():
        return float((model(ids) - peft_model(input_ids=ids).logits).abs().max())


def training_step(args, plain, adapters, folder: Path) -> dict:
    """One adapter ("a") trained as each library trains one: ours attached with one slot, peft's
    ``PeftModel`` holding that adapter alone."""
    from peft import PeftModel

    model = copy.deepcopy(plain)
    single = attach_lora(model, args.rank, args.alpha, slots=1, name=None)
    single.put("a", adapters.state("a"), args.rank, args.alpha)
    single.set_adapter("a")
    peft_model = PeftModel.from_pretrained(to_hf(plain), str(folder / "a"), is_trainable=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        difference = float((model(inputs) - peft_model(input_ids=inputs).logits).abs().max())
    model.train(), peft_model.train()
    ours_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    theirs_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(forward, optimizer):
        logits = forward()
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours, theirs = interleaved(lambda: step(lambda: model(inputs), ours_opt),
                               lambda: step(lambda: peft_model(input_ids=inputs).logits, theirs_opt), args.repeats)
    return {"ours_s": ours, "peft_s": theirs, "speedup": theirs / ours, "tokens": args.batch * args.seq,
            "max_logit_difference_before": difference}


@torch.no_grad()
def mixed_batch(args, model, adapters, peft_model) -> dict:
    rows = [ADAPTERS[i % len(ADAPTERS)] for i in range(8)]
    ids = torch.randint(0, args.vocab, (8, args.seq))
    with adapters.mixed(rows):
        mixed_ours = model(ids)
    mixed_theirs = peft_model(input_ids=ids, adapter_names=rows).logits
    difference = float((mixed_ours - mixed_theirs).abs().max())

    def ours():
        with adapters.mixed(rows):
            model(ids)

    t_ours, t_theirs = interleaved(ours, lambda: peft_model(input_ids=ids, adapter_names=rows), args.repeats)
    adapters.set_adapter(None)
    t_bare, _ = interleaved(lambda: model(ids), lambda: None, args.repeats)  # the base alone: the bound

    prompts = ids[:, :16]
    with adapters.mixed(rows):
        tokens_ours = generate(model, prompts, args.new_tokens)
        cache = model.new_cache(8, 16 + args.new_tokens)
        model(prompts, cache=cache)
        plan = build_plan(model, cache).describe().splitlines()[0]
    tokens_theirs = peft_model.generate(input_ids=prompts, adapter_names=rows, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, do_sample=False)[:, 16:].tolist()

    def generate_ours():
        with adapters.mixed(rows):
            generate(model, prompts, args.new_tokens)

    def generate_theirs():
        peft_model.generate(input_ids=prompts, adapter_names=rows, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False)

    g_ours, g_theirs = interleaved(generate_ours, generate_theirs, args.repeats)

    ours_layer = adapters.modules["layers.0.ffn.w_up"]
    theirs_layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    layer = {}
    for tokens in (1, args.seq):
        x = torch.randn(8, tokens, args.dim)
        with adapters.mixed(rows):
            want = ours_layer(x)
        if (want - theirs_layer(x, adapter_names=rows)).abs().max() > 1e-4:
            raise SystemExit("ours and peft's LoRA projection disagree on a mixed batch")

        weight = ours_layer.weight
        with adapters.mixed(rows):  # entered once, as a generate call does; peft takes the names per call
            l_ours, l_theirs = interleaved(lambda x=x: ours_layer(x), lambda x=x: theirs_layer(x, adapter_names=rows),
                                           20 * args.repeats)
        base, _ = interleaved(lambda x=x: F.linear(x, weight), lambda: None, 20 * args.repeats)
        layer[tokens] = {"ours_s": l_ours, "peft_s": l_theirs, "speedup": l_theirs / l_ours, "base_s": base,
                         "adapter_speedup": (l_theirs - base) / max(l_ours - base, 1e-9)}
    return {"layer": layer, "ours_s": t_ours, "peft_s": t_theirs, "speedup": t_theirs / t_ours,
            "bare_base_ours_s": t_bare, "speedup_bound": t_theirs / t_bare, "generate_plan": plan,
            "max_logit_difference": difference,
            "generate_ours_s": g_ours, "generate_peft_s": g_theirs, "generate_speedup": g_theirs / g_ours,
            "generated_rows_equal": sum(a == b for a, b in zip(tokens_ours, tokens_theirs))}


def hot_swap(args, adapters, peft_model, folder: Path) -> dict:
    from peft.utils.hotswap import hotswap_adapter

    order = list(ADAPTERS) * 5

    def switch_ours():
        for name in order:
            adapters.set_adapter(name)

    def switch_theirs():
        for name in order:
            peft_model.set_adapter(name)

    per_switch = len(order)
    ours, theirs = interleaved(switch_ours, switch_theirs, args.repeats)
    adapters.set_adapter("a")
    peft_model.set_adapter("a")
    ours_files = {name: adapters.save(folder / f"ours_{name}", name) for name in ("b", "c")}
    turn = {"i": 0}

    def file_ours():
        turn["i"] += 1
        adapters.load(ours_files["bc"[turn["i"] % 2]], "a")

    def file_theirs():
        turn["i"] += 1
        hotswap_adapter(peft_model, str(folder / "bc"[turn["i"] % 2]), adapter_name="a")

    file_o, file_t = interleaved(file_ours, file_theirs, args.repeats)
    return {"switch_ours_ms": 1e3 * ours / per_switch, "switch_peft_ms": 1e3 * theirs / per_switch,
            "file_ours_ms": 1e3 * file_o, "file_peft_ms": 1e3 * file_t}


def decode(args, model, adapters) -> dict:
    def rate(name):
        adapters.set_adapter(name)
        return decode_tokens_per_second(model, prompt_len=64, new_tokens=args.new_tokens, repeats=3)

    lora, bare = [], []
    rate("a"), rate(None)
    for _ in range(args.repeats):
        lora.append(rate("a"))
        bare.append(rate(None))
    ours, base = statistics.median(lora), statistics.median(bare)
    return {"lora_tokens_per_s": ours, "base_tokens_per_s": base, "ratio": ours / base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--rank", type=int, default=16, help="[paper: 16 in 2024, 32 in the 2025 toolkit]")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--batch", type=int, default=4, help="training rows")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row (training and mixed batch)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by this process's CPU time (time.process_time) instead of wall time: on a machine "
                             "shared with other jobs it counts this process's work only (use with --threads 1; "
                             "the decode tokens/s stay wall time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK["now"] = time.process_time

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain, model, adapters, peft_model = build(args, folder)
        ids = torch.randint(0, args.vocab, (2, 16))
        difference = check_equal(model, adapters, peft_model, ids)
        if difference > 1e-4:
            raise SystemExit(f"ours and peft disagree by {difference:.2e}: not timing different functions")
        results = {
            "same_function_max_logit_difference": difference,
            "training_step": training_step(args, plain, adapters, folder),
            "mixed_batch_8_rows_4_adapters": mixed_batch(args, model, adapters, peft_model),
            "hot_swap": hot_swap(args, adapters, peft_model, folder),
            "decode_one_adapter": decode(args, model, adapters),
        }
    train, mixed, swap, dec = (results[k] for k in ("training_step", "mixed_batch_8_rows_4_adapters", "hot_swap",
                                                      "decode_one_adapter"))
    print(f"model {args.dim} wide x {args.layers} layers, LoRA rank {args.rank} on 7 projections, "
          f"{args.threads} threads, medians of {args.repeats}, {'CPU' if args.cpu_time else 'wall'} time")
    print("| what | ours | peft | ours vs peft | goal |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| training step ({args.batch} x {args.seq} tokens) | {1e3 * train['ours_s']:.1f} ms | "
          f"{1e3 * train['peft_s']:.1f} ms | {train['speedup']:.2f}x | >= 1.0x |")
    print(f"| mixed batch, 8 rows over 4 adapters: forward of {args.seq} tokens | {1e3 * mixed['ours_s']:.1f} ms | "
          f"{1e3 * mixed['peft_s']:.1f} ms | {mixed['speedup']:.2f}x | >= 2x |")
    print(f"| (the same forward, our bare base without adapters: the bound) | "
          f"{1e3 * mixed['bare_base_ours_s']:.1f} ms | {1e3 * mixed['peft_s']:.1f} ms | "
          f"at most {mixed['speedup_bound']:.2f}x | |")
    print(f"| mixed batch, 8 rows over 4 adapters: greedy generate of {args.new_tokens} tokens | "
          f"{1e3 * mixed['generate_ours_s']:.0f} ms | {1e3 * mixed['generate_peft_s']:.0f} ms | "
          f"{mixed['generate_speedup']:.2f}x | >= 2x |")
    for tokens, row in mixed["layer"].items():
        print(f"| mixed batch, 8 rows over 4 adapters: one LoRA projection, {tokens} token(s) per row "
              f"(its base matmul alone: {1e6 * row['base_s']:.0f} us) | {1e6 * row['ours_s']:.0f} us | "
              f"{1e6 * row['peft_s']:.0f} us | {row['speedup']:.2f}x (adapter part: {row['adapter_speedup']:.2f}x) "
              f"| >= 2x |")
    print(f"| switch the active adapter | {swap['switch_ours_ms']:.3f} ms | {swap['switch_peft_ms']:.3f} ms | "
          f"{swap['switch_peft_ms'] / swap['switch_ours_ms']:.1f}x | |")
    print(f"| hot swap from a file | {swap['file_ours_ms']:.1f} ms | {swap['file_peft_ms']:.1f} ms | "
          f"{swap['file_peft_ms'] / swap['file_ours_ms']:.2f}x | |")
    print(f"| greedy decode with one adapter vs the bare base | {dec['lora_tokens_per_s']:.0f} tok/s | "
          f"base {dec['base_tokens_per_s']:.0f} tok/s | {dec['ratio']:.2f}x of base | >= 0.9x |")
    print(f"(ours = peft to {difference:.1e} in logits; mixed batch to {mixed['max_logit_difference']:.1e}; "
          f"{mixed['generated_rows_equal']}/8 generated rows equal token for token; ours generates with the "
          f"{mixed['generate_plan'].removeprefix('decode plan: ')})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
