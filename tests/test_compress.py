"""mmafm.compress against independent references: coremltools' palettizer, torchao PARQ's
balanced quantizer, closed-form bits per weight, the dequantized model's logits."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import mmafm
from mmafm.compress import (
    PackedLinear,
    bits_per_weight,
    closed_form_bpw,
    compress_model,
    convert_qat,
    dequantized_copy,
    fake_quantize,
    fit_lut,
    kmeans_1d,
    pack_codes,
    prepare_qat,
    unpack_codes,
)
from mmafm.compress.bits import closed_form_matrix_bits, matrix_bits, text_matrices
from mmafm.compress.kmeans import assign, kmeans_1d_exact
from mmafm.inference import kernels


def _sse(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (values[:, :, None] - centroids[:, None, :]).pow(2).min(-1).values.sum(1)


def test_exact_kmeans_matches_brute_force_on_small_groups():
    torch.manual_seed(0)
    values = torch.randn(3, 9, dtype=torch.float64)
    centroids = kmeans_1d_exact(values, 3)
    # every way to cut 9 sorted values into 3 contiguous runs
    for row, found in zip(values.sort(1).values, centroids):
        best = min(
            sum(((part - part.mean()) ** 2).sum().item() for part in (row[:i], row[i:j], row[j:]))
            for i in range(1, 8) for j in range(i + 1, 9)
        )
        assert _sse(row[None], found[None]).item() == pytest.approx(best, rel=1e-9)


def test_kmeans_centroids_stay_within_the_values_at_8_bits():
    """256 clusters on the summary of 16 x 1,536 values (an 8-bit table of a 1,536-wide linear):
    clusters made of near-empty summary cells once got centroids up to 1e287 (infinite in the
    fp16 table; found through SmolLM2's 8-bit LUTs)."""
    values = torch.randn(4, 24576, generator=torch.Generator().manual_seed(0)) * 0.05
    centroids = kmeans_1d(values, 256)
    low, high = values.double().amin(1, keepdim=True), values.double().amax(1, keepdim=True)
    assert ((centroids >= low) & (centroids <= high)).all()
    assert torch.isfinite(centroids.half()).all()
    # and still a good table: within 2% of the exact DP's SSE on a subsample it can solve
    small = values[:, :512]
    sse = lambda c: float(((small.double() - c.gather(1, assign(small.double(), c))) ** 2).sum())
    assert sse(kmeans_1d(small, 16, exact_max=0)) <= 1.02 * sse(kmeans_1d(small, 16))


def test_pack_unpack_round_trip():
    for bits in (2, 4, 8):
        codes = torch.randint(0, 1 << bits, (5, 13))
        packed = pack_codes(codes, bits)
        assert packed.shape == (5, math.ceil(13 * bits / 8)) and packed.dtype == torch.uint8
        assert torch.equal(unpack_codes(packed, bits, 13), codes)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.full((1, 4), 4), 2)


def _coreml_palettized(weight: torch.Tensor, bits: int, axis: int, per_channel_scale: bool = False) -> torch.Tensor:
    palettization = pytest.importorskip("coremltools.optimize.torch.palettization")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    linear = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    linear[0].weight.data.copy_(weight)
    config = palettization.PostTrainingPalettizerConfig.from_dict({"global_config": {
        "n_bits": bits, "granularity": "per_grouped_channel", "group_size": 16, "channel_axis": axis,
        "enable_per_channel_scale": per_channel_scale}})
    return palettization.PostTrainingPalettizer(linear, config).compress()[0].weight.detach()


@pytest.mark.parametrize("bits,shape,axis", [(4, (64, 32), 0), (2, (64, 32), 0), (4, (96, 128), 0),
                                             (4, (48, 96), 1), (2, (96, 160), 0)])
