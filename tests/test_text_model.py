"""The AFM text decoders against independent references.

- a naive per-row, per-head, per-query loop implementation written here from the weights (its own
  RoPE via complex numbers, its own masks, its own MoE routing), for dense, KV-shared, MoE and
  local/global (sliding window + NoPE) layers, with and without left padding;
- cached decoding (prefill, multi-token chunks, single tokens; ring buffers past the window;
  int8 cache) against the full forward of every tiny preset;
- parameter counts of the full presets (built on the meta device) against REFERENCE.md;
- KV-cache bytes against the closed-form count and the report's 35/56 (-37.5%).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.checkpoint import CheckpointError, load_into, save_checkpoint
from mmafm.config import ConfigError
from mmafm.inference.memory import kv_cache_curves, plot_kv_cache
from mmafm.models.text import TextConfig, TextModel, kv_cache_bytes, layer_is_local, layer_uses_rope, layer_window
from mmafm.registry import TEXT_FAMILIES, UnknownModelError, preset_table

TEXT_PRESETS = sorted(mmafm.list_models(family="text") + mmafm.list_models(family="ptmoe"))
TINY_PRESETS = [name for name in TEXT_PRESETS if name.endswith("_tiny")]
FULL_PRESETS = [name for name in TEXT_PRESETS if not name.endswith("_tiny")]


def test_every_full_preset_has_a_tiny_twin():
    assert {"afm_2024_device", "afm_2025_device", "afm_2025_server"} <= set(FULL_PRESETS)
    assert sorted(TINY_PRESETS) == sorted(f"{name}_tiny" for name in FULL_PRESETS)


# ----------------------------------------------------------------------------- naive reference


def _rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rope_complex(x, positions, base):  # x (T, D): pair (j, j + D/2) is one complex number
    half = x.shape[-1] // 2
    freqs = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    rotation = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None] * freqs)
    z = torch.complex(x[:, :half], x[:, half:]) * rotation
    return torch.cat((z.real, z.imag), dim=-1)


def _naive_ffn(sd, prefix, x, config):
    if prefix + "ffn.router.weight" not in sd:
        return (F.silu(x @ sd[prefix + "ffn.w_gate.weight"].T) * (x @ sd[prefix + "ffn.w_up.weight"].T)) @ sd[
            prefix + "ffn.w_down.weight"
        ].T
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ sd[prefix + "ffn.router.weight"].T, dim=-1)
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e].item())[: config.top_k]
        total = sum(probs[e] for e in chosen)
        for e in chosen:
            g, u, d = (sd[prefix + f"ffn.{n}"][e] for n in ("w_gate", "w_up", "w_down"))
            out[t] += probs[e] / total * ((F.silu(g @ x[t]) * (u @ x[t])) @ d.T)
    return out


def naive_logits(model: TextModel, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Logits computed row by row, head by head, query by query, in float64."""
    config = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
    batch, length = ids.shape
    mask = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = []
    for b in range(batch):
        valid = mask[b]
        positions = (valid.long().cumsum(0) - 1).clamp(min=0).double()
        h = sd["embed.weight"][ids[b]]
        shared = {}
        for i in range(config.n_layers):
            p = f"layers.{i}."
            x = _rms(h, sd[p + "attn_norm.weight"], config.norm_eps)
            q = (x @ sd[p + "attn.q_proj.weight"].T).view(length, heads, head_dim)
            if config.qk_norm:
                q = _rms(q, sd[p + "attn.q_norm.weight"], config.norm_eps)
            if p + "attn.k_proj.weight" in sd:
                k = (x @ sd[p + "attn.k_proj.weight"].T).view(length, kv_heads, head_dim)
                v = (x @ sd[p + "attn.v_proj.weight"].T).view(length, kv_heads, head_dim)
                if config.qk_norm:
                    k = _rms(k, sd[p + "attn.k_norm.weight"], config.norm_eps)
                if layer_uses_rope(config, i):
                    k = torch.stack([_rope_complex(k[:, g], positions, config.rope_theta) for g in range(kv_heads)], 1)
                shared = {"k": k, "v": v}
            else:  # KV-shared layer: the last layer that had K/V (segment 1's last)
                k, v = shared["k"], shared["v"]
            if layer_uses_rope(config, i):
                q = torch.stack([_rope_complex(q[:, n], positions, config.rope_theta) for n in range(heads)], 1)
            window = layer_window(config, i)
            out = torch.zeros(length, heads, head_dim, dtype=torch.float64)
            for n in range(heads):
                g = n // (heads // kv_heads)
                for t in range(length):
                    keys = [s for s in range(t + 1) if (valid[s] or s == t) and (window is None or t - s < window)]
                    scores = k[keys, g] @ q[t, n] / math.sqrt(head_dim)
                    out[t, n] = torch.softmax(scores, 0) @ v[keys, g]
            h = h + out.reshape(length, heads * head_dim) @ sd[p + "attn.o_proj.weight"].T
            h = h + _naive_ffn(sd, p, _rms(h, sd[p + "ffn_norm.weight"], config.norm_eps), config)
        h = _rms(h, sd["norm.weight"], config.norm_eps)
        rows.append(h @ sd["embed.weight" if config.tie_embeddings else "lm_head.weight"].T)
    return torch.stack(rows)


