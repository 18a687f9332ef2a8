# Experiment record (issue 16, 2026-11-30; docs/distillation.md, "The teacher's cost, measured").
# Inputs: a 02 run at runs/lora_dev/02_text_pretrain and its 00 run; outputs under runs/teacher_cost/.
# Order: teacher_cost_slice.py 300000 0, then teacher_cost_scratch.py 1500, then teacher_cost_arms.py.
import sys, time, json, torch
torch.set_num_threads(1)
from mmafm.checkpoint import load_model
from mmafm.data.quality import build_quality_slice
from mmafm.stages.prune import train_loss_curve
from mmafm.stages.text_pretrain import held_out_batches
from mmafm.train.distill import upcycled_teacher
ck="runs/lora_dev/02_text_pretrain"; tok="runs/lora_dev/00_data/tokens"
budget=int(sys.argv[1]); pool=int(sys.argv[2])
t=time.time()
dense=load_model(ck, family="text", dtype=torch.float32)
info=build_quality_slice(dense, tok, f"runs/teacher_cost/slice_{budget}_{pool}", budget_tokens=budget, pool_tokens=pool, max_len=128, min_tokens=64, min_val_tokens=4*8*128+1, reference=ck)
print({k:v for k,v in info.items() if not isinstance(v,(list,dict))}, "slice s", time.time()-t, flush=True)
val=held_out_batches(info["tokens_dir"],128,8,4)
common=dict(eval_every=10, seq_len=128, batch_size=8, lr=2e-4)
t=time.time(); moe=upcycled_teacher(load_model(ck, family="text", dtype=torch.float32))
mc=train_loss_curve(moe, info["tokens_dir"], val, 60, **common); print("moe s", time.time()-t, flush=True)
t=time.time(); dc=train_loss_curve(load_model(ck, family="text", dtype=torch.float32), info["tokens_dir"], val, 180, **common); print("dense s", time.time()-t)
for c in (mc,dc): print([(p["step"], round(p["val_loss"],4), round(p["seconds"],1)) for p in c])
json.dump({"moe":mc,"dense":dc}, open(f"runs/teacher_cost/exp1_{budget}_{pool}.json","w"))
