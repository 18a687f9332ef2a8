"""Decode fast paths: native gemv / RMSNorm kernels, RoPE table, single-query attention, the
decode plan's per-layer and whole-step kernels.

References: ``F.linear`` / ``F.rms_norm`` / ``rope_cos_sin`` / ``attend`` (torch's SDPA), and the
whole model run with the native kernels switched off (the plain module path).
"""

import multiprocessing
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmafm
from mmafm.inference import build_plan, generate, kernels_available, kernels_disabled
from mmafm.inference import kernels as native
from mmafm.layers.attention import attend
from mmafm.layers.rope import rope_cos_sin, rope_table
from mmafm.models.text import _single_query_attention

needs_native = pytest.mark.skipif(not kernels_available(),
                                  reason=f"native kernel unavailable: {native.kernels_unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features,in_features", [(5, 7), (64, 48), (130, 257)])
def test_linear_matches_f_linear(rows, out_features, in_features):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 1, in_features), torch.randn(out_features, in_features)
    with torch.no_grad():
        got = native.linear(x, w)
    assert got.shape == (rows, 1, out_features)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_native
def test_linear_non_contiguous_input_and_many_rows():
    x, w = torch.randn(16, 40).t(), torch.randn(24, 16)  # (40, 16): non-contiguous, > MAX rows
    with torch.no_grad():
        torch.testing.assert_close(native.linear(x[:3], w), F.linear(x[:3], w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native.linear(x, w), F.linear(x, w))  # many rows: the GEMM path


def test_linear_keeps_autograd():
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(1, 4)
    native.linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.expand(6, 4))


@needs_native
def test_apply_linears_one_call_equals_modules_and_respects_hooks():
    torch.manual_seed(0)
    layers = [nn.Linear(32, n, bias=False) for n in (16, 8, 8)]
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        outs = native.linears(x, *(layer.weight for layer in layers))  # Q/K/V: one GEMV call
        for layer, out in zip(layers, outs):
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    # a hooked projection is called as a module by the decode plan (its layer leaves the kernels)
    model = mmafm.create_model("afm_2024_device_tiny", max_seq_len=16).eval()
    kv_width = model.config.n_kv_heads * model.config.head_dim
    seen = []
    model.layers[1].attn.k_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
        seen.clear()
        plan = build_plan(model, cache)
        plan.step(torch.tensor([7, 8]))
    assert plan.layers[1].attention == "module" and plan.layers[0].attention == "kernel"
    assert seen == [torch.Size([2, 1, kv_width])]  # a hooked layer is called as a module
    with pytest.raises(ValueError, match="1 to 3"):
        native.linears(x, *(layer.weight for layer in layers), layers[0].weight)


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 512), (1, 1, 8, 64), (3, 5, 96), (2, 7)])
def test_rms_norm_matches_torch(shape):
    torch.manual_seed(1)
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    with torch.no_grad():
        torch.testing.assert_close(native.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5),
                                   rtol=1e-6, atol=1e-6)


def test_rope_table_equals_rope_cos_sin_bitwise():
    positions = torch.tensor([[0, 5, 17, 99], [3, 3, 42, 1]])
    cos_table, sin_table = rope_table(100, 16, 500_000.0)
    cos, sin = rope_cos_sin(positions, 16, 500_000.0)
    assert torch.equal(cos_table[positions], cos) and torch.equal(sin_table[positions], sin)


@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 8, 2), (3, 4, 4)])
def test_single_query_attention_matches_sdpa(batch, heads, kv_heads):
    torch.manual_seed(2)
    q = torch.randn(batch, heads, 1, 16)
    k_store, v_store = torch.randn(batch, kv_heads, 40, 16), torch.randn(batch, kv_heads, 40, 16)
    k, v = k_store.narrow(2, 0, 29), v_store.narrow(2, 0, 29)  # a cache prefix, as in decoding
    torch.testing.assert_close(_single_query_attention(q, k, v), attend(q, k, v), rtol=1e-5, atol=1e-6)


@needs_native
def test_model_decode_with_and_without_native_kernels():
    torch.manual_seed(3)
    model = mmafm.create_model("afm_2025_device_tiny").eval()  # KV sharing + GQA
    prompts = [[5, 9, 2, 7, 1], [4, 4]]
    fast = generate(model, prompts, max_new_tokens=6)
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(ids[:, :4], cache=cache)
        fast_logits = build_plan(model, cache).step(ids[:, 4])  # (1, V) through the kernels
    with kernels_disabled():  # every call now takes the torch path
        assert generate(model, prompts, max_new_tokens=6) == fast
    with torch.no_grad():
        reference = model(ids)[:, -1]
    torch.testing.assert_close(fast_logits, reference, rtol=1e-4, atol=1e-4)