LOCAL_GLOBAL = dict(local_global_pattern=(3, 1), sliding_window=5, global_layer_rope=False, n_layers=4)
REFERENCE_CASES = [
    ("afm_2024_device_tiny", {}),
    ("afm_2025_device_tiny", {}),
    ("afm_2025_moe_teacher_tiny", {}),
    ("afm_2024_device_tiny", {**LOCAL_GLOBAL, "tie_embeddings": False, "qk_norm": False}),
]


@pytest.mark.parametrize("name,overrides", REFERENCE_CASES, ids=lambda v: str(v) if v else "-")
def test_forward_matches_naive_reference(name, overrides):
    torch.manual_seed(0)
    model = mmafm.create_model(name, init_std=0.2, **overrides).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    attention_mask = torch.ones(2, 14, dtype=torch.long)
    attention_mask[1, :4] = 0  # row 1 is left-padded
    for mask in (None, attention_mask):
        got = model(ids, attention_mask=mask)
        want = naive_logits(model, ids, mask).float()
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (name, (got - want).abs().max())


def test_local_attention_matches_masked_reference():
    """Sliding-window layers see exactly their last `window` keys; the NoPE global layer sees all."""
    torch.manual_seed(1)
    model = mmafm.create_model("afm_2024_device_tiny", init_std=0.2, **LOCAL_GLOBAL).double().eval()
    config = model.config
    assert [layer_is_local(config, i) for i in range(4)] == [True, True, True, False]
    assert [layer_uses_rope(config, i) for i in range(4)] == [True, True, True, False]
    ids = torch.randint(0, config.vocab_size, (1, 17))  # 17 > window 5
    assert torch.allclose(model(ids), naive_logits(model, ids).float(), atol=2e-5, rtol=1e-5)
    # and the window matters: a model with a window covering everything differs
    wide = mmafm.create_model("afm_2024_device_tiny", init_std=0.2, **{**LOCAL_GLOBAL, "sliding_window": 64}).double()
    wide.load_state_dict(model.state_dict())
    assert not torch.allclose(model(ids), wide.eval()(ids), atol=1e-3)


# ----------------------------------------------------------------------------- cached decoding


