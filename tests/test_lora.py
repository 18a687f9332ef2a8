"""LoRA adapters (mmafm.lora): attachment by pattern on every kind of tower, slots, swaps without
recompiles, mixed batches, merges, adapter files bound to their base, the decode fast path, peft
interop and the reports' adapter sizes.

References: a naive ``W x + (alpha / r) B (A x)`` from the adapter's own tensors; per-row
single-adapter runs for mixed batches; the unadapted forward; transformers + peft's own LoRA
(``PeftModel``) on the exported model; closed-form parameter counts; a no-cache argmax loop.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_text_generate import reference_greedy  # the no-cache argmax reference, shared
from torch import nn

import mmafm
from mmafm.inference import build_plan, generate, kernels_available, kernels_disabled
from mmafm.layers import lora as lora_layer
from mmafm.layers.lora import AdapterRouting, LoRALinear
from mmafm.lora import AdapterFileError, BaseMismatchError, adapter_size, adapters_of, attach_lora, target_modules

needs_native = pytest.mark.skipif(not kernels_available(), reason="native kernels unavailable")


def tiny_model(seed: int = 0, name: str = "afm_2025_device_tiny", **overrides):
    torch.manual_seed(seed)
    settings = dict(init_std=0.3, max_seq_len=64) | overrides
    return mmafm.create_model(name, **settings).eval()


def randomize_adapter(adapters, name: str, std: float = 0.2, seed: int = 1) -> None:
    """Give adapter ``name`` a nonzero B (a fresh adapter computes the base exactly)."""
    generator = torch.Generator().manual_seed(seed)
    slot = adapters.info(name).slot
    with torch.no_grad():
        for module in adapters.modules.values():
            rank = adapters.info(name).rank
            module.lora_B[slot, :, :rank].copy_(torch.randn(module.out_features, rank, generator=generator) * std)


def naive_forward(model: nn.Module, adapters, name: str, ids: torch.Tensor) -> torch.Tensor:
    """The model with each LoRA linear replaced by a plain function of the adapter's own tensors:
    ``x W^T + (alpha / r) (x A^T) B^T``."""
    info, state = adapters.info(name), adapters.state(name)
    saved = {}
    for module_name, module in adapters.modules.items():
        lora_A, lora_B = state.get(f"{module_name}.lora_A"), state.get(f"{module_name}.lora_B")

        def forward(x, module=module, lora_A=lora_A, lora_B=lora_B):
            out = x @ module.weight.T
            return out if lora_A is None else out + info.scale * ((x @ lora_A.T) @ lora_B.T)

        saved[module_name] = module.forward
        module.forward = forward
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        for module_name, module in adapters.modules.items():
            module.forward = saved[module_name]


# ----------------------------------------------------------------------------- attaching


def test_default_targets_cover_attention_and_ffn_and_only_q_o_in_the_kv_shared_segment():
    model = tiny_model()
    config = model.config
    adapters = attach_lora(model, rank=4)
    first, second = config.kv_share_segments
    want = {f"layers.{i}.attn.{p}" for i in range(config.n_layers) for p in ("q_proj", "o_proj")}
    want |= {f"layers.{i}.attn.{p}" for i in range(first) for p in ("k_proj", "v_proj")}
    want |= {f"layers.{i}.ffn.{p}" for i in range(config.n_layers) for p in ("w_gate", "w_up", "w_down")}
    assert set(adapters.modules) == want and len(want) == 7 * first + 5 * second
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{f}" for m in want for f in ("lora_A", "lora_B")}
    # base tensors keep their names; LoRA factors are added beside them
    assert "layers.0.attn.q_proj.weight" in model.state_dict()
    assert adapters_of(model) is adapters


def test_a_fresh_adapter_computes_the_base_and_a_trained_one_the_naive_formula():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        base = model(ids)
    adapters = attach_lora(model, rank=8, alpha=6.0, slots=2)
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B = 0
    adapters.add("small", rank=3, alpha=5.0, seed=3)  # a lower rank than the slot: zero padding
    for name in ("default", "small"):
        randomize_adapter(adapters, name)
        adapters.set_adapter(name)
        with torch.no_grad():
            got = model(ids)
        torch.testing.assert_close(got, naive_forward(model, adapters, name, ids), rtol=1e-4, atol=1e-4)
        assert (got - base).abs().max() > 1e-2
    adapters.set_adapter(None)
    with torch.no_grad():
        assert torch.equal(model(ids), base)


VISION = {  # preset -> (image side, what encodes images: the tower, or the VL model's encoder + adapter)
    "vit_base_patch16_tiny": (64, lambda model, images: model(images)),
    "vitdet_large_patch16_rw_tiny": (112, lambda model, images: model(images)),
    "clip_tiny": (64, lambda model, images: model.visual(images)),
    "afm_vl_tiny": (96, lambda model, images: model.encode_images(images, "balanced")),
}


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_towers_and_the_vl_adapter_take_lora(name):
    size, encode = VISION[name]
    torch.manual_seed(0)
    model = mmafm.create_model(name).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        base = encode(model, images)
    adapters = attach_lora(model, rank=4, alpha=8.0)
    assert all(m.endswith(("qkv", "proj", "fc1", "fc2", "w_gate", "w_up", "w_down")) for m in adapters.modules)
    assert any(m.endswith("attn.qkv") for m in adapters.modules) and any(m.endswith("mlp.fc2") for m in adapters.modules)
    if name == "afm_vl_tiny":  # the vision tower, the VL adapter's transformer layer and the decoder
        assert {m.split(".")[0] for m in adapters.modules} == {"vision", "adapter", "text"}
        assert {"adapter.block.attn.qkv", "adapter.block.mlp.fc1"} <= set(adapters.modules)
    randomize_adapter(adapters, "default")
    model.train()
    out = encode(model, images)
    assert (out - base).abs().max() > 1e-3  # the adapters run
    out.float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)


def test_target_patterns_globs_and_errors():
    model = tiny_model()
    names = target_modules(model, ["layers.[0-1].attn.q_proj", "w_down"])  # a glob and a suffix
    assert set(names) == {"layers.0.attn.q_proj", "layers.1.attn.q_proj"} | {
        f"layers.{i}.ffn.w_down" for i in range(model.config.n_layers)}
    with pytest.raises(ValueError, match="match no linear"):
        target_modules(model, ["attn.nothing"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        target_modules(model, ["layers.0.attn_norm"])
    attach_lora(model, rank=2)
    with pytest.raises(ValueError, match="already carries LoRA"):
        attach_lora(model, rank=2)


# ----------------------------------------------------------------------------- slots and batches


def three_adapters(slots: int = 3):
    model = tiny_model()
    adapters = attach_lora(model, rank=8, alpha=16.0, slots=slots, name="a")
    adapters.add("b", rank=4, alpha=3.0, seed=1)
    adapters.add("c", rank=8, alpha=5.0, seed=2, targets=["attn.q_proj", "attn.o_proj"])
    for index, name in enumerate(("a", "b", "c")):
        randomize_adapter(adapters, name, seed=index)
    return model, adapters


def test_a_mixed_batch_equals_each_row_under_its_own_adapter():
    model, adapters = three_adapters()
    ids = torch.randint(0, model.config.vocab_size, (6, 10))
    rows = ["a", "c", None, "b", "a", "c"]
    singles = {}
    with torch.no_grad():
        for name in ("a", "b", "c", None):
            adapters.set_adapter(name)
            singles[name] = model(ids)
        with adapters.mixed(rows) as row_ids:
            mixed = model(ids)
        assert row_ids.tolist() == [adapters.info(r).slot if r else -1 for r in rows]
        with adapters.mixed(row_ids):  # slot ids work too
            again = model(ids)
        # a few tokens per row (a decode step) take the slot-major path: all slots, masked
        with adapters.mixed(rows):
            short = model(ids[:, :2])
    assert adapters.routing.mode == "off"  # restored after the block
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], singles[name][row], rtol=1e-4, atol=1e-4)  # logits ~10
        torch.testing.assert_close(short[row], singles[name][row, :2], rtol=1e-4, atol=1e-4)
    assert torch.equal(mixed, again)
    with pytest.raises(ValueError, match="name no loaded adapter"):
        with adapters.mixed(torch.tensor([0, 7])):
            pass
    with pytest.raises(ValueError, match="batch rows as the leading dimension"), torch.no_grad():
        with adapters.mixed(["a", "b"]):
            model(ids)


def test_both_mixed_strategies_and_their_switch_equal_the_naive_per_row_formula(monkeypatch):
    """Slot-major (all slots' factors in two dense GEMMs, masked per row) and gathered (each row's
    factors, batched matmuls) against ``x W^T + b + s_k (x A_k^T) B_k^T`` row by row, on short
    and long rows, with a base-only row, an adapter below the slot rank and a bias; the switch
    (SLOT_MAJOR_WORK) forced both ways; and autograd through the gathered path."""
    torch.manual_seed(0)
    routing = AdapterRouting()
    module = LoRALinear(nn.Linear(12, 20, bias=True), routing, slots=3, rank=4)
    with torch.no_grad():
        module.lora_A.normal_()
        module.lora_B.normal_()
        module.lora_A[1, 2:].zero_()  # slot 1 holds a rank-2 adapter
        module.lora_B[1, :, 2:].zero_()
        module.scaling.copy_(torch.tensor([0.5, 2.0, 0.25]))
    row_ids = torch.tensor([2, -1, 0, 1, 2])

    def naive(x):  # (B, T, 12) -> (B, T, 20)
        rows = []
        for b, k in enumerate(row_ids.tolist()):
            y = x[b] @ module.weight.T + module.bias
            if k >= 0:
                y = y + module.scaling[k] * (x[b] @ module.lora_A[k].T) @ module.lora_B[k].T
            rows.append(y)
        return torch.stack(rows)

    routing.mode, routing.row_ids = "mixed", row_ids
    for tokens in (1, 3, 9):
        x = torch.randn(5, tokens, 12)
        with torch.no_grad():
            want = naive(x)
            base = lambda: torch.nn.functional.linear(x, module.weight, module.bias)  # noqa: E731
            torch.testing.assert_close(module._mixed_slot_major(x, row_ids, base()), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(module._mixed(x, row_ids, base()), want, rtol=1e-5, atol=1e-5)
            for work in (0, 10**6):  # forward picks gathered, then slot-major
                monkeypatch.setattr(lora_layer, "SLOT_MAJOR_WORK", work)
                torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)
        # with autograd (training on a mixed batch): the gathered path, gradients as the naive
        monkeypatch.setattr(lora_layer, "SLOT_MAJOR_WORK", 10**6)
        got = module(x)
        grads = torch.autograd.grad(got.square().sum(), (module.lora_A, module.lora_B))
        wants = torch.autograd.grad(naive(x).square().sum(), (module.lora_A, module.lora_B))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, wants):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    routing.mode, routing.row_ids = "off", None


def test_slots_fill_up_and_free():
    model, adapters = three_adapters()
    with pytest.raises(RuntimeError, match="all 3 adapter slots are taken"):
        adapters.add("d")
    adapters.remove("b")
    assert adapters.add("d").slot == 1 and adapters.names() == ["a", "d", "c"]
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        adapters.set_adapter("b")


def test_merge_and_unmerge_are_exact_to_float_tolerance():
    model, adapters = three_adapters()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    weights = {name: module.weight.detach().clone() for name, module in adapters.modules.items()}
    with torch.no_grad():
        adapters.set_adapter(None)
        base = model(ids)
        adapters.set_adapter("b")
        unmerged = model(ids)
        adapters.merge()
        assert adapters.routing.mode == "merged"
        merged = model(ids)
        with pytest.raises(RuntimeError, match="merged into the base"):
            adapters.set_adapter("a")
        adapters.unmerge()
        after = model(ids)
        adapters.set_adapter(None)
        restored = model(ids)
    tolerance = 1e-5 * float(unmerged.abs().max())  # float32 rounding through 8 random layers
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tolerance)
    torch.testing.assert_close(after, unmerged, rtol=0, atol=tolerance)
    torch.testing.assert_close(restored, base, rtol=0, atol=tolerance)
    for name, module in adapters.modules.items():
        torch.testing.assert_close(module.weight, weights[name], rtol=0, atol=1e-6)


def test_set_adapter_and_hot_swap_do_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, adapters = three_adapters()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    eager = {}
    with torch.no_grad():
        for name in ("a", "b", "c"):
            adapters.set_adapter(name)
            eager[name] = model(ids)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        adapters.set_adapter("a")
        torch.testing.assert_close(compiled(ids), eager["a"], rtol=1e-5, atol=1e-5)
        frames = counter.frame_count
        assert frames >= 1
        for name in ("b", "c", "a", "b"):
            adapters.set_adapter(name)
            torch.testing.assert_close(compiled(ids), eager[name], rtol=1e-5, atol=1e-5)
        # a hot swap from a file into the active adapter's slot: a copy into the same buffers
        adapters.save(tmp_path / "c", "c")
        adapters.load(tmp_path / "c", "b")
        torch.testing.assert_close(compiled(ids), eager["c"], rtol=1e-5, atol=1e-5)
    assert counter.frame_count == frames, "switching adapters recompiled the model"
    torch._dynamo.reset()


def test_training_moves_only_the_adapter():
    model = tiny_model()
    adapters = attach_lora(model, rank=4, alpha=8.0, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    model.train()
    losses = []
    for _ in range(5):
        loss, _ = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(param, before[name]) or name.endswith("lora_A"), name
        else:
            assert torch.equal(param, before[name]), f"base tensor {name} moved"


def test_detach_puts_plain_linears_back():
    model, adapters = three_adapters()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    plain = tiny_model()
    adapters.merge("a")
    restored = adapters.detach()
    assert restored is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="carries no LoRA"):
        adapters_of(model)


# ----------------------------------------------------------------------------- files


def test_adapter_files_round_trip_and_name_their_base(tmp_path):
    model, adapters = three_adapters()
    path = adapters.save(tmp_path / "b", "b", metadata={"feature": "test"})
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["format"] == "mmafm-lora" and record["rank"] == 4 and record["alpha"] == 3.0
    assert record["targets"] == list(adapters.targets) and record["metadata"]["feature"] == "test"
    assert record["base"]["preset"] == "afm_2025_device_tiny" and len(record["base"]["weights_sha256"]) == 64
    assert record["parameters"] == adapters.num_parameters("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.safetensors"]  # no temp files left

    other_model = tiny_model()  # the same base, weights equal: same fingerprint
    other = attach_lora(other_model, rank=8, slots=2, name=None)
    info = other.load(path)
    assert info.name == "b" and info.rank == 4 and info.alpha == 3.0
    for key, tensor in adapters.state("b").items():
        assert torch.equal(other.state("b")[key], tensor)
    # c covers Q and O only: its file holds those modules, loaded modules elsewhere stay zero
    other.load(adapters.save(tmp_path / "c", "c"))
    assert set(other.info("c").modules) == {m for m in adapters.modules if m.endswith(("q_proj", "o_proj"))}
    ids = torch.randint(0, other_model.config.vocab_size, (2, 7))
    for name in ("b", "c"):
        adapters.set_adapter(name)
        other.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(other_model(ids), model(ids))

    # 16-bit adapters, as shipped
    half = adapters.save(tmp_path / "b16", "b", dtype=torch.bfloat16)
    assert json.loads(half.with_suffix(".json").read_text())["dtype"] == "bfloat16"
    assert half.stat().st_size < path.stat().st_size * 0.6


def test_loading_onto_another_base_is_refused(tmp_path):
    model, adapters = three_adapters()
    path = adapters.save(tmp_path / "a", "a")
    stranger = attach_lora(tiny_model(seed=5), rank=8, name=None)  # same preset, other weights
    with pytest.raises(BaseMismatchError, match="trained on base preset 'afm_2025_device_tiny'.*sha256"):
        stranger.load(path)
    assert stranger.load(path, check_base=False).name == "a"
    other_preset = attach_lora(tiny_model(name="afm_2024_device_tiny"), rank=8, name=None)
    with pytest.raises(BaseMismatchError, match="this model is preset 'afm_2024_device_tiny'"):
        other_preset.load(path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(AdapterFileError, match="corrupt adapter tensors"):
        adapters.load(path)
    with pytest.raises(AdapterFileError, match="not found"):
        adapters.load(tmp_path / "missing")


def test_the_fingerprint_is_taken_once_and_matches_a_bf16_copy():
    from mmafm.lora import base_fingerprint

    model, adapters = three_adapters()
    reference = adapters.fingerprint()
    assert reference == base_fingerprint(tiny_model())
    adapters.merge("a")
    assert base_fingerprint(model) != reference  # merged weights are another base ...
    assert adapters.fingerprint() == reference  # ... but the handle keeps the one it attached to
    adapters.unmerge()
    bf16 = tiny_model().to(torch.bfloat16)
    assert base_fingerprint(bf16)["weights_sha256"] == reference["weights_sha256"]


# ----------------------------------------------------------------------------- decoding


PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]


@needs_native
def test_decode_with_an_adapter_runs_in_the_kernels_and_equals_the_torch_path():
    model, adapters = three_adapters()
    adapters.set_adapter("a")
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        model(torch.tensor([p[:3] for p in PROMPTS]), cache=cache)
        assert build_plan(model, cache).whole_step
    fast = generate(model, PROMPTS, 10)
    with kernels_disabled():
        assert generate(model, PROMPTS, 10) == fast
    assert fast == [reference_greedy(model, p, 10) for p in PROMPTS]
    adapters.set_adapter(None)
    assert generate(model, PROMPTS, 10) != fast  # the adapter matters
    # per-layer kernels read the merged weights too
    adapters.set_adapter("c")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        model(ids[:, :4], cache=cache)
        plan = build_plan(model, cache, whole_step=False)
        assert not plan.module_layers
        got = torch.stack([plan.step(ids[:, t]) for t in range(4, 12)], dim=1)
        want = model(ids)[:, 4:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


MIXED_ROWS = ["b", None, "a", "c"]  # c adapts Q and O only; None = the base alone


def prefilled(model, adapters, rows, ids: torch.Tensor, prompt: int):
    """A cache holding ``ids[:, :prompt]`` (the module path) and the plan built on it, under
    ``rows`` (a mixed batch, or one adapter name / None for every row)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    model(ids[:, :prompt], cache=cache)
    return cache, build_plan(model, cache)


