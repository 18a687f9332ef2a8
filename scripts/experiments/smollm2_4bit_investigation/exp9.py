# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Perplexity on 1024 tokens of English prose (GPL-3 text) for each variant."""
import sys, os, copy
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from mmafm.interop.smollm2 import load_smollm2, load_smollm2_tokenizer
from common import perplexity_printer, prose_ids, variant
fp = load_smollm2().eval()
ev = perplexity_printer(fp, prose_ids(load_smollm2_tokenizer()))
pr = torch.load("scripts/experiments/smollm2_4bit_investigation/perrow.pt")
ev(variant(fp, lin=lambda n, w: pr[n + ".weight"]), "LUT4 one table per row (4.44 bpw), linears only")
