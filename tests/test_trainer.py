"""The shared trainer against independent references: an uninterrupted run (exact resume after a
SIGKILL), a plain autograd step (accumulation, clipping), closed-form schedule values."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmafm.checkpoint import load_checkpoint, load_into
from mmafm.config import ConfigError, from_dict
from mmafm.stages.base import StageDir
from mmafm.train import (
    TrainConfig,
    Trainer,
    WarmupConstant,
    WarmupCosine,
    build_optimizer,
    fsdp_units,
    param_groups,
)

sys.path.insert(0, str(Path(__file__).parent))
import _train_script as tiny  # noqa: E402

SCRIPT = Path(__file__).parent / "_train_script.py"


def sgd(lr: float):
    return lambda model, config: torch.optim.SGD(model.parameters(), lr=lr)


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ---------------------------------------------------------------- exact resume


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    full = tiny.resume_run(str(tmp_path / "full"))
    run_dir = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "resume", str(run_dir), "--kill-at", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 3
    steps_before = [r["step"] for r in StageDir(run_dir, "resume").metrics() if "loss" in r]
    assert steps_before == [1, 2, 3, 4, 5]  # the killed run got past its checkpoint

    resumed = tiny.resume_run(str(run_dir))

    expected, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == list(range(1, 10))
    for step in range(4, 10):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    # the eval at step 4 and the final one too
    evals = lambda recs: {r["step"]: r["eval/output_mean"] for r in recs if "eval/output_mean" in r}  # noqa: E731
    assert evals(resumed) == pytest.approx(evals(full), abs=1e-6)
    assert sorted(evals(resumed)) == [4, 8, 9]
    # metrics.jsonl holds each step once: the killed run's steps 4-5 were dropped and redone
    on_disk = StageDir(run_dir, "resume").metrics()
    assert [r["step"] for r in on_disk if "loss" in r] == list(range(1, 10))
    assert [r["step"] for r in on_disk if "eval/output_mean" in r] == [4, 8, 9]
    # same final weights
    final_full, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "final.safetensors")
    final_resumed, meta = load_checkpoint(run_dir / "checkpoints" / "final.safetensors")
    assert meta["step"] == 9
    for name, tensor in final_full.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=0, atol=1e-6)


def test_finished_run_is_not_repeated_and_checkpoints_are_pruned(tmp_path):
    first = tiny.resume_run(str(tmp_path))
    again = tiny.resume_run(str(tmp_path))
    assert again == first
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.safetensors"))
    assert ckpts == ["step_00000006.safetensors", "step_00000009.safetensors"]  # keep_checkpoints=2
    model = tiny.TinyNet()
    assert load_into(model, tmp_path / "checkpoints" / "final.safetensors")["step"] == 9


def test_same_seed_same_losses_other_seed_other_losses():
    def run(seed: int) -> dict[int, float]:
        config = TrainConfig(max_steps=4, log_every=1, seed=seed)
        return train_losses(Trainer(tiny.make_task(dropout=0.1), tiny.shuffled_loader(), config).fit())

    assert run(0) == run(0)
    assert run(0) != run(1)  # dropout masks and shuffling follow the seed


# ---------------------------------------------------------------- one step vs plain autograd


def _reference_grads(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    reference = copy.deepcopy(model)
    F.mse_loss(reference(batch["inputs"]), batch["targets"]).backward()
    return [p.grad.clone() for p in reference.parameters()]


def test_grad_accumulation_equals_one_big_batch():
    task = tiny.make_task()
    before = [p.detach().clone() for p in task.model.parameters()]
    big = tiny.global_batches(1, 8)[0]
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    grads = _reference_grads(task.model, big)

    config = TrainConfig(max_steps=1, grad_accum_steps=2, grad_clip=0.0, log_every=1, schedule="constant")
    records = Trainer(task, halves, config, optimizer_factory=sgd(0.1)).fit()

    for old, new, grad in zip(before, task.model.parameters(), grads):
        torch.testing.assert_close(new.detach(), old - 0.1 * grad, rtol=0, atol=1e-6)
    with torch.no_grad():
        full_loss = F.mse_loss(tiny.TinyNet.forward(_with_params(before), big["inputs"]), big["targets"])
    assert records[0]["loss"] == pytest.approx(full_loss.item(), abs=1e-6)
    assert records[0]["tokens_or_samples_per_s"] > 0


def _with_params(params: list[torch.Tensor]) -> nn.Module:
    model = tiny.TinyNet()
    with torch.no_grad():
        for target, value in zip(model.parameters(), params):
            target.copy_(value)
    return model


def test_clipping_caps_the_update_and_logs_the_raw_norm():
    task = tiny.make_task()
    before = [p.detach().clone() for p in task.model.parameters()]
    batch = tiny.global_batches(1, 8)[0]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in _reference_grads(task.model, batch)]))
    clip = 0.05
    assert raw_norm > 10 * clip

    config = TrainConfig(max_steps=1, grad_clip=clip, log_every=1, schedule="constant")
    records = Trainer(task, [batch], config, optimizer_factory=sgd(1.0)).fit()

    update = torch.cat([(new.detach() - old).flatten() for old, new in zip(before, task.model.parameters())])
    assert update.norm().item() == pytest.approx(clip, rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(raw_norm.item(), rel=1e-5)


# ---------------------------------------------------------------- schedule, precision, config


def test_schedule_closed_form_values():
    cosine = WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    # warm-up 1/4..4/4; cosine over 10 steps: half-way (step 9) = 0.1 + 0.9 * 0.5
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 9: 0.55, 14: 0.1, 30: 0.1}
    for step, value in expected.items():
        assert cosine(step) == pytest.approx(value, abs=1e-12), step
    constant = WarmupConstant(warmup_steps=2)
    assert [constant(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_trainer_follows_the_schedule():
    task = tiny.make_task()
    config = TrainConfig(max_steps=6, lr=0.2, warmup_steps=2, min_lr_ratio=0.1, log_every=1)
    records = Trainer(task, tiny.global_batches(3, 4), config).fit()
    train = [r for r in records if "lr" in r]
    assert len(train) == 6
    for record in train:
        step = record["step"] - 1  # optimizer steps taken before this one
        if step < 2:
            factor = (step + 1) / 2
        else:
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4))
        assert record["lr"] == pytest.approx(0.2 * factor, rel=1e-9), record["step"]


def test_bf16_autocasts_the_forward():
    task = tiny.make_task()
    config = TrainConfig(max_steps=3, precision="bf16", log_every=1)
    bf16 = train_losses(Trainer(task, tiny.global_batches(2, 4), config).fit())
    assert task.autocast_dtypes == [torch.bfloat16] * 3
    assert next(task.model.parameters()).dtype == torch.float32  # weights stay fp32

    fp32_task = tiny.make_task()
    fp32 = train_losses(Trainer(fp32_task, tiny.global_batches(2, 4), TrainConfig(max_steps=3, log_every=1)).fit())
    assert fp32_task.autocast_dtypes == [None] * 3
    assert bf16 != fp32  # bf16 really changed the arithmetic ...
    assert bf16 == pytest.approx(fp32, rel=3e-2)  # ... to bf16 accuracy


@pytest.mark.parametrize(
    "values, field",
    [
        ({"lr": -1.0}, "lr"),
        ({"precision": "fp16"}, "precision"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"parallel": "tp"}, "parallel"),
        ({"betas": [0.9, 1.2]}, "betas"),
        ({"max_steps": "ten"}, "max_steps"),
        ({"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_bad_config_names_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        from_dict(TrainConfig, values, source="train.yaml")
    if field != "learning_rate":
        with pytest.raises(ConfigError, match=field):
            TrainConfig(**values)


def test_metrics_records_have_the_documented_keys(tmp_path):
    config = TrainConfig(max_steps=4, log_every=2, eval_every=2)
    stage = StageDir(tmp_path, "keys")
    records = Trainer(tiny.make_task(), tiny.global_batches(2, 4), config, stage).fit()
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert set(train[0]) == {"step", "loss", "mse", "mae", "lr", "grad_norm", "tokens_or_samples_per_s"}
    assert train[0]["loss"] == train[0]["mse"]
    evals = [r for r in records if "loss" not in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(set(r) == {"step", "eval/output_mean"} for r in evals)
    assert stage.metrics() == records


def test_empty_data_and_bad_task_are_clear_errors():
    with pytest.raises(ValueError, match="no batches"):
        Trainer(tiny.make_task(), [], TrainConfig(max_steps=1)).fit()
    with pytest.raises(TypeError, match="training_forward"):
        Trainer(type("NoForward", (), {"model": nn.Linear(2, 2)})(), [], TrainConfig())

    class LogsLr(tiny.RegressionTask):
        def training_forward(self, batch):
            losses, _ = super().training_forward(batch)
            return losses, {"lr": 1.0}

    with pytest.raises(ValueError, match="'lr'"):
        Trainer(LogsLr(tiny.TinyNet()), tiny.global_batches(1, 4), TrainConfig(max_steps=1)).fit()


# ---------------------------------------------------------------- optimizer groups, FSDP units


class _WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.norm = nn.LayerNorm(4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos_embed"}


def test_no_weight_decay_on_norms_biases_embeddings_and_listed_names():
    model = _WithEmbedding()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, 0.1)}
    assert groups == {
        "decay": ["layers.0.weight", "layers.1.weight"],
        "no_decay": ["layers.0.bias", "layers.1.bias", "norm.bias", "norm.weight", "pos_embed", "tokens.weight"],
    }
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.3, lr=1e-3))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]


def test_fsdp_units_are_the_blocks():
    model = _WithEmbedding()
    assert fsdp_units(model) == list(model.layers)
    net = tiny.TinyNet()
    assert fsdp_units(net) == list(net.blocks)
    assert fsdp_units(nn.Linear(2, 2)) == []


# ---------------------------------------------------------------- the task contract, checkpoint files


def test_every_stage_task_follows_the_task_protocol():
    from mmafm.stages.clip_pretrain import ClipTask
    from mmafm.stages.text_pretrain import TextPretrainTask
    from mmafm.stages.vl_alignment import CaptionTask
    from mmafm.train import CountingTask, EvaluatingTask, TrainingTask

    model = nn.Linear(2, 2)
    tasks = {
        "text": TextPretrainTask(model, val_batches=[]),
        "clip": ClipTask(model, "clip", held_out={}),
        "caption": CaptionTask(model, "balanced"),
        "test": tiny.make_task(),
    }
    for name, task in tasks.items():
        assert isinstance(task, TrainingTask), name
        assert isinstance(task, EvaluatingTask), name  # every one evaluates on held-out data
    assert isinstance(tasks["text"], CountingTask) and isinstance(tasks["caption"], CountingTask)
    assert not isinstance(tasks["clip"], CountingTask)  # samples: the trainer's default count
    assert not isinstance(type("NoForward", (), {"model": model})(), TrainingTask)
    assert not isinstance(type("NoModel", (), {"training_forward": lambda self, batch: None})(), TrainingTask)


def test_train_state_survives_the_checkpoint_files(tmp_path):
    """Model + AdamW state -> safetensors + JSON -> a fresh model and optimizer: the next step
    is the same as the original's (torch's own optimizer is the reference)."""
    from mmafm.checkpoint import load_checkpoint, save_checkpoint
    from mmafm.train.checkpointing import flatten_optimizer, gather_train_state, load_train_state

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    def step(model, optimizer, seed):
        inputs = torch.randn(4, tiny.DIM_IN, generator=torch.Generator().manual_seed(seed))
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    torch.manual_seed(0)
    model = tiny.TinyNet()
    optimizer = adamw(model)
    for seed in range(2):
        step(model, optimizer, seed)
    model_state, optim_state = gather_train_state(model, optimizer)
    optim_tensors, optim_meta = flatten_optimizer(optim_state)
    tensors = {**{f"model/{k}": v for k, v in model_state.items()}, **optim_tensors}
    save_checkpoint(tmp_path / "state", tensors, {"optimizer": optim_meta})

    torch.manual_seed(1)  # other initial weights, to be overwritten
    restored = tiny.TinyNet()
    restored_optimizer = adamw(restored)
    loaded, meta = load_checkpoint(tmp_path / "state")
    load_train_state(restored, restored_optimizer, loaded, meta)
    assert restored_optimizer.param_groups[0]["betas"] == pytest.approx((0.9, 0.95))
    step(model, optimizer, seed=2)
    step(restored, restored_optimizer, seed=2)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, rtol=0, atol=0)


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np

    from mmafm.train.checkpointing import rng_state, set_rng_state

    torch.manual_seed(3)
    state = rng_state()
    # what the checkpoint JSON keeps: lists for the Python and NumPy tuples
    plain = {
        "python": json.loads(json.dumps([state["python"][0], list(state["python"][1]), state["python"][2]])),
        "numpy": [state["numpy"][0], np.asarray(state["numpy"][1]).tolist(), *state["numpy"][2:]],
        "torch": state["torch"],
    }
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(plain)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ------------------------------------------------------- a source that keeps its own position
def test_rollout_source_resumes_without_sampling_its_rollouts_again(tmp_path, monkeypatch):
    """RL batches are sampled from the policy being trained, so iterating the source again on
    resume (the trainer's default fast-forward) would sample every earlier rollout anew from the
    restored policy. RolloutSource keeps its position in the checkpoint (state_dict /
    load_state_dict): a run resumed at an iteration boundary samples only what is left and ends
    with the uninterrupted run's weights; one resumed inside an iteration samples that
    iteration's batch again, once."""
    import mmafm
    from mmafm.posttrain import rl

    sampled = []
    original = rl.sample_responses
    monkeypatch.setattr(rl, "sample_responses", lambda *a, **k: sampled.append(1) or original(*a, **k))

    def run(run_dir: Path, max_steps: int):
        torch.manual_seed(0)
        policy = mmafm.create_model("afm_2024_device_tiny", vocab_size=64)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        prompts = [([1, 5 + i, 9], None) for i in range(5)]
        source = rl.RolloutSource(policy, reference, prompts, lambda contexts, texts: torch.tensor(
            [float(len(t)) for t in texts]), lambda ids: " ".join(map(str, ids)), 3, [3], 0, n=2,
            prompts_per_iteration=2, inner_steps=2, max_new_tokens=4, keep_vocab_log_probs=False, seed=0)
        config = TrainConfig(max_steps=max_steps, ckpt_every=2, log_every=1, lr=1e-2, schedule="constant",
                             weight_decay=0.0)
        Trainer(rl.PolicyTask(policy, "ppo_clip"), source, config, StageDir(run_dir, "rl")).fit()
        return policy, source

    whole, whole_source = run(tmp_path / "whole", 6)
    assert len(sampled) == 3  # 6 steps, 2 per rollout batch
    sampled.clear()
    run(tmp_path / "split", 4)
    assert len(sampled) == 2
    sampled.clear()
    resumed, source = run(tmp_path / "split", 6)  # from the checkpoint at step 4: an iteration boundary
    assert len(sampled) == 1  # the third batch only (the fast-forward would have sampled all three)
    assert [h["iteration"] for h in source.history] == [1, 2, 3]
    assert [h["reward"] for h in source.history] == [h["reward"] for h in whole_source.history]
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    sampled.clear()
    run(tmp_path / "inside", 3)  # its last checkpoint (step 3) is inside the second iteration
    sampled.clear()
    _, source = run(tmp_path / "inside", 6)
    assert len(sampled) == 2 and [h["iteration"] for h in source.history] == [1, 2, 3]
