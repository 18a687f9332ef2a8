"""The opt-in int8-activation path of the packed decode (csrc/q8.c) against NumPy / torch
references of the same math, and against the exact float path it approximates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmafm
from mmafm.compress import compress_model, dequantized_copy, set_act_dtype
from mmafm.compress.packed import Packed, PackedLinear, pack_codes, unpack_codes
from mmafm.inference import kernels

pytestmark = pytest.mark.skipif(not kernels.kernels_available(), reason="native kernels unavailable")


def q8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (N, in) -> (N, in) int8, (N, blocks) float32
    """Q8_0 in NumPy: per block of 32 columns d = max|x| / 127 (float32), q = x * (1 / d) in
    float32 rounded to nearest, ties to even (the C ``rintf``)."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    blocks = -(-cols // 32)
    q = np.zeros((rows, cols), dtype=np.int8)
    d = np.zeros((rows, blocks), dtype=np.float32)
    for k in range(blocks):
        part = x[:, 32 * k: 32 * (k + 1)]
        dk = np.abs(part).max(1) / np.float32(127)  # (N,) float32
        inverse = np.where(dk != 0, np.float32(1) / np.where(dk != 0, dk, 1), 0).astype(np.float32)
        scaled = part * inverse[:, None]  # float32, as the C multiplies
        q[:, 32 * k: 32 * (k + 1)] = np.rint(scaled)
        d[:, k] = dk
    return q, d


def q8_gemv_reference(x, codes, qtable, qaffine, group_rows, row_scale=None) -> tuple[np.ndarray, np.ndarray]:
    """y = (dequantized Q8_0 x) @ (weight through the int8 tables)^T in float64, and a bound on
    float32 rounding: the magnitude of the two terms the kernel adds, (offset + step u) d q."""
    q, d = q8_reference(x)
    cols = codes.shape[1]
    x_hat = q.astype(np.float64) * np.repeat(d.astype(np.float64), 32, axis=1)[:, :cols]  # (N, in)
    groups = np.arange(codes.shape[0]) // group_rows
    affine = np.asarray(qaffine, dtype=np.float64)
    u = np.asarray(qtable)[groups[:, None], codes].astype(np.float64)  # (out, in)
    scale = np.ones(codes.shape[0]) if row_scale is None else np.asarray(row_scale, dtype=np.float64)
    varying = (affine[groups, 1:2] * u) @ x_hat.T  # (out, N): step * S1
    constant = affine[groups, 0:1] * x_hat.sum(1)[None]  # (out, N): offset * S0
    y = (scale[:, None] * (varying + constant)).T
    bound = (np.abs(scale)[:, None] * (np.abs(varying) + np.abs(constant))).T
    return y, bound


def test_q8_quantize_equals_numpy():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, generator=generator) * torch.tensor([1.0, 1e-3, 50.0])[:, None]
    x[1, 32:64] = 0  # an all-zero block: d = 0, q = 0
    x[2, 5] = -2 * x[2, :32].abs().max()  # the block's largest magnitude: q = -127
    q, d = kernels.q8_quantize(x)
    q_ref, d_ref = q8_reference(x.numpy())
    assert np.array_equal(q.numpy(), q_ref) and np.array_equal(d.numpy(), d_ref)
    assert int(q[1, 32:64].abs().max()) == 0 and float(d[1, 1]) == 0.0
    assert int(q.abs().max()) == 127


