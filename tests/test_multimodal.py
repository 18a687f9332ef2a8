"""The multimodal model: placeholder expansion against a naive loop, token counts per mode against
the closed form, loss masking against a hand-written cross-entropy, freezing by gradients, KV-cached
generation against uncached forwards, full-size presets on the meta device."""

import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.models.adapter import make_views
from mmafm.models.multimodal import (
    IGNORE_INDEX,
    MultimodalModel,
    expand_image_placeholders,
)

IMAGE = 8  # the tokenizer's <image> id, the presets' image_token_id
TEXT_PRESETS = ["afm_2024_device_tiny", "afm_2025_device_tiny", "afm_2025_server_tiny"]  # dense, KV-shared, PT-MoE
VISION = {  # preset -> overrides that fit its patch size (ViTDet /16, ViT-g /14)
    "vitdet_large_patch16_rw_tiny": {},
    "vit_giant_patch14_tiny": {"rapid_size": 42, "balanced_size": 98},
}


def tiny_model(text="afm_2025_device_tiny", vision="vitdet_large_patch16_rw_tiny", **overrides):
    return mmafm.create_model(
        "afm_vl_tiny", text_preset=text, vision_preset=vision, **VISION[vision], **overrides
    ).eval()


def images_for(model, count, mode=None):
    size = model.resolution_mode(mode).image_size
    return torch.randn(count, 3, size, size)


