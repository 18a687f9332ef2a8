"""Experiment record (issue 13, 2026-11-30; inputs: a 04 run at runs/ev13/04_continued_pretrain and a 00 run at runs/lora_dev/00_data, edit the paths for yours).
Run 05 through its Python API: stage.py OUT key=value ...  (one torch thread)."""
import sys, json
import torch; torch.set_num_threads(1)
from mmafm.runner import resolve_stage_config
from mmafm.stages.long_context import run
params = dict(init_checkpoint="runs/ev13/04_continued_pretrain", tokenizer="runs/lora_dev/00_data/tokenizer/tokenizer.model",
              data_dir="runs/lora_dev/00_data")
import yaml; params.update((k, yaml.safe_load(v)) for k, v in (kv.split("=", 1) for kv in sys.argv[2:]))
cfg = resolve_stage_config("05_long_context", "configs/stages/05_long_context.yaml", params, out_dir=sys.argv[1])
run(cfg)
m = json.load(open(f"{sys.argv[1]}/manifest.json"))["summary"]
print(json.dumps({k: m[k] for k in ("ruler_before", "ruler_after", "answer_nll_after", "val_ppl", "steps", "seconds")}))
lad = json.load(open(f"{sys.argv[1]}/ladder.json"))
print("per task after", json.dumps(lad["after"]["accuracy"]))
print("per task before", json.dumps(lad["before"]["accuracy"]))