def test_int8_tables_within_half_a_step():
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(50, 16, generator=generator)
    table[3] = 0.25  # a constant table: exact
    codes, affine = kernels.int8_tables(table)
    rebuilt = affine[:, :1] + affine[:, 1:] * codes.float()
    assert (rebuilt - table).abs().le(affine[:, 1:] / 2 + 1e-6).all()
    assert torch.equal(rebuilt[3], table[3]) and codes.min() == 0 and int(codes.max()) == 255
    assert torch.allclose(rebuilt.amin(1), table.amin(1)) and torch.allclose(rebuilt.amax(1), table.amax(1), atol=1e-6)
    table[7, 2], table[7, 9] = float("inf"), float("-inf")  # entries no code reads
    finite = table[7][torch.isfinite(table[7])]
    codes, affine = kernels.int8_tables(table)
    assert torch.isfinite(affine).all() and float(affine[7, 0]) == float(finite.min())
    assert int(codes[7, 2]) == 255 and int(codes[7, 9]) == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_q8_gemv_equals_the_reference_of_the_same_math(bits):
    """Whole 64-column spans (vector path), a tail of < 64 columns and a partial block (scalar),
    tables per 16 rows, per row and one for all rows (the uniform scheme's grid), a row scale,
    1-8 rows, one and two threads. 8 bits: the kernel reads the codes mapped to their u8 values
    (kernels.int8_codes), the reference looks them up in the tables."""
    generator = torch.Generator().manual_seed(bits)
    shapes = [(96, 64, 16), (50, 37, 16), (40, 256, 1), (33, 200, 16), (600, 576, 16), (70, 128, 70)]  # last: one table
    for out, cols, group_rows in shapes:
        codes = torch.randint(0, 1 << bits, (out, cols), generator=generator)
        table = torch.randn(-(-out // group_rows), 1 << bits, generator=generator)
        qtable, qaffine = kernels.int8_tables(table)
        for batch, threads, scaled in [(1, 1, False), (3, 2, True), (8, 1, False), (1, 2, True)]:
            row_scale = torch.rand(out, generator=generator) + 0.5 if scaled else None
            x = torch.randn(batch, cols, generator=generator)
            packed = kernels.int8_codes(codes, qtable, group_rows) if bits == 8 else pack_codes(codes, bits)
            y = kernels.q8_linear(x, packed, qtable, qaffine, bits, group_rows, row_scale, threads)
            reference, bound = q8_gemv_reference(x.numpy(), codes.numpy(), qtable.numpy(), qaffine.numpy(), group_rows,
                                                 None if row_scale is None else row_scale.numpy())
            error = np.abs(y.numpy() - reference)
            assert (error <= 1e-5 * bound + 1e-6).all(), (bits, out, cols, batch, error.max())


def _int8_weight(module) -> torch.Tensor:  # (out, in) float32
    """A packed matrix's weight as the int8 path reads it: through int8_tables (any bit width)."""
    codes, table, bits, group_rows, row_scale = module.lut_operands()
    qtable, qaffine = kernels.int8_tables(table)
    groups = torch.arange(module.rows) // group_rows
    unpacked = unpack_codes(codes, bits, module.cols)  # (out, in)
    weight = qaffine[groups, :1] + qaffine[groups, 1:] * qtable[groups[:, None], unpacked].float()  # (out, in)
    return weight if row_scale is None else weight * row_scale[:, None]


def _q8_input(x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., in): x through the Q8_0 reference
    rows = x.reshape(-1, x.shape[-1]).numpy()
    q, d = q8_reference(rows)
    return torch.from_numpy(q.astype(np.float32) * np.repeat(d, 32, axis=1)[:, : x.shape[-1]]).reshape(x.shape)


def _q8_reference_copy(model: nn.Module) -> tuple[nn.Module, dict]:
    """The dequantized model with every packed linear (2, 4 or 8 bits) and the packed tied head
    replaced by the int8 math in torch (the weight read through int8_tables, the input through
    the Q8_0 reference), and the switch of that math: ``{"on": False}`` = the exact dequantized
    model (prefill, as our model's prefill runs the float modules)."""
    reference, switch = dequantized_copy(model), {"on": False}
    if isinstance(model.embed, Packed) and model.config.tie_embeddings:
        head, plain = _int8_weight(model.embed), reference.logits

        def logits(hidden):  # the head of the int8 path; the input embedding stays the float table
            return torch.nn.functional.linear(_q8_input(hidden), head).float() if switch["on"] else plain(hidden)

        reference.logits = logits
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        weight = _int8_weight(module)
        linear = reference.get_submodule(name)
        linear.register_buffer("int8_weight", weight)
        linear.register_buffer("float_weight", linear.weight.data.clone())

        def quantize_input(module, args):
            module.weight.data.copy_(module.int8_weight if switch["on"] else module.float_weight)
            if not switch["on"]:
                return None
            (x,) = args
            return (_q8_input(x),)

        linear.register_forward_pre_hook(quantize_input)
    return reference, switch


def _decode_both(model, reference, ids, start: int, switch: dict | None = None, resync: bool = False):
    """Teacher-forced decode from ``start``: (ours, theirs) logits per step; ours through the plan
    (``switch`` turned on after the prefill). ``resync``: before each step our cache's keys and
    values are overwritten with the reference's, so a step's difference is that step's own and
    does not carry over to later steps through the cache."""
    from mmafm.inference.plan import build_plan

    def step(plan, t):
        if resync:  # in place: the plan holds the cache tensors
            for ours, theirs in zip(caches[0].layers, caches[1].layers):
                if ours is not None:
                    ours.keys.copy_(theirs.keys)
                    ours.values.copy_(theirs.values)
        return plan.step(ids[:, t]), reference(ids[:, t: t + 1], cache=caches[1])[:, -1].float()

    with torch.no_grad():
        caches = [m.new_cache(ids.shape[0], ids.shape[1]) for m in (model, reference)]
        for m, cache in zip((model, reference), caches):
            m(ids[:, :start], cache=cache)
        if switch is not None:
            switch["on"] = True
        plan = build_plan(model, caches[0])
        pairs = [step(plan, t) for t in range(start, ids.shape[1])]
    return plan, pairs


@pytest.mark.parametrize("per_channel_scale", [False, True], ids=["plain", "row_scale"])
def test_int8_whole_step_equals_the_int8_reference_and_stays_near_the_float_path(per_channel_scale):
    """The packed step with int8 activations against (a) the same math in torch through the module
    path, tightly, and (b) the exact float path: relative logit error and greedy agreement."""
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=256).eval()
    compress_model(model, bits={"layers.0.ffn.w_up": 2}, default_bits=4, embedding_bits=8,
                   per_channel_scale=per_channel_scale)
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    _, float_pairs = _decode_both(model, dequantized_copy(model), ids, 8)
    reference, switch = _q8_reference_copy(model)
    assert set_act_dtype(model, "int8") > 0
    plan, pairs = _decode_both(model, reference, ids, 8, switch)
    assert plan.whole_step and "int8 activations" in plan.describe(), plan.describe()
    # (a) the same math, float32 summation order apart; except that an activation within ~1e-7 of a
    # rounding boundary may round the other way here than there (its inputs come out of C and of
    # torch with float32 differences), a one-level step on one activation: rare and small (the
    # 8-bit head quantizes one more input per step, the final norm's output: 4 of 32 steps here).
    # Compared step by step from the reference's cache: a flip in a key or value would otherwise
    # stay in our cache and move every later step a little (it did from step 10 on in a build
    # without AVX, 2.6e-3 to 4.8e-3 each)
    reference, switch = _q8_reference_copy(model)  # a new one: its switch is off for the prefill
    _, step_pairs = _decode_both(model, reference, ids, 8, switch, resync=True)
    errors = torch.tensor([float((ours - theirs).abs().max()) for ours, theirs in step_pairs])
    assert float((errors <= 1e-4).float().mean()) >= 0.8 and float(errors.max()) < 5e-3, errors
    ours = torch.stack([p[0] for p in pairs])  # (T, B, V)
    exact = torch.stack([p[0] for p in float_pairs])
    relative = float((ours - exact).norm() / exact.norm())
    agreement = float((ours.argmax(-1) == exact.argmax(-1)).float().mean())
    assert relative < 0.05 and agreement >= 0.8, (relative, agreement)  # (b) measured: see docs/compression.md
    set_act_dtype(model, "float32")
    with torch.no_grad():
        cache = model.new_cache(1, 4)
        model(ids[:1, :2], cache=cache)
        from mmafm.inference.plan import build_plan

        assert "int8" not in build_plan(model, cache).describe()
    with pytest.raises(ValueError, match="act_dtype must be one of"):
        set_act_dtype(model, "int4")


def test_the_int8_operands_are_made_once_per_weight(monkeypatch):
    """Building a plan maps 8-bit codes to their u8 values (kernels.int8_codes); a second plan of
    the same weights reuses them, and weights changed in place are mapped again."""
    from mmafm.inference.plan import build_plan

    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=256).eval()
    compress_model(model, bits=8, embedding_bits=8)
    set_act_dtype(model, "int8")
    calls = []
    original = kernels.int8_codes
    monkeypatch.setattr(kernels, "int8_codes", lambda *args: calls.append(1) or original(*args))
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(1))

    def logits():
        with torch.no_grad():
            cache = model.new_cache(1, 8)
            plan = build_plan(model, cache)
            assert plan.whole_step and "int8 activations" in plan.describe()
            plan.chunk(ids[:, :5])
            return plan.step(ids[:, 5])

    first = logits()
    made = len(calls)
    assert made > 0
    assert torch.equal(logits(), first) and len(calls) == made  # reused
    linear = model.layers[0].ffn.w_up
    with torch.no_grad():
        linear.codes[:, :8] = linear.codes[:, 8:16].clone()  # in place: the tensor's version moves on
    changed = logits()
    assert len(calls) == made + 1 and not torch.equal(changed, first)


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float"])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_chunk_equals_one_token_steps(int8, batch):
    """The packed step's chunk (``mmafm_lut_decode_chunk_f32``: several tokens per cache row in one
    call, each matrix read once for all of them) gives every token the logits and K/V of feeding
    the tokens one step at a time, bit for bit, across calls (11 tokens: 8 + 3 per row at batch 1,
    2 per call at batch 3), and refuses a chunk with no room in the cache."""
    from mmafm.inference.plan import build_plan

    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=256).eval()
    compress_model(model, bits={"layers.0.ffn.w_up": 2, "layers.1.attn.q_proj": 8}, default_bits=4, embedding_bits=8)
    set_act_dtype(model, "int8" if int8 else "float32")
    ids = torch.randint(1, 256, (batch, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        caches = [model.new_cache(batch, 16) for _ in range(2)]
        plans = [build_plan(model, cache) for cache in caches]
        assert all(plan.whole_step and "packed" in plan.describe() for plan in plans)
        for plan in plans:
            plan.chunk(ids[:, :3])  # a shared start
        chunked = plans[0].chunk(ids[:, 3:14])  # (B, 11, V)
        stepped = torch.stack([plans[1].step(ids[:, t]) for t in range(3, 14)], 1)
    assert torch.equal(chunked, stepped)
    for ours, theirs in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(ours.keys[:, :, :14], theirs.keys[:, :, :14])
        assert torch.equal(ours.values[:, :, :14], theirs.values[:, :, :14])
    with pytest.raises(ValueError, match="no room"):
        plans[0]._step.step.chunk(ids[:, :4], torch.arange(14, 18).expand(batch, 4).contiguous(), 14)