def test_cache_longer_than_rope_table_computes_positions_directly():
    import dataclasses

    from mmafm.layers.kv_cache import KVCache
    from mmafm.models.text import TextModel, cache_specs

    torch.manual_seed(4)
    model = mmafm.create_model("afm_2024_device_tiny", max_seq_len=8).eval()
    longer = TextModel(dataclasses.replace(model.config, max_seq_len=16)).eval()
    longer.load_state_dict(model.state_dict())
    config = model.config
    cache = KVCache(cache_specs(config), 1, 12, config.n_kv_heads, config.head_dim)  # > max_seq_len
    ids = torch.randint(0, config.vocab_size, (1, 10))
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        for t in range(6, 10):
            step = model(ids[:, t : t + 1], cache=cache)
        reference = longer(ids)[:, -1:]
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- fused decode
# Reference: the same model and cache run module by module with every native kernel off.

_VARIANTS = {
    "dense_2024": ("afm_2024_device_tiny", {}),
    "kv_shared_2025": ("afm_2025_device_tiny", {}),
    "ring_and_nope": ("afm_2024_device_tiny", {"local_global_pattern": (1, 1), "sliding_window": 6}),
    "llama_layout_untied": ("afm_2024_device_tiny", {"qk_norm": False, "tie_embeddings": False}),
    "moe_teacher": ("afm_2025_moe_teacher_tiny", {}),
}


def _variant(name):
    preset, overrides = _VARIANTS[name]
    torch.manual_seed(11)
    return mmafm.create_model(preset, max_seq_len=32, **overrides).eval()


def _decode_logits(model, prompt, steps, use_fused_decoder):
    """Prefill ``prompt`` (B, T), then feed ``steps`` (B, N) one column at a time; returns the
    decode logits (B, N, V) and the cache. ``use_fused_decoder``: True = the decode plan with its
    whole-step kernel allowed, False = the plan layer by layer, None = the model's modules."""
    with torch.no_grad():
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps.shape[1])
        model(prompt, cache=cache)
        plan = None if use_fused_decoder is None else build_plan(model, cache, whole_step=use_fused_decoder)
        out = []
        for t in range(steps.shape[1]):
            if plan is not None:
                out.append(plan.step(steps[:, t]))
            else:
                out.append(model(steps[:, t : t + 1], cache=cache)[:, -1])
    return torch.stack(out, dim=1), cache


def _cache_tensors(cache):
    return [t for layer in cache.layers if layer is not None for t in (layer.keys, layer.values)]