def decode_rest(plan, ids: torch.Tensor, prompt: int) -> torch.Tensor:  # (B, T - prompt, V)
    return torch.stack([plan.step(ids[:, t]) for t in range(prompt, ids.shape[1])], dim=1)


@needs_native
def test_a_mixed_batch_decodes_in_the_whole_step_kernel_like_the_module_path():
    """The native step with per-row adapters (csrc/lora.c) against the module path (slot-major
    LoRA in torch) and a float64 forward, step by step, on afm_2025_device_tiny: adapters on
    q/k/v/o/gate/up/down (Q and O only in the KV-shared segment), one on Q/O only, one of lower
    rank, a row without adapter; that row bit-identical to the plain step of the bare base."""
    model, adapters = three_adapters()
    ids = torch.randint(0, model.config.vocab_size, (4, 14))
    with torch.no_grad():
        with adapters.mixed(MIXED_ROWS):
            cache, plan = prefilled(model, adapters, MIXED_ROWS, ids, 4)
            assert plan.whole_step and plan.mixed_adapters and "per-row LoRA" in plan.describe()
            got = decode_rest(plan, ids, 4)
            want = model(ids)[:, 4:]
        adapters.set_adapter(None)
        reference = model.double()(ids)[:, 4:]  # every row as the base
        model.float()
        _, bare_plan = prefilled(model, adapters, None, ids, 4)
        assert bare_plan.whole_step and not bare_plan.mixed_adapters
        bare = decode_rest(bare_plan, ids, 4)
        with adapters.mixed(MIXED_ROWS):
            mixed64 = model.double()(ids)[:, 4:]
        model.float()
    scale = float(want.abs().max())  # logits ~10: 1e-5 relative to them (float32 summation order)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(got, mixed64.float(), rtol=0, atol=1e-5 * scale)
    assert torch.equal(got[1], bare[1])  # the base-only row: exactly the plain step
    for row in (0, 2, 3):  # and the adapters matter
        assert (got[row] - reference[row]).abs().max() > 100 * 1e-5 * scale


