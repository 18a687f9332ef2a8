"""AdaStar's native CPU kernel (mmafm/train/csrc/adastar.c via mmafm.train.native_optim).

- float32 parameters against the float64 NumPy transcription of axlearn's algorithm in
  ``tests/test_afm_optim.py`` over 50 steps, every option (update EMA on / off, weight decay on /
  off, mu-param scales, the RMS clip acting and off);
- against the foreach path (float32 rounding) with every switch of the optimizer;
- a step the trainer's guard skips changes nothing (bit for bit) on the native path;
- the thread count does not change a bit of the result;
- switched off (``kernels_disabled``, ``MMAFM_NATIVE_LINEAR=0``) or unbuildable, AdaStar takes its
  foreach path; ``fused=True`` then says why it cannot run.

The FSDP2 test of ``tests/test_afm_optim.py`` (2 gloo processes) runs the native path on the local
shards (float32 CPU DTensors), with the all-reduce of the per-block sums in Python.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmafm.inference.kernels import kernels_disabled
from mmafm.train import native_optim
from mmafm.train.optim import AdaStar
from mmafm.train.schedule import WarmupCosine

sys.path.insert(0, str(Path(__file__).parent))
from test_afm_optim import (  # noqa: E402
    AFM, _bad, _random_problem, _run_adastar, _train_paths, _train_tiny_model_twins, _trainer, numpy_adastar, tiny,
)

pytestmark = pytest.mark.skipif(native_optim.adastar_kernels() is None,
                                reason=f"no native AdaStar kernel: {native_optim.adastar_unavailable_reason()}")


@pytest.fixture
def native_calls(monkeypatch) -> list[str]:
    """Which kernel passes ran (so a test cannot pass on the foreach path by accident)."""
    calls: list[str] = []
    for name in ("pass1", "pass2", "step"):
        original = getattr(native_optim, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(native_optim, name, spy)
    return calls


# ------------------------------------------------------------------ against the NumPy reference
@pytest.mark.parametrize("update_ema", [True, False], ids=["update_ema", "no_update_ema"])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no_clip"])
@pytest.mark.parametrize("weight_decay", [3.16e-4, 0.0], ids=["decay", "no_decay"])
def test_native_matches_numpy_transcription_for_50_steps(native_calls, update_ema, clip, weight_decay):
    steps, lr = 50, 1e-2
    params, grads = _random_problem(steps)
    # the reference starts from the float32 values the kernel gets: what differs is its arithmetic
    params = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    grads = [{k: v.astype(np.float32).astype(np.float64) for k, v in step.items()} for step in grads]
    schedule = WarmupCosine(warmup_steps=5, total_steps=steps, min_lr_ratio=0.005)
    scales = {"layers.0.attn.q_proj.weight": 0.25, "layers.0.ffn.w_down.weight": 0.25}
    # the transcription's update EMA with b1 = 0 is no EMA; an infinite threshold is no clip
    cfg = {**AFM, "weight_decay": weight_decay, "b1": AFM["b1"] if update_ema else 0.0,
           "threshold": AFM["threshold"] if clip else float("inf")}
    want, want_v, want_m, clipped = numpy_adastar(params, grads, lr, [schedule(s) for s in range(steps)], scales, cfg)
    assert (clipped > 5) == clip  # the clip acts in the runs that have it

    tensors, optimizer = _run_adastar(params, grads, scales, schedule, torch.float32, lr=lr, weight_decay=weight_decay,
                                      update_ema_decay=0.95 if update_ema else None,
                                      update_clip_threshold=1.0 if clip else None, fused=True)
    # two groups a step: the whole step in one call with the clip, the one-pass form without it
    assert native_calls == ["step" if clip else "pass2"] * 2 * steps
    # float32 arithmetic against float64 over 50 steps: 2e-6 relative on the parameters (1e-6
    # with float64 parameters, test_afm_optim; the foreach path's float32 error is the same size)
    for name, tensor in tensors.items():
        np.testing.assert_allclose(tensor.detach().numpy(), want[name], rtol=2e-6, atol=1e-9, err_msg=name)
        state = optimizer.state[tensor]
        np.testing.assert_allclose(state["exp_avg_sq"].numpy(), want_v[name], rtol=1e-6, atol=1e-30, err_msg=name)
        if update_ema:
            np.testing.assert_allclose(state["update_ema"].numpy(), want_m[name], rtol=2e-6, atol=1e-7, err_msg=name)
        assert state["step"].item() == steps
    assert max(np.abs(want[k] - params[k]).max() for k in params) > 1e-2  # far beyond the tolerance


# ------------------------------------------------------------------- against the foreach path
@pytest.mark.parametrize("settings", [
    {},  # the AFM settings
    {"gradient_ema_decay": 0.9, "eps": 1e-8, "eps_square": 0.0, "update_clip_threshold": None,
     "update_ema_decay": None},  # the Adam form (one pass)
    {"gradient_ema_decay": 0.8, "gradient_ema_debias": False, "gradient_square_ema_debias": False,
     "eps": 1e-6, "update_clip_threshold": 0.5, "update_ema_debias": True},  # every switch flipped
    {"update_clip_threshold": None, "update_ema_debias": True, "weight_decay": 0.0},  # one pass, EMA debiased
], ids=["afm", "adam", "flipped", "one_pass_debiased"])
def test_native_path_equals_the_foreach_path(native_calls, settings):
    """Mixed shapes and dtypes (float64 blocks stay on the foreach path), two groups, blocks
    without a gradient on some steps (their step counts differ), a skipped step."""
    native, native_optimizer = _train_paths(None, **settings)
    assert native_calls  # the default took the kernel for the float32 blocks
    count = len(native_calls)
    foreach, foreach_optimizer = _train_paths(True, **settings)
    assert len(native_calls) == count  # foreach=True: not the kernel
    for index, (got, want) in enumerate(zip(native, foreach)):
        tolerance = dict(rtol=0, atol=0) if got.dtype == torch.float64 else dict(rtol=1e-5, atol=2e-7)
        torch.testing.assert_close(got, want, **tolerance, msg=f"block {index}")
        for key, value in foreach_optimizer.state[want].items():
            torch.testing.assert_close(native_optimizer.state[got][key], value, **tolerance, msg=f"block {index} {key}")
    assert native_optimizer.state[native[3]]["step"].item() == 31  # the block that missed gradients


def test_native_path_equals_the_foreach_path_on_the_tiny_model(native_calls):
    native_optimizer, _ = _train_tiny_model_twins((None, True), steps=5)
    assert native_calls.count("step") == 5 * len(native_optimizer.param_groups)


def test_the_sharded_form_equals_the_one_call_step(native_calls, monkeypatch):
    """Sharded blocks (FSDP2) take pass 1, the all-reduce of the sums in Python, then pass 2;
    whole blocks one call. With the all-reduce of one process (the identity) they agree bit for
    bit (the 2-process test in test_afm_optim.py checks the real all-reduce)."""
    import mmafm.train.optim as optim

    whole, whole_optimizer = _train_paths(None, steps=12)
    assert set(native_calls) == {"step"}
    native_calls.clear()
    monkeypatch.setattr(optim, "_shard_groups", lambda params: iter([(list(range(len(params))), None)]))
    monkeypatch.setattr(optim.dist, "all_reduce", lambda tensor, op=None, group=None: None)
    sharded, sharded_optimizer = _train_paths(None, steps=12)
    assert set(native_calls) == {"pass1", "pass2"}
    for index, (got, want) in enumerate(zip(sharded, whole)):
        assert torch.equal(got, want), index
        for key, value in whole_optimizer.state[want].items():
            assert torch.equal(sharded_optimizer.state[got][key], value), (index, key)


# ------------------------------------------------------------------------------ the guard
@pytest.mark.parametrize("kind", ["huge", "nan"])
def test_a_skipped_step_changes_nothing_on_the_native_path(native_calls, kind):
    good = tiny.global_batches(3, 8)
    reference = _trainer(good[:2], "afm")
    reference.fit()
    assert native_calls  # the trainer's float32 CPU model took the kernel
    skipping = _trainer(good[:2] + [_bad(good[2], kind)], "afm")
    skipping.fit()
    assert skipping.skipped_steps == 1
    for (name, got), want in zip(skipping.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(got, want), name
    got_state, want_state = skipping.optimizer.state_dict(), reference.optimizer.state_dict()
    for index, state in want_state["state"].items():
        for key, value in state.items():
            assert torch.equal(got_state["state"][index][key], value), (index, key)


# -------------------------------------------------------------------------------- threads
def _big_problem(threads: int, clip: bool) -> tuple[list[torch.Tensor], AdaStar]:
    """Blocks above the kernel's one-thread limit (524,288 elements a group), of sizes that are
    not multiples of its 65,536-element chunks, 4 steps on ``threads`` threads."""
    generator = torch.Generator().manual_seed(5)
    shapes = [(700, 801), (129, 1001), (17,), (64, 64)]  # the first alone is enough to use threads
    params = [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    optimizer = AdaStar([{"params": params[:2], "update_scale": 0.25}, {"params": params[2:]}], lr=1e-2,
                        update_clip_threshold=1.0 if clip else None, fused=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(4):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator) * (30.0 if step == 2 else 1.0)
            optimizer.step()
    finally:
        torch.set_num_threads(saved)
    return params, optimizer


@pytest.mark.parametrize("clip", [True, False], ids=["two_passes", "one_pass"])
def test_the_thread_count_does_not_change_the_result(clip):
    one, one_optimizer = _big_problem(1, clip)
    for threads in (2, 3):
        many, many_optimizer = _big_problem(threads, clip)
        for index, (got, want) in enumerate(zip(many, one)):
            assert torch.equal(got, want), (threads, index)
            for key, value in one_optimizer.state[want].items():
                assert torch.equal(many_optimizer.state[got][key], value), (threads, index, key)
    # the work was split: the kernel library's pool started helper threads
    assert native_optim.adastar_kernels().mmafm_pool_helpers() >= 1


# ------------------------------------------------------------------------------- fallback
def _small_run(**options) -> list[torch.Tensor]:
    params, _ = _train_paths(None, steps=8, **options)
    return params


def test_switched_off_takes_the_foreach_path(native_calls, monkeypatch):
    with kernels_disabled():
        off = _small_run()
        assert native_calls == []
        with pytest.raises(RuntimeError, match="kernels_disabled"):
            _fused_step()
    on = _small_run()
    assert native_calls
    for got, want in zip(off, on):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7)

    # the environment switch, read when the kernel is first loaded
    monkeypatch.setattr(native_optim, "_library", None)
    monkeypatch.setenv("MMAFM_NATIVE_LINEAR", "0")
    count = len(native_calls)
    env_off = _small_run()
    assert len(native_calls) == count and "MMAFM_NATIVE_LINEAR=0" in native_optim.adastar_unavailable_reason()
    for got, want in zip(env_off, off):
        assert torch.equal(got, want)


def _fused_step() -> None:
    param = nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    AdaStar([param], fused=True).step()


def test_a_failed_build_is_one_warning_then_the_foreach_path(native_calls, monkeypatch, tmp_path):
    monkeypatch.setattr(native_optim, "_library", None)
    monkeypatch.setenv("MMAFM_CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MMAFM_CACHE_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="native AdaStar kernel is unavailable"):
        failed = _small_run()
    assert native_calls == [] and "no C compiler" in native_optim.adastar_unavailable_reason()
    with kernels_disabled():
        foreach = _small_run()
    for got, want in zip(failed, foreach):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="no C compiler"):
        _fused_step()


def test_fused_true_refuses_what_the_kernel_cannot_take():
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    param.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        AdaStar([param], fused=True).step()
    with pytest.raises(ValueError, match="fused=True and foreach=False"):
        AdaStar([param], fused=True, foreach=False)
    # a non-contiguous gradient (the default falls back, nothing half done)
    weight = nn.Parameter(torch.ones(4, 6))
    weight.grad = torch.ones(6, 4).t()
    optimizer = AdaStar([weight])
    optimizer.step()
    reference = nn.Parameter(torch.ones(4, 6))
    reference.grad = torch.ones(4, 6)
    AdaStar([reference], foreach=True).step()
    assert torch.equal(weight, reference)


def test_count_steps_advances_every_block_in_one_call():
    """``count_steps``: each float32 step scalar + 1 in place (as ``add_(1.0)``), the new counts, and
    their common value only when every block has it."""
    steps = [torch.tensor(float(t)) for t in (4, 4, 4)]
    assert native_optim.count_steps(steps) == ([5, 5, 5], 5)
    assert [s.item() for s in steps] == [5.0, 5.0, 5.0]
    behind = [torch.tensor(7.0), torch.tensor(2.0), torch.tensor(7.0)]
    assert native_optim.count_steps(behind) == ([8, 3, 8], None)
    assert native_optim.count_steps([torch.tensor(0.0)]) == ([1], 1)


def test_the_symbol_table_matches_the_c_definitions():
    """native_optim's ctypes table against the exported functions of csrc/adastar.c: same names
    (plus the pool's), return types and parameter types, so a changed signature cannot be called
    with the old one."""
    source = re.sub(r"/\*.*?\*/", "", native_optim.SOURCE.read_text(), flags=re.S)
    definitions = re.findall(r"^(void|int|long)\s+(mmafm_\w+)\s*\(([^)]*)\)\s*\{", source, flags=re.M)
    scalars = {"float": ctypes.c_float, "double": ctypes.c_double, "long": ctypes.c_long, "int": ctypes.c_int}
    assert sorted(name for _, name, _ in definitions) == sorted(set(native_optim._SYMBOLS) - {"mmafm_pool_helpers"})
    for result, name, parameters in definitions:
        restype, argtypes = native_optim._SYMBOLS[name]
        assert restype == {"void": None, "int": ctypes.c_int, "long": ctypes.c_long}[result], name
        parameters = [" ".join(p.split()) for p in parameters.split(",")]
        assert len(parameters) == len(argtypes), name
        for parameter, argtype in zip(parameters, argtypes):
            want = ctypes.c_void_p if "*" in parameter else scalars[parameter.split()[-2]]
            assert argtype is want, (name, parameter)
