"""07_sft's training step, packed (document_ids, attention reset) against padded, same conversations.

    .venv/bin/python benchmarks/bench_sft_packing.py                   # 1 thread, 11 repeats
    .venv/bin/python benchmarks/bench_sft_packing.py --threads 2 --repeats 21 --json benchmarks/results/sft_packing.json

Each repeat draws one step of ``--batch-size`` conversations of 07's default families (chat
template of a SentencePiece tokenizer trained here on the conversations themselves, so the
benchmark needs no data stage) and times forward + backward of the tiny 2024 on-device model on
them twice, interleaved: packed into rows of ``--row-len`` tokens with ``document_ids`` (a boolean
block-diagonal mask into SDPA), and one right-padded row per conversation (SDPA's causal path).
The table reports the median seconds of each and the ratio; the loss of the two must agree.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mmafm
from mmafm.data.chat import encode_chat, render_chat
from mmafm.io import atomic_write_json
from mmafm.posttrain.packing import collate_packed, collate_padded
from mmafm.posttrain.tasks import family_conversations
from mmafm.tokenizer import train_tokenizer


def step_seconds(model: torch.nn.Module, batch) -> tuple[float, float]:
    """``(seconds, loss)`` of one forward + backward."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logits = model(batch.input_ids, document_ids=batch.document_ids)
    loss, _ = model.loss(logits, batch.targets)
    loss.backward()
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--row-len", type=int, default=256)
    parser.add_argument("--families", default="format_list,format_json,tool_call")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    conversations = [c for f in args.families.split(",") for c in family_conversations(f, 200, seed=5)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer([render_chat(c) for c in conversations], Path(tmp) / "tok", vocab_size=600)
    examples = [encode_chat(c, tokenizer) for c in conversations]
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size).train()
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    tokens = {"packed": 0, "padded": 0}
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        chosen = [examples[i] for i in torch.randperm(len(examples), generator=generator)[: args.batch_size].tolist()]
        batches = {"packed": collate_packed(chosen, tokenizer.pad_id, args.row_len),
                   "padded": collate_padded(chosen, tokenizer.pad_id)}
        losses = {}
        for name, batch in batches.items():
            seconds, losses[name] = step_seconds(model, batch)
            if repeat:
                times[name].append(seconds)
                tokens[name] += batch.input_ids.numel()
        assert abs(losses["packed"] - losses["padded"]) < 1e-4, losses
    result = {name: statistics.median(values) for name, values in times.items()}
    result["padded_over_packed"] = result["padded"] / result["packed"]
    result["computed_tokens_padded_over_packed"] = tokens["padded"] / tokens["packed"]
    result.update(threads=args.threads, repeats=args.repeats, batch_size=args.batch_size, row_len=args.row_len)
    print(f"| step (fwd + bwd) | median s | computed tokens / step |\n| --- | --- | --- |")
    for name in ("packed", "padded"):
        print(f"| {name} | {result[name]:.4f} | {tokens[name] / args.repeats:.0f} |")
    print(f"padded / packed: time {result['padded_over_packed']:.2f}x, tokens "
          f"{result['computed_tokens_padded_over_packed']:.2f}x")
    if args.json:
        atomic_write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