@needs_native
def test_a_mixed_batch_in_bfloat16_decodes_in_the_whole_step_kernel():
    """bfloat16 weights and cache: the native mixed step against the float32 module path on the
    same (bf16-rounded) weights, to the bf16 cache's rounding; the base-only row bit-identical
    to the bf16 plain step."""
    model, adapters = three_adapters()
    model.to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (4, 10))
    with torch.no_grad():
        with adapters.mixed(MIXED_ROWS):
            _, plan = prefilled(model, adapters, MIXED_ROWS, ids, 4)
            assert plan.whole_step and plan.mixed_adapters
            got = decode_rest(plan, ids, 4)
            want = model.float()(ids)[:, 4:]
        model.to(torch.bfloat16)
        adapters.set_adapter(None)
        _, bare_plan = prefilled(model, adapters, None, ids, 4)
        bare = decode_rest(bare_plan, ids, 4)
    tolerance = 0.03 * float(want.abs().max())  # the bf16 cache and prefill: ~0.2 on logits ~10
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    assert torch.equal(got[1], bare[1])
    for row in (0, 2, 3):  # the adapters matter far beyond the tolerance
        assert (got[row] - bare[row]).abs().max() > 5 * tolerance


@needs_native
def test_the_mixed_step_splits_large_adapters_over_threads_without_changing_a_bit():
    """Adapters large enough for the kernels' thread pool (8 slots x rank 16 x 1024 inputs):
    the same logits, bit for bit, on 1 and 3 threads, and equal to the module path."""
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=96, dim=1024, n_layers=1, n_heads=8,
                               n_kv_heads=2, head_dim=128, ffn_dim=1024, max_seq_len=32).eval()
    adapters = attach_lora(model, rank=16, alpha=16.0, slots=8, name=None)
    for index in range(8):
        adapters.add(f"n{index}", seed=index)
        randomize_adapter(adapters, f"n{index}", std=0.05, seed=index)
    rows = ["n7", None, "n0", "n3", "n7"]
    ids = torch.randint(0, 96, (5, 8))
    threads = torch.get_num_threads()
    got = {}
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            with torch.no_grad(), adapters.mixed(rows):
                _, plan = prefilled(model, adapters, rows, ids, 4)
                assert plan.mixed_adapters
                got[count] = decode_rest(plan, ids, 4)
                want = model(ids)[:, 4:]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[1], got[3])
    torch.testing.assert_close(got[1], want, rtol=0, atol=1e-5 * float(want.abs().max()))