# ----------------------------------------------------------------------------- expansion
def _naive_expand(ids, mask, labels, k, pad, side):
    rows = []
    for row_ids, row_mask, row_labels in zip(ids.tolist(), mask.tolist(), labels.tolist()):
        out_ids, out_img, out_mask, out_labels = [], [], [], []
        for token, m, label in zip(row_ids, row_mask, row_labels):
            copies = k if token == IMAGE else 1
            out_ids += [token] * copies
            out_img += [token == IMAGE] * copies
            out_mask += [m] * copies
            out_labels += [IGNORE_INDEX if token == IMAGE else label] * copies
        rows.append((out_ids, out_img, out_mask, out_labels))
    width = max(len(r[0]) for r in rows)
    padded = []
    for out_ids, out_img, out_mask, out_labels in rows:
        n = width - len(out_ids)
        fill = lambda seq, value: (seq + [value] * n) if side == "right" else ([value] * n + seq)  # noqa: E731
        padded.append((fill(out_ids, pad), fill(out_img, False), fill(out_mask, 0), fill(out_labels, IGNORE_INDEX)))
    return [torch.tensor([p[i] for p in padded]) for i in range(4)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_expand_matches_naive_loop(side):
    ids = torch.tensor([[2, IMAGE, 5, 6, IMAGE, 7], [2, 9, 9, 9, IMAGE, 3], [2, 4, 4, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = ids.clone()
    labels[0, 2] = IGNORE_INDEX
    out = expand_image_placeholders(ids, IMAGE, 3, pad_id=0, attention_mask=mask, labels=labels, padding_side=side)
    ref_ids, ref_img, ref_mask, ref_labels = _naive_expand(ids, mask, labels, 3, 0, side)
    assert torch.equal(out.input_ids, ref_ids)
    assert torch.equal(out.image_mask, ref_img)
    assert torch.equal(out.attention_mask, ref_mask)
    assert torch.equal(out.labels, ref_labels)


def test_expand_without_padding_needs_no_mask():
    ids = torch.tensor([[2, IMAGE, 5], [2, IMAGE, 6]])
    out = expand_image_placeholders(ids, IMAGE, 4)
    assert out.input_ids.shape == (2, 6) and out.attention_mask is None and out.labels is None
    assert out.image_mask.sum().item() == 8


# ----------------------------------------------------------------------------- token counts
@pytest.mark.parametrize("vision", list(VISION))
def test_num_image_tokens_agrees_with_the_sequence(vision):
    model = tiny_model(vision=vision)
    ids = torch.tensor([[2, IMAGE, 11, 12]])
    for mode, expected in (("rapid", 4), ("balanced", 16), ("high_res", 80)):  # afm_vl_tiny's budgets
        assert model.num_image_tokens(mode) == expected
        with torch.no_grad():
            out = model(ids, images_for(model, 1, mode), mode=mode)
        assert out.logits.shape[1] == ids.shape[1] - 1 + expected
        assert int(out.image_mask.sum()) == expected


@pytest.mark.slow
def test_real_resolutions_give_9_144_720_tokens_with_a_tiny_encoder():
    """Full-size images (224 / 672 / 1344) through a tiny encoder and the real pooling."""
    model = tiny_model(rapid_size=224, balanced_size=672, num_image_tokens=144, rapid_image_tokens=9)
    for mode, expected in (("rapid", 9), ("balanced", 144), ("high_res", 720)):
        with torch.no_grad():
            tokens = model.encode_images(images_for(model, 1, mode), mode)
        assert tokens.shape == (1, expected, model.text.config.dim) == (1, model.num_image_tokens(mode), 64)


def _adapter_params(vision_dim, text_dim):
    block = 12 * vision_dim**2 + 13 * vision_dim  # qkv + proj + 2-layer MLP (4x) + biases + 2 LayerNorms
    return block + vision_dim * text_dim + text_dim + 9 * text_dim**2 + text_dim  # linear + 3x3 conv


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, vision_dim, vision_params, text_params",
    [("afm_vl_2025_device", 1024, 304.0e6, 3.111e9), ("afm_vl_2025_server", 1408, 1012.3e6, 84.47e9)],
)
def test_full_size_presets_on_meta(preset, vision_dim, vision_params, text_params):
    model = mmafm.create_model(preset, device="meta")
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
    assert counts["adapter"] == _adapter_params(vision_dim, 2048)
    assert counts["vision"] == pytest.approx(vision_params, rel=1e-3)
    assert counts["text"] == pytest.approx(text_params, rel=1e-3)
    for mode, expected in (("rapid", 9), ("balanced", 144), ("high_res", 720)):
        assert model.num_image_tokens(mode) == expected
        size = {"rapid": 224, "balanced": 672, "high_res": 1344}[mode]
        with torch.no_grad():
            tokens = model.encode_images(torch.empty(1, 3, size, size, device="meta"), mode)
        assert tokens.shape == (1, expected, 2048)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["afm_vl_2025_device", "afm_vl_2025_server"])  # dense / PT-MoE decoder
def test_full_forward_on_meta(preset):
    model = mmafm.create_model(preset, device="meta")
    ids = torch.tensor([[2, IMAGE, 40, 41]])  # CPU ids work with a meta model
    with torch.no_grad():
        out = model(ids, torch.empty(1, 3, 1344, 1344, device="meta"), mode="high_res")
    assert out.logits.shape == (1, 4 - 1 + 720, 153_600)


# ----------------------------------------------------------------------------- towers: config and encoding
def test_tower_overrides_nest_and_are_validated_against_the_tower_presets():
    from mmafm.config import ConfigError
    from mmafm.models.multimodal import MultimodalConfig

    config = mmafm.get_config("afm_vl_tiny", text={"vocab_size": 512, "rope_theta": 1000}, vision={"img_size": 96})
    assert config.text == {"vocab_size": 512, "rope_theta": 1000.0} and config.vision == {"img_size": 96}
    model = MultimodalModel(config)
    # the towers are exactly the presets built with those overrides
    assert model.text.config == mmafm.get_config("afm_2025_device_tiny", vocab_size=512, rope_theta=1000.0)
    assert model.vision.config == mmafm.get_config("vitdet_large_patch16_rw_tiny", img_size=96)
    assert model.text.embed.weight.shape[0] == 512 and model.vision.pos_embed.shape[1:3] == (6, 6)

    with pytest.raises(ConfigError, match=r"MultimodalConfig\.text .*'afm_2025_device_tiny'.*unknown key\(s\) \['vocab'\]"):
        mmafm.get_config("afm_vl_tiny", text={"vocab": 512})
    with pytest.raises(ConfigError, match=r"MultimodalConfig\.vision .*key 'num_registers': expected int"):
        mmafm.get_config("afm_vl_tiny", vision={"num_registers": "two"})
    with pytest.raises(ConfigError, match=r"MultimodalConfig\.vision .*img_size 100 must be a multiple of patch_size 16"):
        mmafm.create_model("afm_vl_tiny", vision={"img_size": 100})
    with pytest.raises(ConfigError, match=r"key 'text': expected a mapping, got 512"):
        mmafm.get_config("afm_vl_tiny", text=512)
    with pytest.raises(ConfigError, match=r"MultimodalConfig\.text .*expected a mapping of config fields"):
        MultimodalConfig(text=512)
    # the overrides are checked against the tower preset they go to: a ViTDet key on a ViT
    with pytest.raises(ConfigError, match=r"MultimodalConfig\.vision .*'vit_giant_patch14_tiny'.*\['num_registers'\]"):
        mmafm.get_config("afm_vl_tiny", vision_preset="vit_giant_patch14_tiny", vision={"num_registers": 2})
    with pytest.raises(ConfigError, match="unknown key.*'text_vocab_size'"):  # the old flat field is gone
        mmafm.get_config("afm_vl_tiny", text_vocab_size=512)


def test_config_with_nested_overrides_round_trips_through_dicts_and_yaml(tmp_path):
    import yaml

    from mmafm.config import dump_yaml, from_dict, load_yaml, to_dict
    from mmafm.models.multimodal import MultimodalConfig

    config = mmafm.get_config(
        "afm_vl_tiny", text={"vocab_size": 300, "max_seq_len": 128},
        vision={"global_blocks": (0, 3), "register_merge": "max"},
    )
    data = to_dict(config)
    assert data["vision"] == {"global_blocks": [0, 3], "register_merge": "max"}  # YAML-safe
    assert from_dict(MultimodalConfig, yaml.safe_load(yaml.safe_dump(data))) == config
    dump_yaml(config, tmp_path / "config.yaml")
    loaded = from_dict(MultimodalConfig, load_yaml(tmp_path / "config.yaml"), source="config.yaml")
    assert loaded == config and loaded.vision["global_blocks"] == (0, 3)
    assert MultimodalModel(loaded).vision.config.global_blocks == (0, 3)
    with pytest.raises(ValueError, match=r"MultimodalConfig\.text .*\['bad'\]"):
        from_dict(MultimodalConfig, {**data, "text": {"bad": 1}})


def test_model_yaml_nests_tower_overrides(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = mmafm.get_config(str(root / "configs/models/afm_vl_2025_device_8reg.yaml"))
    assert config.vision_preset == "vitdet_large_patch16_rw" and config.text_preset == "afm_2025_device"
    assert mmafm.get_config(config.vision_preset, **config.vision) == mmafm.get_config(
        str(root / "configs/models/vitdet_large_patch16_rw_8reg.yaml")
    )
    assert mmafm.get_config(config.text_preset, **config.text).max_seq_len == 8192
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: afm_vl_tiny\noverrides:\n  text:\n    n_layer: 3\n")
    with pytest.raises(ValueError, match=r"MultimodalConfig\.text .*\['n_layer'\]"):
        mmafm.get_config(str(bad))


@pytest.mark.parametrize("vision", list(VISION))
def test_encode_images_adapts_the_encoder_tokens(vision):
    """Reference: the encoder's public forwards (ViT: unmasked ``forward_features``; ViTDet:
    registers of ``forward_tokens`` + the ``forward_features`` map) through the adapter."""
    overrides = {"vision": {"mask_ratio": 0.5}} if vision.startswith("vit_") else {}
    model = mmafm.create_model("afm_vl_tiny", vision_preset=vision, **VISION[vision], **overrides)
    model.train()  # a training forward, with FLIP masking configured: still unmasked
    images = images_for(model, 2, "high_res")
    views = make_views(images, model.resolution_mode("high_res"))
    encoder = model.vision
    grid = (views.shape[-2] // encoder.config.patch_size, views.shape[-1] // encoder.config.patch_size)
    with torch.no_grad():
        if vision.startswith("vit_"):
            tokens = encoder.forward_features(views, mask_ratio=0.0)
        else:
            registers = encoder.forward_tokens(views)[0]
            tokens = torch.cat([registers, encoder.forward_features(views).flatten(2).transpose(1, 2)], dim=1)
        reference = model.adapter(tokens, grid, model.resolution_mode("high_res").tokens_per_view)
        encoded = model.encode_images(images, "high_res")
    assert torch.equal(encoded, reference.reshape(2, model.num_image_tokens("high_res"), -1))


def test_a_vision_preset_without_the_grid_interface_is_named():
    with pytest.raises(TypeError, match="vision preset 'afm_2024_device_tiny' is not an image encoder"):
        mmafm.create_model("afm_vl_tiny", vision_preset="afm_2024_device_tiny")


# ----------------------------------------------------------------------------- loss masking
def test_loss_skips_image_positions_and_padding():
    model = tiny_model(text="afm_2024_device_tiny")
    ids = torch.tensor([[2, IMAGE, 20, 21, 22, 3], [2, IMAGE, 30, 3, 0, 0]])
    labels = ids.masked_fill(ids == 0, IGNORE_INDEX)
    with torch.no_grad():
        out = model(ids, images_for(model, 2), labels=labels)
    assert (out.labels[out.image_mask] == IGNORE_INDEX).all()
    # naive: caption token j of the unexpanded row sits at j + K - 1 once the image (index 1) is
    # expanded to K slots, and is predicted by the logits one position earlier
    k = model.num_image_tokens()
    total, count = 0.0, 0
    for row in range(2):
        for j in range(2, ids.shape[1]):
            if ids[row, j] == 0:  # padding
                continue
            position = j + k - 1
            total += float(F.cross_entropy(out.logits[row, position - 1][None], ids[row, j][None]))
            count += 1
    assert count == 4 + 2  # row 0: 20 21 22 </s>; row 1: 30 </s>
    assert out.metrics["target_tokens"] == count
    assert out.metrics["ce"] == pytest.approx(total / count, rel=1e-5)


def test_image_changes_the_caption_loss_only_through_image_tokens():
    """Targets never include image slots: the loss is unchanged when the *targets* at image
    slots would differ (placeholder id vs anything), and changes with the image."""
    model = tiny_model()
    ids = torch.tensor([[2, IMAGE, 20, 21, 3]])
    images = images_for(model, 1)
    with torch.no_grad():
        first = model(ids, images, labels=ids).loss
        other_labels = ids.clone()
        other_labels[0, 1] = 77  # a label on the placeholder itself is ignored
        second = model(ids, images, labels=other_labels).loss
        third = model(ids, images + 1.0, labels=ids).loss
    assert first == second
    assert first != third


# ----------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("vision", list(VISION))
@pytest.mark.parametrize(
    "trainable", [(True, True, True), (False, True, False), (False, False, True), (True, False, False), (False, True, True)]
)
def test_gradients_reach_exactly_the_unfrozen_parts(vision, trainable):
    model = tiny_model(vision=vision).train()
    flags = dict(zip(("vision", "adapter", "text"), trainable))
    model.set_trainable(**flags)
    assert model.trainable_parts() == flags
    ids = torch.tensor([[2, IMAGE, 20, 21, 3], [2, IMAGE, 30, 31, 3]])
    model(ids, images_for(model, 2), labels=ids).loss.backward()
    for name, part in model.parts().items():
        for param_name, param in part.named_parameters():
            if flags[name]:
                assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{param_name} got no gradient"
            else:
                assert param.grad is None, f"frozen {name}.{param_name} got a gradient"


def test_set_trainable_none_leaves_a_part_alone():
    model = tiny_model().set_trainable(vision=False)
    model.set_trainable(text=False)
    assert model.trainable_parts() == {"vision": False, "adapter": True, "text": False}
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and model.no_weight_decay() <= set(names)


# ----------------------------------------------------------------------------- generation
def _uncached_logits(model, prompt_row, new_tokens, image):
    ids = torch.tensor([prompt_row + new_tokens])
    with torch.no_grad():
        logits = model(ids, image[None]).logits[0]
    start = len(prompt_row) - 1 + model.num_image_tokens() - 1  # last prompt position, expanded
    return logits[start : start + len(new_tokens)]


@pytest.mark.parametrize("vision", list(VISION))
@pytest.mark.parametrize("text", TEXT_PRESETS)
def test_cached_generation_equals_uncached_forward(text, vision):
    """Left-padded batch of two prompts of different lengths; each row is checked against an
    uncached forward of that row alone (no padding), token by token."""
    model = tiny_model(text=text, vision=vision)
    prompts = [[2, IMAGE, 20, 21, 22, 23], [2, 30, IMAGE]]
    images = images_for(model, 2)
    new, step_logits = model.generate(images=images, prompt=prompts, max_new_tokens=6, return_logits=True)
    assert new.shape == (2, 6) and step_logits.shape == (2, 6, model.text.config.vocab_size)
    for row in range(2):
        reference = _uncached_logits(model, prompts[row], new[row].tolist(), images[row])
        torch.testing.assert_close(step_logits[row], reference, atol=2e-4, rtol=1e-4)
        assert torch.equal(reference.argmax(-1), new[row])


def test_generate_takes_text_prompts_and_stops_at_eos(tmp_path):
    from mmafm.tokenizer import train_tokenizer

    captions = [f"a {c} {s} on the left" for c in ("red", "blue", "green") for s in ("circle", "square")] * 20
    tokenizer = train_tokenizer(captions, tmp_path / "tok", vocab_size=300)
    model = mmafm.create_model("afm_vl_tiny", text={"vocab_size": tokenizer.vocab_size}).eval()
    image = images_for(model, 1)
    ids = torch.tensor([tokenizer.encode("<image> a red", bos=True)])
    assert int((ids == tokenizer.image_id).sum()) == 1
    with torch.no_grad():
        greedy = model(ids, image).logits[0, -1].argmax()
    plain = model.generate(images=image, prompt="<image> a red", tokenizer=tokenizer, eos_id=-1, max_new_tokens=4)
    assert int(plain[0, 0]) == int(greedy)
    # with the first greedy token as "EOS" the row stops at once and is filled with it
    stopped = model.generate(images=image, prompt=ids[0].tolist(), eos_id=int(greedy), max_new_tokens=4)
    assert stopped.tolist() == [[int(greedy)] * 4]


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors():
    model = tiny_model()
    two_placeholders = torch.tensor([[2, IMAGE, IMAGE, 5]])
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) \(token id 8\) but 1 image\(s\)"):
        model(two_placeholders, images_for(model, 1))
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\).*but 1 image"):
        model(torch.tensor([[2, 5]]), images_for(model, 1))
    with pytest.raises(ValueError, match=r"48x48 is too small for resolution mode 'balanced'.*96x96"):
        model(torch.tensor([[2, IMAGE]]), torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="unknown resolution mode 'huge'"):
        model.num_image_tokens("huge")
    with pytest.raises(ValueError, match="needs a prompt"):
        model.generate(images=images_for(model, 1))
    with pytest.raises(ValueError, match="a text prompt needs tokenizer"):
        model.generate(images=images_for(model, 1), prompt="<image>")
    with pytest.raises(ValueError, match="image_token_id=5000 is outside the text vocabulary of 2048"):
        mmafm.create_model("afm_vl_tiny", image_token_id=5000)


# ----------------------------------------------------------------------------- checkpoints
def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model(text="afm_2025_server_tiny")
    path = mmafm.save_model(tmp_path / "vl", model, {"step": 3})
    loaded = mmafm.load_model(path, family="multimodal")
    assert isinstance(loaded, MultimodalModel) and loaded.config == model.config
    ids, images = torch.tensor([[2, IMAGE, 9]]), images_for(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids, images).logits, model(ids, images).logits)
