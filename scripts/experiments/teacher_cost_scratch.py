# Experiment record (issue 16, 2026-11-30; docs/distillation.md, "The teacher's cost, measured").
# Inputs: a 02 run at runs/lora_dev/02_text_pretrain and its 00 run; outputs under runs/teacher_cost/.
# Order: teacher_cost_slice.py 300000 0, then teacher_cost_scratch.py 1500, then teacher_cost_arms.py.
import sys, time, json, dataclasses, torch
torch.set_num_threads(1)
from mmafm.checkpoint import load_model
from mmafm.models.text import TextModel
from mmafm.stages.prune import train_loss_curve
from mmafm.stages.text_pretrain import held_out_batches
ck="runs/lora_dev/02_text_pretrain"; tok="runs/lora_dev/00_data/tokens"
base=load_model(ck, family="text", dtype=torch.float32)
torch.manual_seed(0)
big=TextModel(dataclasses.replace(base.config, ffn_dim=4*base.config.ffn_dim))
val=held_out_batches("runs/teacher_cost/slice_300000_0",128,8,11)
t=time.time()
c=train_loss_curve(big, tok, val, int(sys.argv[1]), eval_every=100, seq_len=128, batch_size=8, lr=2e-3, warmup_steps=50, schedule="cosine")
print("scratch s", time.time()-t)
print([(p["step"], round(p["val_loss"],4), round(p["seconds"],1)) for p in c])
json.dump(c, open("runs/teacher_cost/scratch.json","w"))
