"""Distillation (mmafm.train.distill): the 2024 top-1 target, forward KL, the teacher-label cache,
and 02_text_pretrain's distillation fields.

References: PyTorch's cross-entropy with probability targets (the soft target written out);
a naive full-softmax forward KL (``F.kl_div`` over the whole vocabulary) for values and
gradients; the teacher run directly on the shards' windows for the cache.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.io import read_jsonl
from mmafm.data.shards import TokenShards
from mmafm.train.distill import (
    UNSET,
    DistillTask,
    TeacherLabelShards,
    build_teacher_cache,
    chunked_forward_kl,
    read_teacher_cache,
    top1_distillation_loss,
    topk_forward_kl,
)

VOCAB = 96


def naive_forward_kl(student_logits, teacher_logits, temperature, mask=None):
    """tau^2 * mean over tokens of KL(softmax(t/tau) || softmax(s/tau)), full vocabulary."""
    per_token = F.kl_div((student_logits / temperature).log_softmax(-1), (teacher_logits / temperature).log_softmax(-1),
                         log_target=True, reduction="none").sum(-1)
    keep = torch.ones_like(per_token) if mask is None else mask.float()
    return temperature**2 * (per_token * keep).sum() / keep.sum()


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    """A small token shard written like the data stage writes one (uint32 ids < VOCAB)."""
    from mmafm.io import atomic_write_json

    root = tmp_path_factory.mktemp("distill_tokens")
    rng = np.random.default_rng(0)
    for split, count in (("train", 1000), ("val", 300)):
        rng.integers(0, VOCAB, count).astype(np.uint32).tofile(root / f"{split}.bin")
    atomic_write_json(root / "meta.json", {"dtype": "uint32", "count": {"train": 1000, "val": 300}, "vocab_size": VOCAB})
    return root


def test_top1_target_is_the_convex_combination():
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 5))
    teacher = torch.randint(0, VOCAB, (2, 5))
    labels[0, 1] = -100  # not scored
    target = 0.9 * F.one_hot(teacher, VOCAB).float() + 0.1 * F.one_hot(labels.clamp(min=0), VOCAB).float()
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(top1_distillation_loss(logits, labels, teacher, 0.9), expected, atol=1e-6)
    # weight 0 is plain cross-entropy, weight 1 is cross-entropy on the teacher's labels
    plain = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(top1_distillation_loss(logits, labels, teacher, 0.0), plain, atol=1e-6)
    assert torch.allclose(top1_distillation_loss(logits, labels, teacher, 1.0),
                          F.cross_entropy(logits[keep], teacher[keep]), atol=1e-6)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        top1_distillation_loss(logits, labels, teacher, 1.5)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (2.0, 96), (0.5, 1000)])
def test_chunked_forward_kl_matches_the_full_softmax(temperature, chunk):
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(2, 6, 24, dtype=torch.float64), torch.randn(VOCAB, 24, dtype=torch.float64)
    mask = torch.rand(2, 6) > 0.3
    chunked = chunked_forward_kl(hidden, weight, teacher_hidden, teacher_weight, temperature, mask, chunk)
    grads = torch.autograd.grad(chunked, (hidden, weight))
    naive = naive_forward_kl(hidden @ weight.T, teacher_hidden @ teacher_weight.T, temperature, mask)
    naive_grads = torch.autograd.grad(naive, (hidden, weight))
    assert torch.allclose(chunked.double(), naive, atol=1e-5)
    for got, want in zip(grads, naive_grads):
        assert torch.allclose(got, want, atol=1e-5)
    # the student equal to the teacher: zero
    same = chunked_forward_kl(teacher_hidden, teacher_weight, teacher_hidden, teacher_weight, temperature, None, chunk)
    assert abs(same.item()) < 1e-5


def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl():
    student, teacher = torch.randn(3, 4, VOCAB), torch.randn(3, 4, VOCAB)
    values, ids = teacher.topk(VOCAB, dim=-1)
    assert torch.allclose(topk_forward_kl(student, ids, values, 2.0), naive_forward_kl(student, teacher, 2.0), atol=1e-5)
    # top-k: KL to the teacher renormalised over its k best
    values, ids = teacher.topk(5, dim=-1)
    truncated = torch.full_like(teacher, float("-inf")).scatter(-1, ids, values)
    q = truncated.softmax(-1)
    expected = (q * (q.clamp(min=1e-30).log() - student.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(topk_forward_kl(student, ids, values, 1.0), expected, atol=1e-5)


def test_teacher_cache_round_trips(tokens_dir, tmp_path):
    teacher = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB).eval()
    seq_len = 32
    cache = build_teacher_cache(teacher, tokens_dir, seq_len, tmp_path / "cache", top_k=4, batch_size=8)
    meta, arrays = read_teacher_cache(cache)
    assert meta["count"] == 1000 and meta["bytes_per_token"] == 4 + 4 * 6
    assert (cache / "train.top1.bin").stat().st_size == 4 * 1000  # 4 bytes per token
    tokens = np.fromfile(tokens_dir / "train.bin", dtype=np.uint32).astype(np.int64)
    windows = (1000 - 1) // seq_len
    with torch.no_grad():
        ids = torch.from_numpy(tokens[: windows * seq_len].reshape(windows, seq_len))
        logits = teacher(ids)
    assert np.array_equal(arrays["top1"][: windows * seq_len], logits.argmax(-1).flatten().numpy())
    assert (arrays["top1"][windows * seq_len :] == UNSET).all()  # the tail no window covers
    values, indices = logits.topk(4, dim=-1)
    assert np.array_equal(arrays["topk_ids"][: windows * seq_len], indices.reshape(-1, 4).numpy())
    assert np.allclose(arrays["topk_logits"][: windows * seq_len], values.reshape(-1, 4).numpy(), atol=2e-3)
    # written once: a second build for the same teacher reuses the files
    stamp = (cache / "train.top1.bin").stat().st_mtime_ns
    assert build_teacher_cache(teacher, tokens_dir, seq_len, tmp_path / "cache", top_k=2) == cache
    assert (cache / "train.top1.bin").stat().st_mtime_ns == stamp
    # the shards with labels: the same batches as the token shards, labels aligned
    shards = TokenShards(tokens_dir, seq_len, 4, seed=3)
    labelled = TeacherLabelShards(TokenShards(tokens_dir, seq_len, 4, seed=3), cache)
    for (ids, targets), (ids2, targets2, top1) in zip(shards, labelled):
        assert torch.equal(ids, ids2) and torch.equal(targets, targets2)
        with torch.no_grad():
            assert torch.equal(top1, teacher(ids).argmax(-1))
    with pytest.raises(ValueError, match="made for seq_len=32"):
        TeacherLabelShards(TokenShards(tokens_dir, 16, 4), cache)


@pytest.mark.parametrize("loss,cached", [("top1", True), ("top1", False), ("kl", True), ("kl", False)])
def test_weight_zero_is_plain_cross_entropy(loss, cached, tokens_dir, tmp_path):
    student = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB)
    teacher = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB).eval()
    shards = TokenShards(tokens_dir, 16, 2)
    if cached:
        cache = build_teacher_cache(teacher, tokens_dir, 16, tmp_path / "cache", top_k=3 if loss == "kl" else 0)
        shards = TeacherLabelShards(shards, cache, use_topk=loss == "kl")
    batch = next(iter(shards))
    task = DistillTask(student, [], teacher=teacher, weight=0.0, loss=loss)
    losses, metrics = task.training_forward(batch)
    plain, _ = student.loss(student(batch[0]), batch[1])
    assert losses["lm"].item() == plain.item()
    losses["lm"].backward()
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    plain.backward()
    assert all(torch.allclose(g, p.grad, atol=1e-7) for g, p in zip(got, student.parameters()))
    # with weight 0.9 the teacher term counts
    task.weight = 0.9
    mixed = task.training_forward(batch)[0]["lm"].item()
    assert mixed != pytest.approx(plain.item()) and metrics["distill"] > 0


def _folder_state(folder):
    """Every file under ``folder``: relative path -> (size, mtime_ns, sha256)."""
    import hashlib

    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def test_teacher_cache_is_never_written_into_the_tokens(tokens_dir, tmp_path):
    teacher = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB).eval()
    before = _folder_state(tokens_dir)
    with pytest.raises(ValueError, match="pass cache_dir or cache_root"):
        build_teacher_cache(teacher, tokens_dir, 32)
    with pytest.raises(ValueError, match="inside the token folder"):
        build_teacher_cache(teacher, tokens_dir, 32, cache_root=tokens_dir / "teacher_cache")
    from mmafm.train.distill import teacher_fingerprint

    cache = build_teacher_cache(teacher, tokens_dir, 32, cache_root=tmp_path / "run" / "teacher_cache")
    assert cache == tmp_path / "run" / "teacher_cache" / f"{teacher_fingerprint(teacher)[:16]}-T32"
    assert _folder_state(tokens_dir) == before
    # another teacher: its own folder beside the first, the first reused unchanged
    other = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB).eval()
    stamp = (cache / "train.top1.bin").stat().st_mtime_ns
    second = build_teacher_cache(other, tokens_dir, 32, cache_root=tmp_path / "run" / "teacher_cache")
    assert second != cache and (cache / "train.top1.bin").stat().st_mtime_ns == stamp
    assert build_teacher_cache(teacher, tokens_dir, 32, cache_root=tmp_path / "run" / "teacher_cache") == cache
    assert (cache / "train.top1.bin").stat().st_mtime_ns == stamp


def test_text_pretrain_distils_from_a_teacher(tmp_path):
    """02_text_pretrain with distill_from: it trains, writes the cache once into its own folder."""
    from mmafm.data.shards import write_token_shards
    from mmafm.data.synthetic import describe, sample_scene
    from mmafm.stages.text_pretrain import TextPretrainConfig, run
    from mmafm.tokenizer import train_tokenizer

    rng = random.Random(0)
    docs = [(f"scene-{i}", describe(sample_scene(rng))) for i in range(400)]
    tokenizer = train_tokenizer([text for _, text in docs], tmp_path / "tok" / "tokenizer", vocab_size=300)
    write_token_shards(docs, tokenizer, tmp_path / "tokens", val_fraction=0.1)
    teacher = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size)
    teacher_path = mmafm.save_model(tmp_path / "teacher", teacher, {})
    base = dict(tokens_dir=str(tmp_path / "tokens"), tokenizer=str(tokenizer.path), seq_len=32, batch_size=4,
                max_steps=2, warmup_steps=1, eval_batches=1, log_every=1, sample_prompts="two", sample_tokens=1,
                distill_from=str(teacher_path))
    if "eval_tasks" in TextPretrainConfig.__dataclass_fields__:  # task scores are not what this test is about
        base["eval_tasks"] = ""
    before = _folder_state(tmp_path / "tokens")
    outputs = run(TextPretrainConfig(out_dir=str(tmp_path / "top1"), **base))
    assert mmafm.load_model(outputs["checkpoint"]).config.vocab_size == tokenizer.vocab_size
    # the cache lives in 02's own folder, keyed by the teacher; the data stage's folder is untouched
    assert _folder_state(tmp_path / "tokens") == before
    from mmafm.train.distill import teacher_fingerprint

    caches = list((tmp_path / "top1" / "teacher_cache").iterdir())
    assert [c.name for c in caches] == [f"{teacher_fingerprint(teacher)[:16]}-T32"]
    assert (caches[0] / "train.meta.json").is_file()
    assert not [p for p in caches[0].iterdir() if p.name.endswith(".tmp")]  # atomic: no temp files left
    records = [r for r in read_jsonl(tmp_path / "top1" / "metrics.jsonl")
               if "distill" in r]
    assert records and all(np.isfinite(r["distill"]) for r in records)
    run(TextPretrainConfig(out_dir=str(tmp_path / "kl"), **base, distill_loss="kl", distill_temperature=2.0))
    assert _folder_state(tmp_path / "tokens") == before
    small = mmafm.create_model("afm_2024_device_tiny", vocab_size=64)
    with pytest.raises(ValueError, match="64-token vocabulary"):
        run(TextPretrainConfig(out_dir=str(tmp_path / "bad"), **{**base, "distill_from": str(
            mmafm.save_model(tmp_path / "small", small, {}))}))


def test_training_flops_count_what_a_token_uses():
    from mmafm.train.distill import train_flops_per_token, upcycled_teacher

    dense = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB)
    c = dense.config
    attention_params = c.n_layers * (2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim)
    ffn_params = c.n_layers * 3 * c.dim * c.ffn_dim
    by_hand = 3 * (2 * (attention_params + ffn_params + VOCAB * c.dim) + 2 * c.n_layers * c.n_heads * c.head_dim * 33)
    assert train_flops_per_token(dense, 32) == by_hand
    # upcycled, top-2 of 64 experts in every other layer: each MoE layer runs 2 FFNs and a router
    teacher = upcycled_teacher(dense, num_experts=64, top_k=2, moe_every=2)
    moe_layers = c.n_layers // 2
    extra = 3 * 2 * moe_layers * (3 * c.dim * c.ffn_dim + c.dim * 64)
    assert train_flops_per_token(teacher, 32) == by_hand + extra
    assert teacher.num_params() > 30 * dense.num_params() // 2  # 64 experts hold many more parameters
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():  # upcycling keeps the function until the experts train apart
        assert torch.allclose(teacher(ids), dense(ids), atol=1e-4)