def _decode_in_pieces(model, ids, cache, attention_mask=None, pieces=(13, 5)):
    """Prefill `pieces[0]` tokens, then a multi-token chunk, then one token per call."""
    outputs, start = [], 0
    for size in pieces:
        outputs.append(model(ids[:, start : start + size], cache=cache,
                             attention_mask=None if attention_mask is None else attention_mask[:, : start + size]))
        start += size
    while start < ids.shape[1]:
        outputs.append(model(ids[:, start : start + 1], cache=cache))
        start += 1
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32_cache", "int8_cache"])
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_cached_decode_matches_full_forward(name, quantized):
    torch.manual_seed(0)
    model = mmafm.create_model(name, init_std=0.1).eval()
    length = 36  # the server's ring buffers (window 16) wrap twice
    ids = torch.randint(0, model.config.vocab_size, (2, length))
    full = model(ids)
    cache = model.new_cache(2, length, quantized=quantized)
    with torch.no_grad():
        cached = _decode_in_pieces(model, ids, cache)
    assert cache.length == length
    assert cache.nbytes == kv_cache_bytes(model.config, length, 2, torch.float32, quantized=quantized)
    if quantized:
        error = (cached - full).abs().amax(-1) / full.abs().max()  # (B, T) relative error
        assert error.median() < 0.03, error
        if not model.config.num_experts:  # (int8 noise may flip an MoE routing decision)
            assert error.max() < 0.03, error
        assert not torch.equal(cached, full)  # it really went through int8
    else:
        assert torch.allclose(cached, full, atol=2e-5, rtol=1e-4), (cached - full).abs().max()


@pytest.mark.parametrize("name", ["afm_2025_server_tiny", "afm_2025_device_tiny"])
def test_cached_decode_with_left_padding_matches_unpadded_rows(name):
    torch.manual_seed(0)
    model = mmafm.create_model(name, init_std=0.1).eval()
    short = torch.randint(0, 2048, (1, 20))
    long = torch.randint(0, 2048, (1, 27))
    pad = 7
    ids = torch.cat((torch.cat((torch.zeros(1, pad, dtype=torch.long), short), 1), long))
    mask = torch.ones(2, 27, dtype=torch.long)
    mask[0, :pad] = 0
    with torch.no_grad():
        cache = model.new_cache(2, 27)
        batched = _decode_in_pieces(model, ids, cache, attention_mask=mask, pieces=(12, 4))
        alone_short = model(short)
        alone_long = model(long)
    assert torch.allclose(batched[0, pad:], alone_short[0], atol=2e-5, rtol=1e-4)
    assert torch.allclose(batched[1], alone_long[0], atol=2e-5, rtol=1e-4)


def test_ring_buffer_keeps_only_the_window():
    model = mmafm.create_model("afm_2025_server_tiny")
    config = model.config
    cache = model.new_cache(1, 100)
    for index, layer in enumerate(cache.layers):
        window = layer_window(config, index % config.n_layers)
        assert layer.keys.shape[2] == (100 if window is None else window)
    # local layers do not grow past the window, global layers grow linearly
    small, large = (kv_cache_bytes(config, n, 1, torch.float32) for n in (200, 400))
    globals_per_track = sum(1 for i in range(config.n_layers) if layer_window(config, i) is None)
    per_token = 2 * config.n_kv_heads * config.head_dim * 4 * globals_per_track * config.num_tracks
    assert large - small == 200 * per_token


# ----------------------------------------------------------------------------- sizes


def _within(value, reference, tolerance=0.03):
    return abs(value - reference) <= tolerance * reference


def test_full_presets_build_on_meta_with_reference_parameter_counts():
    afm_2024 = mmafm.create_model("afm_2024_device", device="meta")
    non_embedding = afm_2024.num_params(non_embedding=True)
    assert _within(non_embedding, 2.58e9), non_embedding
    assert _within(afm_2024.num_params() - non_embedding, 0.15e9)
    afm_2025 = mmafm.create_model("afm_2025_device", device="meta")
    assert _within(afm_2025.num_params(), 3.11e9), afm_2025.num_params()
    for name in FULL_PRESETS:
        model = mmafm.create_model(name, device="meta")
        assert model.embed.weight.is_meta and model.num_params() > 1e9


def test_full_presets_run_a_forward_on_meta():
    """Shapes (and the MoE balance loss) of every full-size preset without allocating a weight:
    MoE layers route on meta as a balanced split."""
    for name in FULL_PRESETS:
        model = mmafm.create_model(name, device="meta")
        with torch.no_grad():
            logits = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
        assert logits.shape == (2, 8, model.config.vocab_size) and logits.is_meta, name
        assert (model.aux_loss is not None) == bool(model.config.num_experts), name


