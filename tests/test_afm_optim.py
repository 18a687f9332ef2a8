"""The AFM optimizer (mmafm.train.optim.AdaStar), mu-param and the trainer's grad-norm guard.

- AdaStar against a plain NumPy transcription of axlearn's ``adastar_optimizer`` written here
  (float64, 50 steps, a warm-up + cosine schedule, mu-param scales, the clip active);
- its Adam special case against ``torch.optim.AdamW``;
- mu-param scales on the full-size presets (meta device);
- a skipped step changes nothing (parameters and optimizer state, bitwise), the counters land in
  metrics.jsonl and survive a resume;
- under FSDP2 (2 gloo processes) the per-block RMS is over the whole parameter: the result equals
  one process. This file is also the torchrun script of that test::

      python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_afm_optim.py OUT.json
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmafm.io import read_jsonl
from mmafm.train.optim import AdaStar, afm_param_groups, build_optimizer, mup_scales
from mmafm.train.schedule import WarmupCosine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import _train_script as tiny  # noqa: E402

AFM = dict(b2=0.95, b1=0.95, eps=0.0, eps_square=1e-30, threshold=1.0, weight_decay=3.16e-4)


# ----------------------------------------------------------------------- the NumPy reference
def numpy_adastar(params, grads_per_step, lr, schedules, scales, cfg):
    """axlearn's adastar_optimizer as its docstring and code state it, in float64 NumPy.

    Args:
        params: {name: array}; grads_per_step: list of {name: array};
        lr: peak LR; schedules: the LR multiplier of each step; scales: {name: mu-param scale};
        cfg: b2, b1 (update EMA, no debias), eps, eps_square, threshold, weight_decay.

    Returns:
        (final params, final v, final m, how many (step, block) updates were clipped)
    """
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    clipped = 0
    for t, (grads, schedule) in enumerate(zip(grads_per_step, schedules), start=1):
        for name, g in grads.items():
            v[name] = cfg["b2"] * v[name] + (1 - cfg["b2"]) * (g * g + cfg["eps_square"])
            v_hat = v[name] / (1 - cfg["b2"] ** t)
            raw = g / (np.sqrt(v_hat) + cfg["eps"])
            rms = np.sqrt(np.mean(raw * raw))
            clipped += rms > cfg["threshold"]
            raw = raw / max(1.0, rms / cfg["threshold"])
            m[name] = cfg["b1"] * m[name] + (1 - cfg["b1"]) * raw
            update = lr * scales.get(name, 1.0) * m[name] + cfg["weight_decay"] * params[name]
            params[name] = params[name] - schedule * update
    return params, v, m, clipped


def _random_problem(steps: int, seed: int = 0):
    """Blocks of several shapes and gradients whose scale jumps (so the RMS clip acts)."""
    rng = np.random.default_rng(seed)
    shapes = {"layers.0.attn.q_proj.weight": (6, 4), "layers.0.ffn.w_down.weight": (4, 9),
              "norm.weight": (4,), "embed.weight": (5, 4)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = []
    for step in range(steps):
        jump = 30.0 if step % 7 == 3 else 1.0  # a sudden large gradient: raw update RMS > 1
        grads.append({k: rng.normal(size=s) * jump * (0.1 if k == "norm.weight" else 1.0) for k, s in shapes.items()})
    return params, grads


def _run_adastar(params, grads, scales, schedule, dtype, **settings) -> tuple[dict[str, nn.Parameter], AdaStar]:
    """Train ``params`` ({name: array}) as ``dtype`` parameters with AdaStar(``settings``) on
    ``grads`` (a list of {name: array}), one step each, the LR following ``schedule``; the names in
    ``scales`` form one group with their (shared) mu-param scale, the rest another.

    Returns:
        The trained parameters by name, and the optimizer (for its state).
    """
    (update_scale,) = set(scales.values())
    tensors = {k: nn.Parameter(torch.tensor(v, dtype=dtype)) for k, v in params.items()}
    groups = [{"params": [tensors[k] for k in scales], "update_scale": update_scale},
              {"params": [t for k, t in tensors.items() if k not in scales]}]
    optimizer = AdaStar(groups, **settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step_grads in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(step_grads[name], dtype=dtype)
        optimizer.step()
        scheduler.step()
    return tensors, optimizer


def test_adastar_matches_numpy_transcription_for_50_steps():
    steps, lr = 50, 1e-2
    params, grads = _random_problem(steps)
    schedule = WarmupCosine(warmup_steps=5, total_steps=steps, min_lr_ratio=0.005)
    scales = {"layers.0.attn.q_proj.weight": 0.25, "layers.0.ffn.w_down.weight": 0.25}
    want, want_v, want_m, clipped = numpy_adastar(params, grads, lr, [schedule(s) for s in range(steps)], scales, AFM)
    assert clipped > 5  # the clip is exercised

    tensors, optimizer = _run_adastar(params, grads, scales, schedule, torch.float64, lr=lr)  # the AFM defaults
    for name, tensor in tensors.items():
        np.testing.assert_allclose(tensor.detach().numpy(), want[name], rtol=1e-6, atol=1e-12, err_msg=name)
        state = optimizer.state[tensor]
        np.testing.assert_allclose(state["exp_avg_sq"].numpy(), want_v[name], rtol=1e-6, atol=1e-28, err_msg=name)
        np.testing.assert_allclose(state["update_ema"].numpy(), want_m[name], rtol=1e-6, atol=1e-12, err_msg=name)
        assert state["step"].item() == steps
    # and the parameters moved by far more than the tolerance
    assert max(np.abs(want[k] - params[k]).max() for k in params) > 1e-2


def test_adam_special_case_equals_torch_adamw():
    """adastar(gradient_ema_decay=b1 debiased, gradient_square_ema_decay=b2 debiased, eps,
    eps_square=0, no update clip, no update EMA, weight_decay = lr * lambda) is AdamW."""
    steps, lr, betas, eps, decay = 30, 3e-3, (0.9, 0.99), 1e-8, 0.1
    params, grads = _random_problem(steps, seed=1)
    schedule = WarmupCosine(warmup_steps=3, total_steps=steps, min_lr_ratio=0.1)
    ours = [nn.Parameter(torch.tensor(v)) for v in params.values()]
    theirs = [nn.Parameter(torch.tensor(v)) for v in params.values()]
    adastar = AdaStar(ours, lr=lr, gradient_ema_decay=betas[0], gradient_ema_debias=True,
                      gradient_square_ema_decay=betas[1], gradient_square_ema_debias=True, eps=eps,
                      eps_square=0.0, update_clip_threshold=None, update_ema_decay=None, weight_decay=lr * decay)
    adamw = torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=eps, weight_decay=decay, foreach=False)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (adastar, adamw)]
    for step_grads in grads:
        for a, b, g in zip(ours, theirs, step_grads.values()):
            a.grad, b.grad = torch.tensor(g), torch.tensor(g)
        adastar.step()
        adamw.step()
        for s in schedulers:
            s.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(adastar.state[a]["exp_avg"], adamw.state[b]["exp_avg"])
        torch.testing.assert_close(adastar.state[a]["exp_avg_sq"], adamw.state[b]["exp_avg_sq"])


def test_adastar_rejects_bad_settings():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        AdaStar(p, lr=0.0)
    with pytest.raises(ValueError, match="update_ema_decay"):
        AdaStar(p, update_ema_decay=1.0)
    with pytest.raises(ValueError, match="eps_square"):
        AdaStar(p, eps=0.0, eps_square=0.0)
    with pytest.raises(ValueError, match="update_clip_threshold"):
        AdaStar(p, update_clip_threshold=0.0)


def test_a_group_with_its_own_lr_decays_by_its_own_schedule():
    param = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    optimizer = AdaStar([{"params": [param], "lr": 5e-3}], lr=1e-2, weight_decay=0.1, update_ema_decay=None)
    assert optimizer.param_groups[0]["peak_lr"] == 5e-3
    param.grad = torch.zeros(2, 2, dtype=torch.float64)
    optimizer.step()  # a zero gradient: only the decay moves p, by schedule (1) * wd
    torch.testing.assert_close(param.detach(), torch.full((2, 2), 0.9, dtype=torch.float64))


def test_zero_gradient_gives_a_finite_zero_update():
    param = nn.Parameter(torch.ones(3, 3))
    optimizer = AdaStar([param], lr=1e-2, weight_decay=0.0)
    param.grad = torch.zeros(3, 3)
    optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3, 3))


# ------------------------------------------------- multi-tensor path against the reference path
_MIXED_SHAPES = [(6, 4), (4, 9), (4,), (5, 4), (1,), (3, 3, 2), (7, 1)]


def _mixed_params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    dtypes = [torch.float64, torch.float32] * 4
    return [torch.randn(s, generator=generator, dtype=d) for s, d in zip(_MIXED_SHAPES, dtypes)]


def _train_paths(foreach: bool | None, steps: int = 40, **settings):
    """Mixed shapes and dtypes (two foreach buckets in one group), two groups (mu-param 0.25 and
    1), gradients that jump (the clip acts), one block without a gradient on some steps (its step
    count falls behind the others'), and a step the trainer skips (no ``step()`` call)."""
    generator = torch.Generator().manual_seed(3)
    params = [nn.Parameter(p.detach().clone()) for p in _mixed_params()]
    groups = [{"params": params[:3], "update_scale": 0.25}, {"params": params[3:], "weight_decay": 1e-2}]
    optimizer = AdaStar(groups, lr=1e-2, foreach=foreach, **settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps=4, total_steps=steps, min_lr_ratio=0.1))
    for step in range(steps):
        for index, param in enumerate(params):
            jump = 30.0 if step % 7 == 3 else 1.0
            param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype) * jump
            if index == 3 and step % 5 == 2:
                param.grad = None  # no gradient for this block on this step
            if index == 4 and step % 9 == 0:
                param.grad.zero_()  # a zero gradient (eps_square keeps it finite)
        if step != 11:  # step 11: the guard skipped it (no optimizer.step(), the schedule goes on)
            optimizer.step()
        scheduler.step()
    return params, optimizer


