# Experiment record (issue 16, 2026-11-30; docs/distillation.md, "The teacher's cost, measured").
# Inputs: a 02 run at runs/lora_dev/02_text_pretrain and its 00 run; outputs under runs/teacher_cost/.
# Order: teacher_cost_slice.py 300000 0, then teacher_cost_scratch.py 1500, then teacher_cost_arms.py.
"""The headline measurement: MoE (60 steps) and dense (180 more steps) on the 300k-token quality
slice, on exactly the held-out batches the 1500-step larger-dense-from-scratch run used
(runs/teacher_cost/scratch.json); costs to the MoE's best loss through the library's cost_to_reach."""
import json, time, torch
torch.set_num_threads(1)
from mmafm.checkpoint import load_model
from mmafm.stages.prune import TeacherArm, teacher_cost_curves, cost_to_reach, _ratio
from mmafm.stages.text_pretrain import held_out_batches
from mmafm.train.distill import upcycled_teacher, train_flops_per_token
ck = "runs/lora_dev/02_text_pretrain"; slice_dir = "runs/teacher_cost/slice_300000_0"
val = held_out_batches(slice_dir, 128, 8, 11)
base = load_model(ck, family="text", dtype=torch.float32)
base_flops = train_flops_per_token(base, 128) * 2457600
arms = [TeacherArm("upcycled MoE", upcycled_teacher(load_model(ck, family="text", dtype=torch.float32)), slice_dir, 60, 2e-4,
                   warmup_steps=10, start_flops=base_flops),
        TeacherArm("dense, more steps", base, slice_dir, 180, 2e-4, warmup_steps=10, start_flops=base_flops)]
t = time.time()
result = teacher_cost_curves(arms, val, reference="upcycled MoE", eval_every=10, seq_len=128, batch_size=8)
print("trained in", time.time() - t)
scratch = json.load(open("runs/teacher_cost/scratch.json"))
target = result["target"]; moe = result["arms"][0]
row = {"name": "larger dense (4x FFN), from scratch", "curve": scratch, "cost": cost_to_reach(scratch, target), "start_flops": 0.0}
result["arms"].append(row)
for arm in result["arms"]:
    c = arm["cost"] if arm["name"] != "upcycled MoE" else moe["cost"]
    print(f"{arm['name']:38s} best {min(p['val_loss'] for p in arm['curve'][1:]):.4f} cost {c}")
    if c:
        print("   MoE/this FLOPs %.4f  seconds %.4f  FLOPs with start %.4f" % (
            moe["cost"]["flops"] / c["flops"], moe["cost"]["seconds"] / c["seconds"],
            (moe["cost"]["flops"] + base_flops) / (c["flops"] + arm["start_flops"])))
    else:
        print("   not reached; bound MoE/this < %.4f" % (moe["cost"]["flops"] / arm["curve"][-1]["flops"]))
print("target", target)
json.dump(result | {"arms": [{k: v for k, v in a.items()} for a in result["arms"]]}, open("runs/teacher_cost/exp3.json", "w"), default=str)