@needs_native
@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("use_fused_decoder", [False, True], ids=["per_layer", "whole_step"])
def test_fused_decode_matches_module_path(variant, use_fused_decoder, monkeypatch):
    model = _variant(variant)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    steps = torch.randint(0, model.config.vocab_size, (2, 9))  # past the ring's 6 slots
    if use_fused_decoder:
        with torch.no_grad():
            probe = model.new_cache(2, 14)
            model(prompt, cache=probe)
            assert (not build_plan(model, probe).whole_step) == (variant == "moe_teacher")

    calls = []
    real = native.attention_block
    monkeypatch.setattr(native, "attention_block", lambda *args: calls.append(1) or real(*args))
    got, cache = _decode_logits(model, prompt, steps, use_fused_decoder)
    # the per-layer kernels ran (every layer, every step) unless the whole-step kernel did
    assert len(calls) == (0 if use_fused_decoder and variant != "moe_teacher" else 9 * model.config.n_layers)
    with kernels_disabled():
        want, reference_cache = _decode_logits(model, prompt, steps, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(_cache_tensors(cache), _cache_tensors(reference_cache)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("variant", ["kv_shared_2025", "ring_and_nope"])
def test_generate_with_padded_prompts_matches_module_path(variant):
    model = _variant(variant)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4], [6, 1, 2]]
    fast = generate(model, prompts, max_new_tokens=12)
    sampled = generate(model, prompts, max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    with kernels_disabled():
        assert generate(model, prompts, max_new_tokens=12) == fast
        assert generate(model, prompts, max_new_tokens=12, temperature=0.8, top_k=20, seed=3) == sampled
    # each row as it would generate alone
    assert [generate(model, [p], max_new_tokens=12)[0] for p in prompts] == fast


@needs_native
def test_fused_decoder_declines_what_it_cannot_run():
    model = _variant("dense_2024")
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        assert build_plan(model, cache).whole_step
        assert not build_plan(model, model.new_cache(1, 8, quantized=True)).whole_step  # int8 cache
        assert not build_plan(model, model.new_cache(1, 8, dtype=torch.bfloat16)).whole_step
        assert not build_plan(model, model.new_cache(native.MAX_ROWS + 1, 8)).whole_step  # GEMMs win
        handle = model.layers[1].attn.q_proj.register_forward_hook(lambda *args: None)
        assert not build_plan(model, cache).whole_step  # a hook must run: module by module
        handle.remove()
        assert build_plan(model, cache).whole_step
        original = model.layers[0].ffn.w_up
        model.layers[0].ffn.w_up = nn.Sequential(original)  # e.g. an adapter wrapping the layer
        assert not build_plan(model, cache).whole_step
        model.layers[0].ffn.w_up = original
        ptmoe = mmafm.create_model("afm_2025_server_tiny").eval()
        assert not build_plan(ptmoe, ptmoe.new_cache(1, 8)).whole_step
    assert not build_plan(model, cache).whole_step  # autograd on: the kernels do not record it


@needs_native
def test_fused_decoder_rejects_out_of_vocabulary_tokens_and_leaves_the_cache_usable():
    model = _variant("dense_2024")
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        plan = build_plan(model, cache)
        assert plan.whole_step
        with pytest.raises(ValueError, match="outside"):
            plan.step(torch.tensor([model.config.vocab_size]))
        assert cache.length == 3
        step = plan.step(torch.tensor([4]))
        reference = model(torch.tensor([[1, 2, 3, 4]]))[:, -1]
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("variant", ["kv_shared_2025", "ring_and_nope"])
def test_bf16_decode_step_matches_float32_math_on_the_same_weights(variant):
    """A bf16 model's whole-step decode reads bf16 weights and K/V but keeps float32 activations:
    it must track a float32 model holding the same (bf16-rounded) weights to bf16 K/V rounding."""
    model = _variant(variant).to(torch.bfloat16)
    reference = _variant(variant)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    with torch.no_grad():
        cache = model.new_cache(2, 14)
        model(ids[:, :5], cache=cache)
        plan = build_plan(model, cache)
        assert plan.whole_step and cache.dtype == torch.bfloat16
        got = torch.stack([plan.step(ids[:, t]) for t in range(5, 14)], dim=1)  # (2, 9, V), past the ring
        want = reference(ids)[:, 5:]
    assert got.dtype == torch.float32
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.005 * scale, f"{(got - want).abs().max()} vs logits up to {scale}"


@needs_native
def test_per_layer_fused_decode_leaves_hooked_attention_to_the_module_path():
    model = _variant("dense_2024")
    seen = []
    model.layers[1].attn.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        plan = build_plan(model, cache)
        step = plan.step(torch.tensor([4]))
        reference = model(torch.tensor([[1, 2, 3, 4]]))[:, -1]
    assert [layer.attention for layer in plan.layers] == ["kernel", "module", "kernel", "kernel"]
    assert seen == [(1, 3, model.config.dim), (1, 1, model.config.dim), (1, 4, model.config.dim)]
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-4)


def test_disabled_turns_every_kernel_off_and_back_on():
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    available = kernels_available()
    with kernels_disabled():
        assert not kernels_available()
        with torch.no_grad():
            torch.testing.assert_close(native.linear(x, w), F.linear(x, w), rtol=0, atol=0)  # torch's own call
    assert kernels_available() == available
    with pytest.raises(RuntimeError, match="inside"):
        with kernels_disabled():
            raise RuntimeError("inside")
    assert kernels_available() == available


# ----------------------------------------------------------------------------- thread pool
# The kernels split big weights over torch.get_num_threads() threads (csrc/pool.h): rows are
# claimed in chunks, so the thread count must not change a single bit of the result, and a caller
# never waits for a helper that is not running (a busy machine) or spins while idle.