@needs_native
def test_a_mixed_batch_generates_what_each_adapter_generates_alone():
    """Greedy generation of a mixed batch (left-padded prompts, a row without adapter) through
    the native step equals each row generated alone under its own adapter (the merged-weight
    step), and the no-cache argmax loop of the module path under the mixed routing; the chunked
    step (speculative verification) equals one step at a time."""
    model, adapters = three_adapters()
    prompts = PROMPTS + [[3, 1, 4, 1, 5], [7]]
    with adapters.mixed(MIXED_ROWS):
        mixed = generate(model, prompts, 8)
        with kernels_disabled():
            assert generate(model, prompts, 8) == mixed
    for row, name in enumerate(MIXED_ROWS):
        adapters.set_adapter(name)
        assert generate(model, [prompts[row]], 8)[0] == mixed[row]
    adapters.set_adapter(None)
    ids = torch.randint(0, model.config.vocab_size, (4, 12))
    with torch.no_grad(), adapters.mixed(MIXED_ROWS):
        _, plan = prefilled(model, adapters, MIXED_ROWS, ids, 4)
        stepped = decode_rest(plan, ids, 4)
        _, plan = prefilled(model, adapters, MIXED_ROWS, ids, 4)
        chunked = plan.chunk(ids[:, 4:])
        assert torch.equal(chunked, stepped)
        with pytest.raises(ValueError, match="outside"):
            plan._step.step(ids[:, 4], torch.zeros(4, dtype=torch.long), 4, adapter_rows=torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():  # leaving the mixed batch mid-call is refused, not computed wrongly
        with pytest.raises(RuntimeError, match="left its mixed batch"):
            plan.step(ids[:, 4])


# ----------------------------------------------------------------------------- sizes


def test_adapter_sizes_of_the_reports_match_the_closed_form():
    def per_layer(dim, q, kv, ffn, owns_kv=True):
        attention = 2 * (dim + q) + (2 * (dim + kv) if owns_kv else 0)
        return attention + 3 * (dim + ffn)

    size = adapter_size("afm_2024_device", 16)
    assert size["parameters"] == 16 * 26 * per_layer(3072, 24 * 128, 8 * 128, 8064) == 22_417_408
    assert round(size["megabytes"], 1) == 44.8 and size["modules"] == 26 * 7
    for rank in (8, 16, 32):
        size = adapter_size("afm_2025_device", rank)
        want = rank * (35 * per_layer(2048, 16 * 128, 2 * 128, 6656)
                       + 21 * per_layer(2048, 16 * 128, 2 * 128, 6656, owns_kv=False))
        assert size["parameters"] == want and size["bytes"] == 2 * want
    assert adapter_size("afm_2025_device", 32)["parameters"] == 66_633_728  # 133.3 MB at 16 bits


# ----------------------------------------------------------------------------- peft


def dense_model(seed: int = 0):
    torch.manual_seed(seed)
    model = mmafm.create_model(
        "afm_2024_device_tiny", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=96, max_seq_len=64, rope_theta=10000.0,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.3 * torch.randn_like(param) if name.endswith("norm.weight") else 0.2 * torch.randn_like(param))
    return model.eval()


def test_export_to_peft_gives_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from mmafm.interop.hf import to_hf
    from mmafm.lora.peft import to_peft

    model = dense_model()
    adapters = attach_lora(model, rank=3, alpha=5.0, slots=2, name="x")
    adapters.add("y", rank=2, alpha=7.0, targets=["attn.q_proj", "layers.1.ffn.w_up"], seed=4)
    randomize_adapter(adapters, "x")
    randomize_adapter(adapters, "y", seed=3)
    ids = torch.randint(0, 96, (2, 13))
    for name in ("x", "y"):
        adapters.set_adapter(name)
        with torch.no_grad():
            ours = model(ids)
        folder = to_peft(adapters, tmp_path / name, name)
        peft_model = peft.PeftModel.from_pretrained(to_hf(model), str(folder)).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "y" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 7.0
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                                "model.layers.1.self_attn.q_proj"]


