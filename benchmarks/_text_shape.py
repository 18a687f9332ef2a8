"""The decoder shape the text benchmarks share (bench_text.py, bench_lora.py): one set of
command-line flags and one builder, so both time the same model."""

from __future__ import annotations

import argparse

import torch
from torch import nn

import mmafm


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and the decoder's shape: 512 wide x 8 layers, GQA 8/2 x 64, FFN 1408."""
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=2048, help="the tiny pipeline's tokenizer size")


def build_decoder(args: argparse.Namespace, max_seq_len: int) -> nn.Module:
    """The benchmarked text model (seeded), in eval mode."""
    torch.manual_seed(0)
    return mmafm.create_model(
        "afm_2024_device_tiny", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
        n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim, ffn_dim=args.ffn,
        max_seq_len=max_seq_len,
    ).eval()