def test_lut_error_within_one_percent_of_coremltools(bits, shape, axis):
    torch.manual_seed(bits + shape[1])
    weight = torch.randn(shape) * 0.02
    weight[torch.rand(shape) < 0.01] *= 6  # heavy tails, as trained weights have
    codes, lut = fit_lut(weight, bits, 16, axis)
    assert lut.dtype == torch.float16 and lut.shape == (shape[axis] // 16, 1 << bits)
    group = (torch.arange(shape[0])[:, None] // 16) if axis == 0 else (torch.arange(shape[1])[None, :] // 16)
    ours = lut.float()[group.expand(shape), codes]
    theirs = _coreml_palettized(weight, bits, axis)
    assert theirs.unique().numel() <= (shape[axis] // 16) * (1 << bits)
    ours_error, theirs_error = ((ours - weight) ** 2).sum(), ((theirs - weight) ** 2).sum()
    assert ours_error <= 1.01 * theirs_error, (ours_error, theirs_error)


@pytest.mark.parametrize("bits,shape,axis", [(4, (64, 32), 0), (2, (64, 32), 0), (4, (96, 128), 0), (4, (48, 96), 1)])
def test_per_channel_scale_error_within_one_percent_of_coremltools(bits, shape, axis):
    """Rows of different ranges (as trained projections have) sharing tables, each divided by its
    max-abs first: against coremltools' palettizer with enable_per_channel_scale=True."""
    torch.manual_seed(bits + shape[1] + 1)
    weight = torch.randn(shape) * 0.02 * torch.exp(torch.randn(shape[0], 1))  # row ranges spread ~e^1
    weight[torch.rand(shape) < 0.01] *= 6
    codes, lut, row_scale = fit_lut(weight, bits, 16, axis, per_channel_scale=True)
    assert row_scale.dtype == torch.float16 and torch.equal(row_scale, weight.abs().amax(1).half())
    group = (torch.arange(shape[0])[:, None] // 16) if axis == 0 else (torch.arange(shape[1])[None, :] // 16)
    ours = lut.float()[group.expand(shape), codes] * row_scale.float()[:, None]
    theirs = _coreml_palettized(weight, bits, axis, per_channel_scale=True)
    ours_error, theirs_error = ((ours - weight) ** 2).sum(), ((theirs - weight) ** 2).sum()
    assert ours_error <= 1.01 * theirs_error, (ours_error, theirs_error)


def test_kmeans_large_groups_near_optimal():
    """Groups above EXACT_MAX take the binned DP start + Lloyd; compare with the exact DP."""
    torch.manual_seed(3)
    values = torch.randn(2, 1100, dtype=torch.float64) * torch.tensor([[1.0], [0.1]])
    exact, fast = kmeans_1d(values, 16, exact_max=4096), kmeans_1d(values, 16)
    assert (_sse(values, fast) <= 1.005 * _sse(values, exact)).all()


def test_ragged_groups_and_clear_errors():
    weight = torch.randn(40, 24)  # 16 + 16 + 8 rows
    codes, lut = fit_lut(weight, 4, 16, 0)
    assert lut.shape == (3, 16) and codes.shape == (40, 24)
    with pytest.raises(ValueError, match="bits must be one of"):
        fit_lut(weight, 3)
    with pytest.raises(ValueError, match="values per group"):
        fit_lut(torch.randn(2, 3), 4, 1, 0)
    with pytest.raises(ValueError, match="per_channel_scale is an option of the lut scheme"):
        PackedLinear(4, 4, 4, scheme="uniform", group_size=1, per_channel_scale=True)
    with pytest.raises(ValueError, match="row_scale must be given exactly"):
        PackedLinear(24, 40, 4, per_channel_scale=True).set_packed(codes, lut)


def _tiny(preset="afm_2024_device_tiny", **overrides):
    torch.manual_seed(0)
    return mmafm.create_model(preset, vocab_size=256, **overrides).eval()


def test_bits_per_weight_equals_the_closed_form():
    model = _tiny()
    compress_model(model, bits=4, embedding_bits=8)
    config = model.config
    assert bits_per_weight(model) == pytest.approx(closed_form_bpw(config, "lut", 4, 16, 8), rel=1e-12)
    assert bits_per_weight(model, include_embedding=False) == pytest.approx(
        closed_form_bpw(config, "lut", 4, 16, 8, include_embedding=False), rel=1e-12)
    # the LUT overhead term: b + 2^b / K for a matrix whose rows 16 divides
    assert closed_form_matrix_bits(96, 64, "lut", 4) / (96 * 64) == pytest.approx(4 + 16 / 64)
    assert closed_form_matrix_bits(96, 64, "uniform", 2) / (96 * 64) == pytest.approx(2 + 16 / 64)
    assert closed_form_matrix_bits(60, 120, "astc") == 200 * 128 + 64  # 3.5556 bpw + the range
    # the full-size 2024 device model at 4 bits: about 4 bpw on projections, ~3.5-3.7 mixed
    full = mmafm.get_config("afm_2024_device")
    assert 4.0 < closed_form_bpw(full, "lut", 4, 16, None, include_embedding=False) < 4.01
    assert sum(o * i for _, o, i in text_matrices(full)) == mmafm.create_model("afm_2024_device", device="meta").num_params() - sum(
        p.numel() for n, p in mmafm.create_model("afm_2024_device", device="meta").named_parameters() if p.dim() == 1)


def test_per_channel_scale_bits_per_weight_equals_the_closed_form():
    model = _tiny()
    compress_model(model, bits=4, embedding_bits=8, per_channel_scale=True)
    config = model.config
    expected = closed_form_bpw(config, "lut", 4, 16, 8, per_channel_scale=True)
    assert bits_per_weight(model) == pytest.approx(expected, rel=1e-12)
    # one fp16 scale per output row on top of the plain LUT: + 16 / cols bits per weight
    scaled = closed_form_matrix_bits(96, 64, "lut", 4, per_channel_scale=True)
    assert scaled / (96 * 64) == pytest.approx(4 + 16 / 64 + 16 / 64)
    assert closed_form_bpw(config, "lut", 4, 16, 8, per_channel_scale=True) > closed_form_bpw(config, "lut", 4, 16, 8)


@pytest.mark.parametrize("per_channel_scale", [False, True], ids=["plain", "row_scale"])
def test_packed_logits_equal_dequantized_logits(per_channel_scale):
    model = _tiny()
    compress_model(model, bits={"layers.0.ffn.w_up": 2, "layers.1.attn.q_proj": 8}, default_bits=4, embedding_bits=4,
                   per_channel_scale=per_channel_scale)
    assert model.layers[0].ffn.w_gate.per_channel_scale == per_channel_scale
    assert isinstance(model.layers[0].ffn.w_up, PackedLinear) and model.layers[0].ffn.w_up.bits == 2
    reference = dequantized_copy(model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
        # the native LUT GEMV path (a decode-sized input) against the dequantized matmul
        linear = model.layers[0].ffn.w_gate
        x = torch.randn(3, linear.in_features)
        y = linear(x)
        assert torch.allclose(y, x @ linear.dequantize().T, atol=1e-5, rtol=1e-5)
    if kernels.kernels_available():
        assert kernels.lut_linear(x, linear.codes, linear.table(), 4, 16) is not None


def test_generate_runs_on_a_packed_model():
    model = _tiny()
    compress_model(model, bits=4, embedding_bits=8)
    reference = dequantized_copy(model)
    from mmafm.inference.generate import generate

    from mmafm.inference.plan import build_plan

    with torch.no_grad():
        plan = build_plan(model, model.new_cache(1, 16))
        layered = build_plan(model, model.new_cache(1, 16), whole_step=False)
    if kernels.kernels_available():  # a packed whole step (csrc/lut.c); without it, the module path's LUT GEMVs
        assert plan.whole_step and "over packed weights" in plan.describe()
        assert "is packed (PackedLinear)" in layered.describe() and not layered.whole_step
    prompt = torch.randint(0, 256, (1, 5))
    ours = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    theirs = generate(reference, prompt, max_new_tokens=6, temperature=0.0)
    assert ours == theirs
    with kernels.kernels_disabled():
        assert generate(model, prompt, max_new_tokens=6, temperature=0.0) == theirs


def test_new_cache_of_a_packed_model_does_not_dequantize_the_embedding(monkeypatch):
    """A packed embedding's ``.weight`` dequantizes the whole table (0.4 s for SmolLM2's), which
    ``new_cache`` used to read for its dtype and device on every generate call."""
    from mmafm.compress.packed import Packed

    model = _tiny()
    compress_model(model, bits=4, embedding_bits=8)

    def refuse(self):
        raise AssertionError("dequantized the whole table")

    monkeypatch.setattr(Packed, "dequantize", refuse)
    cache = model.new_cache(2, 16)
    assert cache.dtype == torch.float32 and cache.device == model.norm.weight.device
    with pytest.raises(AssertionError, match="whole table"):
        model.embed.weight


def test_qat_levels_equal_torchao_parq_at_f_one():
    quantizer = pytest.importorskip("torchao.prototype.parq.quant").UnifQuantizer(
        scale_method="max", int_shift=0.5, zero_point=0.5)
    torch.manual_seed(1)
    weight = torch.randn(8, 40)
    for bits in (2, 4):
        ours = fake_quantize(weight, torch.ones(8), bits)
        theirs, levels = quantizer.quantize(weight, bits, dim=-1)
        assert torch.allclose(ours, theirs, atol=1e-6)
        grid = levels / levels.abs().amax(-1, keepdim=True) * (2 ** (bits - 1) - 0.5)
        assert torch.allclose(grid[0], torch.arange(1 << bits) - (2 ** bits - 1) / 2)
    assert sorted(set((fake_quantize(weight, torch.ones(8), 2) / weight.abs().amax(1, keepdim=True) * 1.5)
                      .round(decimals=4).flatten().tolist())) == [-1.5, -0.5, 0.5, 1.5]


def test_qat_gradients_reach_weights_and_clip_and_convert_packs():
    model = _tiny()
    names = prepare_qat(model, bits=2, embedding_bits=4)
    assert "embed" in names and len(names) == 1 + 7 * model.config.n_layers
    q_proj = model.layers[0].attn.q_proj
    init = q_proj.clip.detach().clone()
    assert ((init > 0.2) & (init <= 1.0)).all() and init.min() < 1.0  # the error search clips
    # the error search's f beats f = 1 (max-scaled)
    w = q_proj.latent.detach()
    assert ((fake_quantize(w, init, 2) - w) ** 2).sum() < ((fake_quantize(w, torch.ones_like(init), 2) - w) ** 2).sum()
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    loss, _ = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    assert q_proj.latent.grad is not None and q_proj.latent.grad.abs().sum() > 0
    assert q_proj.clip.grad is not None and q_proj.clip.grad.abs().sum() > 0
    assert model.embed.clip.grad is not None
    model.eval()
    with torch.no_grad():
        before = model(ids)
    convert_qat(model)
    with torch.no_grad():
        after = model(ids)
    assert isinstance(model.layers[0].attn.q_proj, PackedLinear) and model.layers[0].attn.q_proj.bits == 2
    assert torch.allclose(before, after, atol=5e-2)  # equal up to the fp16 rounding of the scales
    expected = closed_form_bpw(model.config, "uniform", 2, 1, 4)
    assert bits_per_weight(model) == pytest.approx(expected, rel=1e-12)


def test_per_channel_scale_checkpoint_round_trips(tmp_path):
    from mmafm.compress import load_compressed, save_compressed

    model = _tiny()
    compress_model(model, bits={"layers.0.ffn.w_up": 2}, default_bits=4, embedding_bits=8, per_channel_scale=True)
    path = save_compressed(tmp_path / "scaled", model)
    loaded = load_compressed(path)
    up = loaded.layers[0].ffn.w_up
    assert up.per_channel_scale and up.bits == 2 and torch.equal(up.row_scale, model.layers[0].ffn.w_up.row_scale)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert bits_per_weight(loaded) == bits_per_weight(model)


def test_compressed_checkpoint_round_trips_and_is_smaller_by_the_bpw_ratio(tmp_path):
    from mmafm.checkpoint import CheckpointError
    from mmafm.compress import load_compressed, save_compressed

    model = _tiny()
    mmafm.save_model(tmp_path / "float", model)
    compress_model(model, bits={"layers.0.ffn.w_up": 2}, default_bits=4, embedding_bits=8)
    path = save_compressed(tmp_path / "packed", model, {"step": 3})
    loaded = mmafm.load_model(tmp_path / "packed")
    assert isinstance(loaded.layers[0].ffn.w_up, PackedLinear) and loaded.layers[0].ffn.w_up.bits == 2
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert load_compressed(path).layers[1].attn.q_proj.bits == 4
    # on disk: the weight matrices at bits_per_weight, the 1-D gains at float32, plus a header
    vectors = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 1)
    weights = sum(count for _, count, _ in matrix_bits(model))
    expected = bits_per_weight(model) * weights / 8 + vectors
    assert expected <= path.stat().st_size <= expected + 16384
    float_size = (tmp_path / "float.safetensors").stat().st_size
    assert path.stat().st_size / float_size == pytest.approx(bits_per_weight(model) / 32, rel=0.05)
    # corruption and misuse: clear errors naming the file
    with pytest.raises(CheckpointError, match="not a compressed checkpoint"):
        load_compressed(tmp_path / "float")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        mmafm.load_model(path)
    path.write_bytes(data)
    meta = path.with_suffix(".json")
    import json

    record = json.loads(meta.read_text())
    record["compression"]["layers.0.ffn.w_up"]["rows"] = 7
    meta.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="packed 'layers.0.ffn.w_up' is \\(7, 96\\)"):
        mmafm.load_model(path)
    with pytest.raises(ValueError, match="no packed modules"):
        save_compressed(tmp_path / "x", _tiny())


@pytest.mark.skipif(not kernels.kernels_available(), reason="native kernels unavailable")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lut_gemv_equals_the_dequantized_matmul(bits):
    generator = torch.Generator().manual_seed(bits)
    for out, cols, group_rows in [(96, 64, 16), (50, 37, 16), (40, 256, 1), (600, 320, 16)]:  # ragged, per row, threaded
        codes = torch.randint(0, 1 << bits, (out, cols), generator=generator)
        table = torch.randn(-(-out // group_rows), 1 << bits, generator=generator)
        weight = table[torch.arange(out)[:, None] // group_rows, codes]  # (out, cols)
        for batch in (1, 3, 8):
            x = torch.randn(batch, cols, generator=generator)
            with torch.no_grad():
                y = kernels.lut_linear(x, pack_codes(codes, bits), table, bits, group_rows)
            assert y is not None and torch.allclose(y, x @ weight.T, atol=1e-4, rtol=1e-5), (bits, out, cols, batch)
    with torch.no_grad():  # more rows than a GEMV takes, or autograd: the caller's fallback
        assert kernels.lut_linear(torch.randn(9, 64), pack_codes(codes[:, :64], bits), table, bits, group_rows) is None


# ----------------------------------------------------------------------------- int8 KV cache (2025 device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kv_round_trip_error_within_half_a_step(dtype):
    """Symmetric absmax int8 with one scale per vector: rounding moves each element by at most half
    a quantization step, ``scale / 2`` with ``scale = max|x| / 127`` (closed form); a bfloat16
    cache also rounds the stored scale, which moves an element by at most ``|q| |scale error|``."""
    from mmafm.layers.kv_cache import dequantize_int8, quantize_int8

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 17, 64, generator=generator) * torch.logspace(-3, 2, 17)[:, None]).to(dtype)  # (B, H, T, D)
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 17, 1) and int(q.abs().max()) <= 127
    exact_scale = x.float().abs().amax(-1, keepdim=True) / 127.0  # the closed form, float32
    error = (dequantize_int8(q, scale, torch.float32) - x.float()).abs()  # (B, H, T, D)
    bound = exact_scale / 2 + q.float().abs() * (scale.float() - exact_scale).abs()
    assert (error <= bound * (1 + 1e-5) + 1e-12).all(), (error - bound).max()
    assert (q.abs().amax(-1) == 127).all()  # the largest element of every vector hits the top level
    if dtype == torch.float32:
        assert torch.allclose(scale, exact_scale, rtol=1e-6, atol=0)
        assert error.amax(-1).gt(exact_scale[..., 0] / 4).float().mean() > 0.9  # the bound is nearly reached


def test_int8_kv_decode_logits_close_to_a_float_kv_decode():
    """Teacher-forced decode steps (the decode plan) into an int8 and a float32 cache: layer 0's
    stored K/V (identical inputs) within half a step of the float ones, and logits close."""
    from mmafm.inference.plan import build_plan

    model = _tiny()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 24), generator=generator)
    prompt = 8
    logits = {}
    caches = {}
    with torch.no_grad():
        for quantized in (False, True):
            cache = model.new_cache(2, ids.shape[1], quantized=quantized)
            model(ids[:, :prompt], cache=cache)
            plan = build_plan(model, cache)
            logits[quantized] = torch.stack([plan.step(ids[:, t]) for t in range(prompt, ids.shape[1])], 1)  # (B, T, V)
            caches[quantized] = cache
    store = caches[True].layers[0]
    for name, scales in (("keys", "key_scales"), ("values", "value_scales")):
        floats = getattr(caches[False].layers[0], name)  # (B, Hkv, S, D)
        error = (store.read()[0 if name == "keys" else 1] - floats).abs()
        assert (error <= getattr(store, scales).float() / 2 * (1 + 1e-4) + 1e-5).all(), name
    difference = (logits[True] - logits[False]).abs()
    assert difference.max() / logits[False].abs().max() < 0.03, difference.max()
    assert difference.max() > 0  # it really went through int8
    agree = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean()
    assert agree >= 0.9, agree


# ----------------------------------------------------------------------------- the packed whole decode step


@pytest.mark.skipif(not kernels.kernels_available(), reason="native kernels unavailable")
@pytest.mark.parametrize("preset,overrides", [
    ("afm_2024_device_tiny", {}),
    ("afm_2024_device_tiny", {"dim": 72, "head_dim": 24, "ffn_dim": 100}),  # widths not multiples of 16
    ("afm_2025_device_tiny", {}),  # K/V shared by the last layers
    ("afm_2024_device_tiny", {"sliding_window": 8, "local_global_pattern": (1, 1)}),  # ring buffers, wrapped
    ("afm_2024_device_tiny", {"per_channel_scale": True}),  # LUTs with fp16 row scales
], ids=["2024", "ragged", "2025_device", "sliding_window", "row_scale"])
def test_packed_whole_step_equals_the_dequantized_model(preset, overrides):
    """The one-call decode step over packed weights (csrc/lut.c) against the dequantized model's
    module path, step by step: LUTs of 2, 4 and 8 bits, a uniform (QAT-style) matrix, a linear
    left float32, a packed embedding read by the tied head; two rows, one left-padded (except over
    ring buffers, where padding takes the module path)."""
    from mmafm.compress.packed import PackedLinear
    from mmafm.compress.palettize import quantize_uniform
    from mmafm.inference.plan import build_plan

    overrides = dict(overrides)
    per_channel_scale = overrides.pop("per_channel_scale", False)
    model = _tiny(preset, **overrides)
    compress_model(model, bits={"layers.0.ffn.w_up": 2, "layers.1.attn.q_proj": 8, "layers.0.attn.o_proj": 32},
                   default_bits=4, embedding_bits=4, per_channel_scale=per_channel_scale)
    down = model.layers[1].ffn.w_down  # a uniform per-row matrix, as convert_qat makes
    weight = down.dequantize()
    codes, scale = quantize_uniform(weight, 4)
    uniform = PackedLinear(down.in_features, down.out_features, 4, scheme="uniform", group_size=1)
    model.layers[1].ffn.w_down = uniform.set_packed(codes, scale)
    reference = dequantized_copy(model)
    assert isinstance(model.layers[0].attn.o_proj, nn.Linear)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 256, (2, 30), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    ring = model.config.sliding_window < 30
    mask[1, :3] = 0 if not ring else 1  # left padding in row 1
    with torch.no_grad():
        caches = [m.new_cache(2, 30) for m in (model, reference)]
        for m, cache in zip((model, reference), caches):
            m(ids[:, :8], cache=cache, attention_mask=mask)
        plan = build_plan(model, caches[0])
        assert plan.whole_step and "over packed weights" in plan.describe(), plan.describe()
        for t in range(8, 30):
            ours = plan.step(ids[:, t])
            theirs = reference(ids[:, t : t + 1], cache=caches[1])[:, -1]
            assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (t, (ours - theirs).abs().max())