def _with_threads(count, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


@needs_native
def test_pool_threads_change_no_bit_of_the_result():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 384)  # 3 rows: each weight row serves all of them
    weights = [torch.randn(518, 384), torch.randn(130, 384), torch.randn(130, 384)]  # 778 rows, 299K elements
    with torch.no_grad():
        single = _with_threads(1, lambda: native.linears(x, *weights))
        for threads in (2, 3, 5):
            split = _with_threads(threads, lambda: native.linears(x, *weights))
            assert all(torch.equal(a, b) for a, b in zip(split, single)), threads
        for got, weight in zip(single, weights):
            torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    # the bf16 variant of the same GEMV (the whole-step kernel's), against float32 math on the rounded weights
    library = native.kernels()
    w16 = weights[0].to(torch.bfloat16)
    rows = x.reshape(3, 384)
    outs = []
    for threads in (1, 3):
        y = torch.empty(3, 518)
        library.gemv3_bf16(rows.data_ptr(), w16.data_ptr(), None, None, y.data_ptr(), 3, 518, 0, 0, 384, threads)
        outs.append(y)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], rows @ w16.float().T, rtol=1e-5, atol=1e-4)
    assert 1 <= library.pool_helpers() <= 4


@needs_native
def test_whole_step_on_many_threads_equals_one_thread():
    """Big enough that the GEMVs and the attention over the cache (4 (row, KV head) pairs, 100+
    keys) run on the pool."""
    torch.manual_seed(5)
    model = mmafm.create_model("afm_2024_device_tiny", dim=384, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=64,
                               ffn_dim=1024, vocab_size=1024, max_seq_len=128).eval()
    prompt = torch.randint(0, 1024, (2, 100))
    steps = torch.randint(0, 1024, (2, 3))

    @torch.no_grad()
    def decode(threads):  # (B, N, V); the prefill (torch's matmuls) always on one thread
        cache = model.new_cache(2, 103)
        _with_threads(1, lambda: model(prompt, cache=cache))
        plan = build_plan(model, cache)
        assert plan.whole_step
        return _with_threads(threads, lambda: torch.stack([plan.step(steps[:, t]) for t in range(3)], dim=1))

    single, split = decode(1), decode(3)
    assert torch.equal(single, split)
    with kernels_disabled():
        want, _ = _decode_logits(model, prompt, steps, None)
    torch.testing.assert_close(split, want, rtol=1e-4, atol=1e-4)


def _gemv_call(threads):
    x, w, y = torch.randn(1, 512), torch.randn(1536, 512), torch.empty(1, 1536)  # 786K elements: pooled
    library = native.kernels()
    return lambda: library.gemv3_f32(x.data_ptr(), w.data_ptr(), None, None, y.data_ptr(), 1, 1536, 0, 0, 512, threads)


def _pin_process(cpus):
    """Pin every thread of this process (sched_setaffinity is per thread on Linux)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


@needs_native
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_helper_that_cannot_run_does_not_hold_up_its_caller():
    """All threads on one core: the helper can only run when the caller does not. Each call must
    still cost about what it costs on one thread (an OpenMP team waited for its helper's static
    share and spun meanwhile: ~100x slower here, the busy-machine decode slowdown of issue 12)."""
    one, two = _gemv_call(1), _gemv_call(2)
    two()  # helpers started before pinning, so they are pinned too
    saved = os.sched_getaffinity(0)
    _pin_process({min(saved)})
    try:
        rounds = {1: [], 2: []}
        for _ in range(5):  # interleaved: other load on this core hits both alike
            for threads, call in ((1, one), (2, two)):
                start = time.perf_counter()
                for _ in range(50):
                    call()
                rounds[threads].append(time.perf_counter() - start)
    finally:
        _pin_process(saved)
    assert statistics.median(rounds[2]) < 3 * statistics.median(rounds[1]), rounds


@needs_native
def test_idle_helpers_sleep_instead_of_spinning():
    call = _gemv_call(2)
    call()
    time.sleep(0.05)
    for _ in range(3):
        call()
        start = time.process_time()  # CPU time of every thread of the process
        time.sleep(0.2)
        idle = time.process_time() - start
        if idle < 0.002:
            break
    assert idle < 0.002, f"{idle * 1e3:.1f} ms of CPU in 200 ms idle after a kernel call"


@needs_native
def test_pool_works_in_a_forked_child():
    """DataLoader workers are forks: the child has none of the parent's helper threads."""
    torch.manual_seed(1)
    x, w = torch.randn(1, 512), torch.randn(1536, 512)
    with torch.no_grad():
        parent = _with_threads(2, lambda: native.linear(x, w))
    with multiprocessing.get_context("fork").Pool(1) as workers:
        child = workers.apply(_linear_on_two_threads, (x, w))
    assert torch.equal(child, parent)


def _linear_on_two_threads(x, w):
    with torch.no_grad():
        return _with_threads(2, lambda: native.linear(x, w))
