"""Guided generation and speculative decoding: mask overhead, schema slowdown, speculative speed-up.

    .venv/bin/python benchmarks/bench_guided.py --threads 2 --json benchmarks/results/guided.json
    .venv/bin/python benchmarks/bench_guided.py --no-smollm2          # tiny models only
    .venv/bin/python benchmarks/bench_guided.py --parts schema        # only the schema slowdown

Measured in one run, medians over ``--repeats``, the variants interleaved (background load hits
them alike):

- **mask time per token** (p50 / p99 microseconds), llguidance and xgrammar, on the tokenizers
  guided generation runs over: a SentencePiece BPE trained as ``00_data`` trains it (2,048 pieces,
  byte fallback) and SmolLM2's byte-level BPE (49,152): one guided generation's tokens replayed
  through each engine's matcher, timing the bitmask fill plus its unpacking into a token mask (what
  :class:`mmafm.inference.guided.GrammarConstraint` does per step);
- **tokens/s with and without a schema** at batch 1: the same prompt decoded greedily for the same
  number of tokens, plain and guided (llguidance), prefill excluded (a 1-token run subtracted);
  the goal is <= 10% slowdown. Also the mask's own time inside the loop (fill, unpack, masking:
  ``GrammarConstraint.mask_seconds``) as p50 / p99 and as a fraction of a plain step, which a
  loaded machine disturbs less than the difference of two timings;
- **speculative decoding**: speed-up of :func:`mmafm.inference.speculative.speculative_generate`
  over plain greedy decoding and its acceptance rate, for a tiny pair (a random tiny target and
  its first layer as the draft) and for SmolLM2-135M-Instruct with its first 10 of 30 layers as
  the draft (:func:`~mmafm.inference.speculative.truncated_draft`; no smaller SmolLM2 is bundled);
  against transformers' assisted generation (``assistant_model=``) on the same pair exported
  to transformers, as a ratio to transformers' own plain greedy ``generate``. Goal: >= 1.5x at
  acceptance >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

import mmafm
from mmafm.inference import decode
from mmafm.inference.guided import (
    GrammarConstraint,
    Guide,
    generable,
    json_schema,
    make_engine,
    stream_object,
    unpack_bitmask,
)
from mmafm.inference.speculative import speculative_generate, truncated_draft


@generable
@dataclass
class Person:
    name: Annotated[str, Guide("first name", pattern=r"[A-Z][a-z]{2,12}")]
    age: Annotated[int, Guide(minimum=0, maximum=120)]
    city: Annotated[str, Guide("home city", pattern=r"[A-Z][a-z]{2,15}")]
    job: Literal["teacher", "engineer", "doctor", "artist", "farmer"]
    hobbies: Annotated[list[Annotated[str, Guide(pattern=r"[a-z]{3,12}")]], Guide(min_items=1, max_items=3)]
    height_m: Annotated[float, Guide(minimum=1.0, maximum=2.5)]


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"p50_us": 1e6 * ordered[len(ordered) // 2], "p99_us": 1e6 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "n": len(ordered)}


def mask_times(tokenizer, tokens: list[int], repeats: int) -> dict:
    """Per-token mask time of each engine replaying ``tokens`` (fill + unpack), interleaved."""
    schema = json_schema(Person)
    times: dict[str, list[float]] = {"llguidance": [], "xgrammar": []}
    setup = {}
    for name in times:
        start = time.perf_counter()
        engine = make_engine(tokenizer, name)
        engine.matcher(schema)
        setup[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name in times:
            engine = make_engine(tokenizer, name)
            matcher, bitmask = engine.matcher(schema), engine.bitmask(1)
            for token in tokens:
                start = time.perf_counter()
                matcher.fill(bitmask, 0)
                unpack_bitmask(bitmask, engine.table.vocab_size)
                times[name].append(time.perf_counter() - start)
                matcher.accept(token)
    return {name: {**percentiles(values), "first_matcher_s": setup[name]} for name, values in times.items()}


def decode_seconds(model, prompt: list[int], steps: int, constraint_factory=None) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = decode(model, ids, max_new_tokens=steps, constraint=constraint_factory() if constraint_factory else None)
    elapsed = time.perf_counter() - start
    if len(out.tokens[0]) != steps:
        raise RuntimeError(f"expected {steps} tokens, got {len(out.tokens[0])}")
    return elapsed


def schema_slowdown(model, tokenizer, prompt: list[int], steps: int, repeats: int) -> dict:
    """Tokens/s plain vs guided over the same number of steps (the guided object is longer than
    ``steps`` tokens, so neither stops early), prefill excluded."""
    engine = make_engine(tokenizer, "llguidance")
    schema = json_schema(Person)

    constraints: list[GrammarConstraint] = []

    def guided():
        constraints.append(GrammarConstraint([engine.matcher(schema)], model.config.vocab_size, engine.table.vocab_size))
        return constraints[-1]

    runs: dict[str, list[float]] = {"plain": [], "guided": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, factory in (("plain", None), ("guided", guided)):
            runs[name].append(decode_seconds(model, prompt, steps + 1, factory) - decode_seconds(model, prompt, 1, factory))
    rates = {name: steps / statistics.median(values[1:]) for name, values in runs.items()}
    in_loop = percentiles([t for c in constraints[2:] for t in c.mask_seconds])  # after the warm-up round
    return {"plain_tok_s": rates["plain"], "guided_tok_s": rates["guided"],
            "slowdown": 1 - rates["guided"] / rates["plain"], "steps": steps,
            "mask_in_loop_p50_us": in_loop["p50_us"], "mask_in_loop_p99_us": in_loop["p99_us"],
            "mask_p50_over_plain_step": in_loop["p50_us"] * 1e-6 * rates["plain"]}


def speculative(target, draft, prompts: list[list[int]], steps: int, k: int, repeats: int, hf: bool) -> dict:
    """Speed-up of speculative over plain greedy (ours), acceptance; transformers' assisted vs its plain."""
    from mmafm.inference import generate

    ours: dict[str, list[float]] = {"plain": [], "speculative": []}
    accepted = proposed = 0
    for repeat in range(repeats + 1):
        for prompt in prompts:
            start = time.perf_counter()
            plain = generate(target, [prompt], steps)[0]
            middle = time.perf_counter()
            result = speculative_generate(target, draft, prompt, steps, k=k)
            end = time.perf_counter()
            if result.tokens != plain:
                raise RuntimeError("speculative greedy differs from plain greedy")
            if repeat:
                ours["plain"].append(middle - start)
                ours["speculative"].append(end - middle)
                accepted, proposed = accepted + result.accepted, proposed + result.proposed
    out = {"ours_speedup": statistics.median(ours["plain"]) / statistics.median(ours["speculative"]),
           "acceptance": accepted / max(proposed, 1), "k": k, "steps": steps,
           "ours_plain_tok_s": steps / statistics.median(ours["plain"])}
    if hf:
        from mmafm.interop.hf import to_hf

        hf_target, hf_draft = to_hf(target), to_hf(draft)
        for model in (hf_target, hf_draft):
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0
        hf_draft.generation_config.num_assistant_tokens = k
        hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
        theirs: dict[str, list[float]] = {"plain": [], "assisted": []}
        for repeat in range(repeats + 1):
            for prompt in prompts:
                ids = torch.tensor([prompt])
                kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                              min_new_tokens=steps)
                with torch.no_grad():
                    start = time.perf_counter()
                    hf_target.generate(ids, **kwargs)
                    middle = time.perf_counter()
                    hf_target.generate(ids, assistant_model=hf_draft, **kwargs)
                    end = time.perf_counter()
                if repeat:
                    theirs["plain"].append(middle - start)
                    theirs["assisted"].append(end - middle)
        out["transformers_speedup"] = statistics.median(theirs["plain"]) / statistics.median(theirs["assisted"])
        out["ours_assisted_vs_transformers_assisted"] = (statistics.median(theirs["assisted"])
                                                         / statistics.median(ours["speculative"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-smollm2", action="store_true", help="tiny models only")
    parser.add_argument("--parts", default="mask,schema,speculative", help="comma-separated subset to run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    parts = set(args.parts.split(","))

    # the 00_data tokenizer's kind: SentencePiece BPE, 2,048 pieces, byte fallback
    from mmafm.data.text_sources import wikipedia_documents
    from mmafm.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        texts = [text for _, text in wikipedia_documents(limit=400)]
        sp_tokenizer = train_tokenizer(texts, Path(folder) / "tok", vocab_size=2048)
    torch.manual_seed(0)
    tiny = mmafm.create_model("afm_2024_device_tiny", vocab_size=sp_tokenizer.vocab_size).eval()
    prompt = [sp_tokenizer.bos_id] + sp_tokenizer.encode("A person:")
    final = list(stream_object(tiny, sp_tokenizer, Person, prompt, max_new_tokens=400, temperature=1.0, seed=0))[-1]
    if "mask" in parts:
        results["mask_sentencepiece_2048"] = mask_times(sp_tokenizer, list(final.token_ids), args.repeats)
    if "schema" in parts:
        results["schema_tiny"] = schema_slowdown(tiny, sp_tokenizer, prompt, min(40, len(final.token_ids) - 1),
                                                 args.repeats)
    print(json.dumps(results, indent=1), flush=True)

    torch.manual_seed(0)
    target = mmafm.create_model("afm_2024_device_tiny", dim=256, n_layers=8, n_heads=8, n_kv_heads=2).eval()
    prompts = [torch.randint(0, 2048, (16,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    if "speculative" in parts:
        results["speculative_tiny"] = speculative(target, truncated_draft(target, 1), prompts, 48, 4, args.repeats, True)
        print(json.dumps(results["speculative_tiny"], indent=1), flush=True)

    if not args.no_smollm2:
        from mmafm.interop.smollm2 import load_smollm2, load_smollm2_tokenizer

        tokenizer = load_smollm2_tokenizer()
        model = load_smollm2(max_seq_len=2048)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Invent a person."}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(chat, add_special_tokens=False).input_ids
        final = list(stream_object(model, tokenizer, Person, prompt, max_new_tokens=120))[-1]
        if "mask" in parts:
            results["mask_smollm2_49152"] = mask_times(tokenizer, list(final.token_ids), args.repeats)
        if "schema" in parts:
            results["schema_smollm2"] = schema_slowdown(model, tokenizer, prompt, min(24, len(final.token_ids) - 1),
                                                        args.repeats)
        print(json.dumps(results, indent=1), flush=True)
        questions = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]
        prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                           add_generation_prompt=True), add_special_tokens=False).input_ids
                   for q in questions]
        if "speculative" in parts:
            results["speculative_smollm2"] = speculative(model, truncated_draft(model, 10), prompts, 32, 4,
                                                         max(1, args.repeats - 2), True)
            print(json.dumps(results["speculative_smollm2"], indent=1), flush=True)
    if args.json:
        from mmafm.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