@pytest.mark.parametrize("settings", [
    {},  # the AFM settings
    {"gradient_ema_decay": 0.9, "eps": 1e-8, "eps_square": 0.0, "update_clip_threshold": None,
     "update_ema_decay": None},  # the Adam form
    {"gradient_ema_decay": 0.8, "gradient_ema_debias": False, "gradient_square_ema_debias": False,
     "eps": 1e-6, "update_clip_threshold": 0.5, "update_ema_debias": True},  # every switch flipped
], ids=["afm", "adam", "flipped"])
def test_foreach_path_equals_the_reference_path(settings):
    fast, fast_optimizer = _train_paths(None, **settings)
    slow, slow_optimizer = _train_paths(False, **settings)
    for index, (got, want, first) in enumerate(zip(fast, slow, _mixed_params())):
        tolerance = dict(rtol=1e-12, atol=1e-14) if got.dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got, want, **tolerance, msg=f"block {index}")
        assert (got - first).abs().max() > 5e-4  # every block moved, far beyond the tolerance
        for key, value in slow_optimizer.state[want].items():
            torch.testing.assert_close(fast_optimizer.state[got][key], value, **tolerance, msg=f"block {index} {key}")
    # the block that missed gradients took fewer steps than the others
    assert fast_optimizer.state[fast[3]]["step"].item() == slow_optimizer.state[slow[3]]["step"].item() == 31
    assert fast_optimizer.state[fast[0]]["step"].item() == 39


