"""Experiment record (issue 13, 2026-11-30; inputs: a 04 run at runs/ev13/04_continued_pretrain and a 00 run at runs/lora_dev/00_data, edit the paths for yours).
Curriculum probe for 05: copy warm-up then short passkey rows; passkey exact match by length.
usage: exp.py OPT LR COPY_STEPS COPY_KIND TASK_STEPS TASK_LENS [BATCH]"""
import sys, time, random, json
import numpy as np, torch; torch.set_num_threads(1); torch.manual_seed(0)
from types import SimpleNamespace
from mmafm.tokenizer import Tokenizer
from mmafm.data.long_context import make_example, haystack_documents
from mmafm.stages.continued_pretrain import load_text_model
from mmafm.stages.long_context import answer_tokens
from mmafm.eval.long_context import evaluate_long_context
from mmafm.train.optim import build_optimizer
opt_name, lr, copy_steps, copy_kind, task_steps, task_lens = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
B = int(sys.argv[7]) if len(sys.argv) > 7 else 8
tasks = sys.argv[8].split(",") if len(sys.argv) > 8 else ["passkey"]
tok = Tokenizer.load("runs/lora_dev/00_data/tokenizer/tokenizer.model")
dk = dict(sources=("wikipedia", "jargon"), limit=0, seed=0)
train_docs, val_docs = haystack_documents(split="train", **dk), haystack_documents(split="val", **dk)
m = load_text_model("runs/ev13/04_continued_pretrain", tok.vocab_size, 1024, "x", rope_theta=5814281.0); m.train()
cfg = SimpleNamespace(optimizer=opt_name, lr=lr, weight_decay=1e-5 if opt_name == "afm" else 0.0, betas=(0.9, 0.95), eps=1e-8, afm_update_ema=0.95)
opt = build_optimizer(m, cfg)
toks = np.memmap("runs/lora_dev/00_data/tokens/train.bin", dtype=np.uint32, mode="r")
rng = np.random.default_rng(0)
t0 = time.time()
def step(ids, tgt):
    logits = m(ids)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    return loss.item()
import os; T = int(os.environ.get("CT", "128"))
for s in range(1, copy_steps + 1):
    rows, tg = [], []
    for _ in range(B):
        L = int(rng.integers(8, T // 2 + 1))
        if copy_kind == "random":
            w = rng.integers(300, 2000, L)
        else:
            st = int(rng.integers(0, len(toks) - L)); w = np.asarray(toks[st:st + L], dtype=np.int64)
        pre = np.asarray(toks[(q := int(rng.integers(0, len(toks) - T))):q + T], dtype=np.int64)
        row = np.concatenate([w, w, pre])[: T + 1]
        t = row[1:].copy(); t[: L] = -100; t[2 * L - 1:] = -100  # score the copy after its first token
        rows.append(row[:-1]); tg.append(t)
    loss = step(torch.tensor(np.stack(rows)), torch.tensor(np.stack(tg)))
    if s % 25 == 0: print("copy", s, round(loss, 3), round(time.time() - t0), flush=True)
lens = [int(x) for x in task_lens.split(",")] if task_steps else []
for s in range(1, task_steps + 1):
    n = lens[min(len(lens) - 1, (s - 1) * len(lens) // task_steps)]  # curriculum: lengths in order
    batch = []
    for b in range(B):
        ex = make_example(tasks[(s * B + b) % len(tasks)], random.Random(f"{s}-{b}").randint(max(64, n // 4), n) if n >= 128 else n, train_docs, tok, seed=7, index=s * B + b, digits=5)
        ids, first, end = answer_tokens(ex, tok)
        if os.environ.get('EOS'): ids, end = ids + [tok.eos_id], end + 1
        batch.append((ids, first, end))
    W = max(len(i) for i, _, _ in batch)
    ids = torch.zeros(B, W, dtype=torch.long); tgt = torch.full((B, W - 1), -100)
    for b, (i, f, e) in enumerate(batch):
        ids[b, :len(i)] = torch.tensor(i); tgt[b, f - 1:e - 1] = torch.tensor(i[f:e])
    loss = step(ids[:, :-1], tgt)
    if s % 25 == 0: print("task", n, s, round(loss, 3), round(time.time() - t0), flush=True)
m.eval()
res = evaluate_long_context(m, tok, tasks=tasks, lengths=(128, 256, 512, 1024), count=12, seed=1_000_003, documents=val_docs, digits=5)
print("EM", json.dumps(res["accuracy"]), "secs", round(time.time() - t0), flush=True)
print([ (r["answer"], r["prediction"]) for r in res["examples"][:6]])