def test_afm_2025_device_layout():
    config = mmafm.get_config("afm_2025_device")
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.head_dim) == (56, 2048, 16, 2, 128)
    assert (config.ffn_dim, config.vocab_size, config.kv_share_segments) == (6656, 153_600, (35, 21))
    assert config.local_global_pattern is None  # global RoPE attention in every layer
    names = {n for n, _ in mmafm.create_model("afm_2025_device", device="meta").named_parameters()}
    assert "layers.34.attn.k_proj.weight" in names and "layers.35.attn.k_proj.weight" not in names
    assert "layers.55.attn.q_proj.weight" in names and "layers.55.attn.v_proj.weight" not in names
    assert "layers.55.attn.q_norm.weight" in names and "layers.55.attn.k_norm.weight" not in names
    assert "lm_head.weight" not in names


def test_parameter_names_follow_the_contract():
    model = mmafm.create_model("afm_2024_device_tiny", tie_embeddings=False, qk_norm=False)
    names = {n for n, _ in model.named_parameters()}
    per_layer = ["attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                 "attn.o_proj.weight", "ffn_norm.weight", "ffn.w_gate.weight", "ffn.w_up.weight",
                 "ffn.w_down.weight"]
    expected = {"embed.weight", "lm_head.weight", "norm.weight"} | {
        f"layers.{i}.{n}" for i in range(4) for n in per_layer
    }
    assert names == expected
    assert all(p.ndim == 1 or "norm" not in n for n, p in model.named_parameters())
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_kv_cache_bytes_agree_with_measured_cache_and_closed_form():
    for name in TEXT_PRESETS:
        meta_model = mmafm.create_model(name, device="meta")
        for seq_len in (7, 300, 4096):
            if seq_len > meta_model.config.max_seq_len:
                continue
            for dtype in (torch.bfloat16, torch.float32):
                for quantized in (False, True):
                    cache = meta_model.new_cache(3, seq_len, dtype=dtype, quantized=quantized)
                    assert cache.nbytes == kv_cache_bytes(meta_model.config, seq_len, 3, dtype, quantized)
    config = mmafm.get_config("afm_2025_device")
    shared = kv_cache_bytes(config, 4096, 1, "bfloat16")
    assert shared == 2 * 35 * 2 * 128 * 4096 * 2  # K and V, 35 layers, 2 heads x 128, bf16
    plain = kv_cache_bytes(dataclasses.replace(config, kv_share_segments=None), 4096, 1, "bfloat16")
    assert shared * 56 == plain * 35 and 1 - shared / plain == 0.375
    # int8: one byte per value plus one bf16 scale per (head, position)
    assert kv_cache_bytes(config, 4096, 1, "bfloat16", quantized=True) == 2 * 35 * 2 * 4096 * (128 + 2)


# ----------------------------------------------------------------------------- training API


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_every_tiny_preset_trains(name):
    torch.manual_seed(0)
    model = mmafm.create_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    logits = model(ids[:, :-1])
    loss, metrics = model.loss(logits, ids[:, 1:])
    assert math.isfinite(loss.item()) and abs(metrics["ce"] - math.log(model.config.vocab_size)) < 0.5
    assert ("aux_loss" in metrics) == (model.config.num_experts > 0)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.fsdp_units() and all(isinstance(u, torch.nn.Module) for u in model.fsdp_units())