def _train_tiny_model_twins(foreach_pair: tuple[bool | None, bool | None], steps: int = 5) -> list[AdaStar]:
    """Two copies of the tiny AFM model, each trained ``steps`` steps on the same random gradients
    by AdaStar (AFM groups, mu-param width 3072) with its own ``foreach``; asserts that their
    parameters end equal (rtol 1e-5) and returns the two optimizers."""
    import mmafm

    models = [mmafm.create_model("afm_2024_device_tiny") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [AdaStar(afm_param_groups(model, 3.16e-4, width=3072), lr=1e-2, foreach=foreach)
                  for model, foreach in zip(models, foreach_pair)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
    for (name, got), want in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    return optimizers


def test_foreach_path_equals_the_reference_path_on_the_tiny_model():
    _train_tiny_model_twins((True, False))


# ---------------------------------------------------------------------------------- mu-param
def test_mup_scales_on_the_full_size_presets():
    import mmafm

    model = mmafm.create_model("afm_2024_device", device="meta")
    assert model.config.dim == 3072
    scales = mup_scales(model.named_parameters(), model.config.dim)
    matrices = {"q_proj", "k_proj", "v_proj", "o_proj", "w_gate", "w_up", "w_down"}
    assert len(scales) == model.config.n_layers * len(matrices) == 182
    assert set(scales.values()) == {0.25}  # min(768 / 3072, 1)
    assert {name.split(".")[-2] for name in scales} == matrices
    assert "embed.weight" not in scales and not any("norm" in name for name in scales)

    # the PT-MoE server: dense and expert FFNs of every track, the router left alone
    server = mmafm.create_model("afm_2025_server", device="meta")
    scales = mup_scales(server.named_parameters(), server.config.dim)
    assert set(scales.values()) == {min(768 / server.config.dim, 1.0)}
    expert = [n for n, p in server.named_parameters() if p.ndim == 3]
    assert expert and set(expert) <= set(scales)
    assert not any("router" in name for name in scales)

    # a model narrower than the base keeps scale 1; so do the tiny presets (width 96)
    tiny_model = mmafm.create_model("afm_2024_device_tiny")
    assert set(mup_scales(tiny_model.named_parameters(), tiny_model.config.dim).values()) == {1.0}
    with pytest.raises(ValueError, match="width"):
        mup_scales([], 0)


def test_afm_groups_decay_everything_and_carry_the_scales():
    import mmafm

    model = mmafm.create_model("afm_2024_device_tiny")
    groups = afm_param_groups(model, 3.16e-4, width=3072)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"mup", "plain"}
    assert by_name["mup"]["update_scale"] == 0.25 and by_name["plain"]["update_scale"] == 1.0
    assert all(g["weight_decay"] == 3.16e-4 for g in groups)  # norms and embedding decayed too
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    no_norm_decay = afm_param_groups(model, 3.16e-4, decay_all=False)
    assert {g["name"] for g in no_norm_decay} == {"plain", "plain_no_decay"}

    from mmafm.train import TrainConfig

    optimizer = build_optimizer(model, TrainConfig(optimizer="afm", lr=1e-2, weight_decay=3.16e-4))
    assert isinstance(optimizer, AdaStar) and optimizer.defaults["peak_lr"] == 1e-2
    assert optimizer.defaults["update_ema_decay"] == 0.95  # the AFM config's, by default
    off = build_optimizer(model, TrainConfig(optimizer="afm", lr=1e-2, afm_update_ema=0.0))
    assert off.defaults["update_ema_decay"] is None  # 0 = off (the tiny 02's open choice)
    assert isinstance(build_optimizer(model, TrainConfig()), torch.optim.AdamW)  # the default


# ---------------------------------------------------------------------------------- the guard
def _bad(batch: dict, kind: str) -> dict:
    if kind == "huge":  # a gradient norm far above grad_skip
        return {"inputs": batch["inputs"], "targets": batch["targets"] * 1e5}
    return {"inputs": batch["inputs"] * float("nan"), "targets": batch["targets"]}


def _trainer(batches: list[dict], optimizer: str, stage_dir=None, **settings):
    from mmafm.train import TrainConfig, Trainer

    config = TrainConfig(max_steps=len(batches), lr=1e-2, schedule="constant", grad_skip=100.0, log_every=1,
                         optimizer=optimizer, **settings)
    return Trainer(tiny.make_task(), batches, config, stage_dir)


@pytest.mark.parametrize("optimizer", ["afm", "adamw"])
@pytest.mark.parametrize("kind", ["huge", "nan"])
def test_a_skipped_step_changes_nothing(optimizer, kind):
    good = tiny.global_batches(3, 8)
    reference = _trainer(good[:2], optimizer)
    reference.fit()
    skipping = _trainer(good[:2] + [_bad(good[2], kind)], optimizer)
    records = [r for r in skipping.fit() if "loss" in r]
    assert skipping.skipped_steps == 1 and records[-1]["skipped_steps"] == 1
    assert kind == "nan" or records[-1]["grad_norm"] >= 100
    for (name, got), want in zip(skipping.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(got, want), name
    got_state, want_state = skipping.optimizer.state_dict(), reference.optimizer.state_dict()
    assert got_state["state"].keys() == want_state["state"].keys()
    for index, state in want_state["state"].items():
        for key, value in state.items():
            assert torch.equal(got_state["state"][index][key], value), (index, key)


def test_guard_counters_land_in_metrics_and_survive_resume(tmp_path):
    from mmafm.stages.base import StageDir

    good = tiny.global_batches(6, 8, seed=4)
    batches = [good[0], _bad(good[1], "huge"), good[2], _bad(good[3], "nan"), good[4], good[5]]
    stage = StageDir(tmp_path / "run", "guard")
    trainer = _trainer(batches, "afm", stage, grad_clip=0.05, ckpt_every=3)
    trainer.fit()
    records = [r for r in read_jsonl(stage.metrics_path) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 2, 2]
    # clipped: the applied steps whose norm exceeded grad_clip (but not grad_skip)
    norms = [r["grad_norm"] for r in records]
    applied = [math.isfinite(n) and n < 100 for n in norms]
    expected = np.cumsum([a and n > 0.05 for a, n in zip(applied, norms)]).tolist()
    assert [r["clipped_steps"] for r in records] == expected and expected[-1] >= 3
    assert math.isnan(records[3]["loss"])  # logged, not raised: the guard skipped that step

    # a run resumed from the step-3 checkpoint counts on from the saved counters
    resumed_stage = StageDir(tmp_path / "resumed", "guard")
    for path in (tmp_path / "run" / "checkpoints").glob("step_00000003.*"):
        (resumed_stage.checkpoint_dir / path.name).write_bytes(path.read_bytes())
    (resumed_stage.checkpoint_dir / "latest.json").write_text(
        (tmp_path / "run" / "checkpoints" / "latest.json").read_text().replace("00000006", "00000003"))
    copied = [{**r, "copied": True} for r in read_jsonl(stage.metrics_path)[:3]]
    resumed_stage.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in copied))
    again = _trainer(batches, "afm", resumed_stage, grad_clip=0.05, ckpt_every=3)
    again.fit()
    after = [r for r in read_jsonl(resumed_stage.metrics_path) if "loss" in r]
    assert [r.get("copied", False) for r in after] == [True] * 3 + [False] * 3  # it did resume
    assert [r["skipped_steps"] for r in after] == [0, 1, 1, 2, 2, 2]
    assert (again.skipped_steps, again.clipped_steps) == (trainer.skipped_steps, trainer.clipped_steps)
    for got, want in zip(again.model.state_dict().values(), trainer.model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_without_grad_skip_records_keep_their_keys():
    from mmafm.train import TrainConfig, Trainer

    records = Trainer(tiny.make_task(), tiny.global_batches(2, 8), TrainConfig(max_steps=2, log_every=1)).fit()
    assert "loss" in records[0] and "skipped_steps" not in records[0]


# ------------------------------------------------------------------------------------ FSDP2
FSDP_STEPS, FSDP_THRESHOLD = 6, 0.3  # a low clip threshold: every block is clipped


class _Blocks(nn.Module):
    """Linear layers of odd sizes (uneven shards over 2 ranks) in a ``layers`` list (FSDP units)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 5)])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            inputs = torch.tanh(layer(inputs))
        return inputs


def _fsdp_problem():
    torch.manual_seed(0)
    model = _Blocks()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)) for _ in range(FSDP_STEPS)]
    return model, batches


def _fsdp_train(model: nn.Module, batches) -> None:
    """The same global batch on every rank (FSDP2 averages the gradients: the one-process ones)."""
    groups = [{"params": list(model.layers[0].parameters()), "update_scale": 0.5},
              {"params": [p for layer in model.layers[1:] for p in layer.parameters()]}]
    optimizer = AdaStar(groups, lr=0.05, update_clip_threshold=FSDP_THRESHOLD, weight_decay=1e-2)
    for inputs, targets in batches:
        loss = ((model(inputs) - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _fsdp_main(out: str) -> None:
    import torch.distributed as dist

    import mmafm.train.optim as optim
    from mmafm.train.distributed import full_model_state_dict, parallelize

    dist.init_process_group("gloo")
    result = {}
    for variant in ("whole_block", "shard_only"):
        if variant == "shard_only":  # the mistake the test must catch: RMS over this rank's shard
            optim._shard_groups = lambda params: iter(())
        model, batches = _fsdp_problem()
        parallelize(model, "fsdp", torch.device("cpu"))
        result[f"{variant}_kinds"] = sorted({type(p).__name__ for p in model.parameters()})
        _fsdp_train(model, batches)
        result[variant] = {k: v.tolist() for k, v in full_model_state_dict(model).items()}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "fsdp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["whole_block_kinds"] == ["DTensor"]

    model, batches = _fsdp_problem()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _fsdp_train(model, batches)
    shard_only_error = 0.0
    for name, want in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(result["whole_block"][name]), want, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(want, start[name])
        shard_only_error = max(shard_only_error, (torch.tensor(result["shard_only"][name]) - want).abs().max().item())
    assert shard_only_error > 1e-3  # an RMS over each rank's shard alone would have been caught


if __name__ == "__main__":
    _fsdp_main(sys.argv[1])
