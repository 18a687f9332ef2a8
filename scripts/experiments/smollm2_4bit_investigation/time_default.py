# Experiment record (issue 15, 2026-11-30; docs/compression.md, the 4-bit SmolLM2 investigation). Run from the repo root; exp1 first.
"""Time notebooks/reproduce_compression.ipynb's default run (its parameters cell's values) on a tiny
afm_2024_device_tiny base (random init: speed does not depend on the weights) with runs/base's tokens."""
import time, torch, mmafm, json
from mmafm.tokenizer import Tokenizer
from mmafm.compress.reproduce import full_size_table
from mmafm.stages.compression import CompressionStageConfig, run
tok_path = "/work/main/runs/base/00_data/tokenizer/tokenizer.model"
torch.manual_seed(0)
model = mmafm.create_model("afm_2024_device_tiny", vocab_size=Tokenizer.load(tok_path).vocab_size)
ckpt = mmafm.save_model("scripts/experiments/smollm2_4bit_investigation/base/checkpoints/text_model", model, {"tokenizer": tok_path})
wall, cpu = time.perf_counter(), time.process_time()
cfg = CompressionStageConfig(out_dir="scripts/experiments/smollm2_4bit_investigation/reproduce_default", checkpoint=str(ckpt),
                             tokens_dir="/work/main/runs/base/00_data/tokens", schemes="palettize4,mixed,astc,palettize2,qat2",
                             mixed_bpw=3.5, max_steps=40, qat_steps=40, seq_len=64, batch_size=4, eval_batches=2, seed=0)
run(cfg)
full_size_table()
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads()}))