@needs_native
def test_a_mixed_batch_decoded_natively_equals_peft_mixed_batch(tmp_path):
    """The native mixed-adapter step on the dense 2024 architecture against peft's own mixed
    batch (``adapter_names=``) on the exported model, position by position, to 1e-5: an adapter
    on all seven projections, one on two of them with another rank, a base-only row."""
    peft = pytest.importorskip("peft")
    from mmafm.interop.hf import to_hf
    from mmafm.lora.peft import to_peft

    model = dense_model()
    adapters = attach_lora(model, rank=3, alpha=5.0, slots=3, name="x")
    adapters.add("y", rank=2, alpha=7.0, targets=["attn.q_proj", "layers.1.ffn.w_up"], seed=4)
    randomize_adapter(adapters, "x")
    randomize_adapter(adapters, "y", seed=3)
    peft_model = peft.PeftModel.from_pretrained(to_hf(model), str(to_peft(adapters, tmp_path / "x", "x")),
                                                adapter_name="x").eval()
    peft_model.load_adapter(str(to_peft(adapters, tmp_path / "y", "y")), adapter_name="y")
    rows = ["y", None, "x", "y"]
    ids = torch.randint(0, 96, (4, 14))
    with torch.no_grad():
        with adapters.mixed(rows):
            _, plan = prefilled(model, adapters, rows, ids, 4)
            assert plan.mixed_adapters
            ours = decode_rest(plan, ids, 4)
        theirs = peft_model(input_ids=ids, adapter_names=["__base__" if r is None else r for r in rows]).logits
    torch.testing.assert_close(ours, theirs[:, 4:], rtol=0, atol=1e-5)


def test_a_lora_trained_with_peft_imports_back(tmp_path):
    peft = pytest.importorskip("peft")
    from mmafm.interop.hf import InteropError, to_hf
    from mmafm.lora.peft import from_peft

    model = dense_model()
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(to_hf(model), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], use_rslora=True))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 96, (4, 16))
    for _ in range(3):  # peft trains it: B leaves zero
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "trained"))

    adapters = attach_lora(model, rank=4, name=None, slots=2)
    for source, name in ((peft_model, "live"), (tmp_path / "trained", "folder")):
        info = from_peft(adapters, source, name=name)
        assert info.rank == 4 and len(info.modules) == 2 * 4
        adapters.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), theirs, rtol=0, atol=1e-5)

    config_path = tmp_path / "trained" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(InteropError, match="DoRA"):
        from_peft(adapters, tmp_path / "trained", name="dora")
    with pytest.raises(InteropError, match="dense"):
        from_peft(attach_lora(tiny_model(), rank=4), tmp_path / "trained")