def test_loss_matches_cross_entropy_plus_z_loss():
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", init_std=0.3)
    ids = torch.randint(0, 2048, (2, 9))
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100
    logits = model(ids[:, :-1])
    loss, metrics = model.loss(logits, targets, z_loss=1e-2)
    keep = targets != -100
    ce = F.cross_entropy(logits[keep], targets[keep])
    z = torch.logsumexp(logits[keep], -1).pow(2).mean()
    assert torch.allclose(loss, ce + 1e-2 * z, rtol=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    default, _ = model.loss(logits, targets)  # the config's z_loss (1e-6 for AFM 2024)
    assert torch.allclose(default, ce + 1e-6 * z, rtol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2025_server_tiny")
    ids = torch.randint(0, 2048, (2, 20))

    def grads():
        model.zero_grad()
        loss, _ = model.loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_no_weight_decay_names_the_norm_gains():
    model = mmafm.create_model("afm_2025_device_tiny")
    exempt = model.no_weight_decay()
    assert "norm.weight" in exempt and "layers.0.attn.q_norm.weight" in exempt
    assert "embed.weight" not in exempt and "layers.0.attn.q_proj.weight" not in exempt


def test_inputs_embeds_equals_input_ids():
    model = mmafm.create_model("afm_2025_device_tiny").eval()
    ids = torch.randint(0, 2048, (2, 6))
    assert torch.equal(model(ids), model(inputs_embeds=model.embed_tokens(ids)))
    hidden = model(ids, return_hidden=True)
    assert hidden.shape == (2, 6, model.config.dim)


# ----------------------------------------------------------------------------- errors


def test_bad_input_gets_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="afm_2026_device"):
        mmafm.create_model("afm_2026_device")
    model = mmafm.create_model("afm_2024_device_tiny", max_seq_len=16)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model.new_cache(1, 32)
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    # a checkpoint of another shape
    other = mmafm.create_model("afm_2025_device_tiny")
    save_checkpoint(tmp_path / "other", other.state_dict())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_into(model, tmp_path / "other")
    # inconsistent configs
    with pytest.raises(ConfigError, match="n_kv_heads"):
        TextConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="kv_share_segments"):
        TextConfig(n_layers=8, kv_share_segments=(5, 2))
    with pytest.raises(ConfigError, match="same attention kind"):
        TextConfig(n_layers=8, kv_share_segments=(4, 4), local_global_pattern=(3, 1))
    with pytest.raises(ConfigError, match="PTMoEModel"):
        TextModel(mmafm.get_config("afm_2025_server_tiny"))
    with pytest.raises((TypeError, ConfigError), match="num_layers"):
        mmafm.get_config("afm_2025_device_tiny", num_layers=3)


def test_preset_table_has_the_text_columns_for_the_text_families():
    table = preset_table(family=TEXT_FAMILIES, include_tiny=True).splitlines()
    assert len(table) == 2 + len(TEXT_PRESETS)
    assert [line.split("`")[1] for line in table[2:]] == TEXT_PRESETS
    row = next(line for line in table if line.startswith("| `afm_2025_device` "))
    assert f"{2 * 35 * 2 * 128 * 4096 * 2 / 2**20:,.1f} MiB" in row  # 140.0 MiB, closed form
    assert "| 35+21 | 2048 | 16 / 2 x 128 |" in row
    # any other selection: the family and parameter-count columns, counts as the meta model has them
    plain = preset_table("afm_2025_*").splitlines()
    assert plain[0] == "| preset | family | parameters |" and all("_tiny" not in line for line in plain)
    count = sum(p.numel() for p in mmafm.create_model("afm_2025_device", device="meta").parameters())
    assert f"| `afm_2025_device` | text | {count:,} ({count / 1e9:.3g}B) |" in plain


def test_kv_cache_curves_follow_the_closed_form():
    curves = kv_cache_curves(max_context=32768)
    lengths, shared = curves["afm_2025_device"]
    _, unshared = curves["afm_2025_device (no KV sharing)"]
    assert lengths[0] == 128 and lengths[-1] == mmafm.get_config("afm_2025_device").max_seq_len
    assert all(s * 56 == u * 35 for s, u in zip(shared, unshared))  # 35 of 56 layers keep a cache
    server = mmafm.get_config("afm_2025_server")
    lengths, sizes = curves["afm_2025_server"]
    assert lengths[-1] == 32768
    growth = dict(zip(lengths[1:], (b - a for a, b in zip(sizes, sizes[1:]))))  # bytes added per doubling
    per_token_layer = 2 * server.n_kv_heads * server.head_dim * 2  # K and V, bf16
    # past the 4,096 window only the global layers (1 in 4) grow
    global_layers = server.num_tracks * server.n_layers // 4
    assert growth[16384] == 8192 * per_token_layer * global_layers
    assert growth[4096] == 2048 * per_token_layer * server.num_tracks * server.n_layers
    assert plot_kv_cache(max_context=4096).axes[0].get_yscale() == "log"
