"""``mmafm.save_model`` / ``mmafm.load_model``: every family rebuilds from its checkpoint alone and
computes what the saved model computed; stage folders, dtypes and every failure named."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import mmafm
from mmafm.checkpoint import CheckpointError, checkpoint_paths, load_tokenizer_for, model_outputs, save_checkpoint
from mmafm.config import ConfigError
from mmafm.registry import ModelSpec, family_of, model_family

# one tiny preset per family (and the MoE variant of the dense text model)
TINY = ["afm_2024_device_tiny", "afm_2025_moe_teacher_tiny", "afm_2025_server_tiny", "afm_vl_tiny",
        "clip_tiny", "vit_base_patch16_tiny", "vitdet_large_patch16_rw_tiny"]


def _image(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    """A forward of ``model`` on fixed inputs of the shape its family takes."""
    family = family_of(model)
    ids = torch.randint(9, 200, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if family in ("text", "ptmoe"):
            return model(ids)
        if family == "multimodal":
            ids[:, 1] = model.config.image_token_id
            return model(ids, _image(model.resolution_mode().image_size).to(next(model.parameters()).dtype)).logits
        if family == "clip":
            tokens = ids % model.config.text.vocab_size
            return torch.cat([model.encode_image(_image(model.config.image_size)), model.encode_text(tokens)])
        return model.forward_features(_image(model.config.img_size).to(next(model.parameters()).dtype))


@pytest.mark.parametrize("name", TINY)
def test_every_family_round_trips(name, tmp_path):
    model = mmafm.create_model(name).eval()
    assert model.model_spec == ModelSpec(model_family(name), name, {})
    path = mmafm.save_model(tmp_path / "model", model, {"step": 7})
    record = json.loads(checkpoint_paths(path)[1].read_text())
    assert record["step"] == 7 and record["model"]["family"] == model_family(name)
    assert record["model"]["preset"] == name and record["model"]["config"] == mmafm.config.to_dict(model.config)

    torch.manual_seed(123)  # a fresh init differs from the saved weights ...
    fresh = mmafm.create_model(name).eval()
    assert not torch.equal(_outputs(fresh), _outputs(model))
    loaded = mmafm.load_model(path)  # ... so equal outputs mean the weights were loaded
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config and loaded.model_spec == model.model_spec
    torch.testing.assert_close(_outputs(loaded), _outputs(model), atol=0, rtol=0)


def test_overrides_and_yaml_presets_are_recorded(tmp_path):
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=300, rope_theta=1e6)
    assert model.model_spec == ModelSpec("text", "afm_2024_device_tiny", {"vocab_size": 300, "rope_theta": 1e6})
    loaded = mmafm.load_model(mmafm.save_model(tmp_path / "text", model))
    assert loaded.config.vocab_size == 300 and loaded.config.rope_theta == 1e6
    assert loaded.model_spec.overrides == {"vocab_size": 300, "rope_theta": 1e6}

    root = Path(__file__).resolve().parents[1]
    yaml_file = str(root / "configs" / "models" / "afm_2025_device_no_kv_sharing.yaml")
    from_yaml = mmafm.create_model(yaml_file, device="meta", max_seq_len=8192)
    assert from_yaml.model_spec == ModelSpec("text", "afm_2025_device", {"kv_share_segments": None, "max_seq_len": 8192})


def test_models_not_built_from_a_preset_rebuild_from_their_config(tmp_path):
    from mmafm.models.clip import CLIP
    from mmafm.models.text import upcycle

    dense = mmafm.create_model("afm_2024_device_tiny").eval()
    moe = upcycle(dense, num_experts=4, top_k=2, moe_every=2).eval()
    assert not hasattr(moe, "model_spec") and family_of(moe) == "text"
    path = mmafm.save_model(tmp_path / "upcycled", moe)
    assert json.loads(checkpoint_paths(path)[1].read_text())["model"]["preset"] is None
    loaded = mmafm.load_model(path)
    assert loaded.config.num_experts == 4 and loaded.model_spec == ModelSpec("text", None, {})
    torch.testing.assert_close(_outputs(loaded), _outputs(moe), atol=0, rtol=0)

    clip = CLIP(mmafm.get_config("clip_tiny", embed_dim=32)).eval()
    loaded = mmafm.load_model(mmafm.save_model(tmp_path / "clip", clip), family="clip")
    assert loaded.config.embed_dim == 32
    torch.testing.assert_close(_outputs(loaded), _outputs(clip), atol=0, rtol=0)

    with pytest.raises(TypeError, match="Linear is not the model class of one registered family"):
        mmafm.save_model(tmp_path / "linear", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="metadata key 'model' is reserved"):
        mmafm.save_model(tmp_path / "x", dense, {"model": "mine"})


def test_dtype(tmp_path):
    model = mmafm.create_model("afm_2025_device_tiny").eval()
    path = mmafm.save_model(tmp_path / "fp32", model)
    half = mmafm.load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    reference = mmafm.create_model("afm_2025_device_tiny").eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(_outputs(half), _outputs(reference.to(torch.bfloat16)), atol=0, rtol=0)
    # None keeps the dtype the weights were saved in
    saved_half = mmafm.load_model(mmafm.save_model(tmp_path / "bf16", half))
    assert {p.dtype for p in saved_half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in mmafm.load_model(path).parameters()} == {torch.float32}


# --------------------------------------------------------------------------------- stage folders
def _stage(root: Path, outputs: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"stage": "x", "status": "complete", "outputs": outputs}))
    return root


def test_stage_folder_picks_its_model(tmp_path):
    from mmafm.models.clip import CLIP, save_image_tower

    clip = CLIP(mmafm.get_config("clip_tiny")).eval()
    clip_path, tower_path = mmafm.save_model(tmp_path / "clip", clip), save_image_tower(clip, tmp_path / "tower")
    stage = _stage(tmp_path / "stage", {"clip_checkpoint": str(clip_path), "image_tower": str(tower_path),
                                        "image_preset": "vit_base_patch16_tiny", "tokenizer": "openclip",
                                        "metrics": str(tmp_path / "metrics.jsonl")})
    assert model_outputs(stage) == {"clip_checkpoint": "clip", "image_tower": "vit"}
    assert isinstance(mmafm.load_model(stage), CLIP)  # the main model: the `*_checkpoint` output
    by_name = mmafm.load_model(stage, output="image_tower")
    by_family = mmafm.load_model(stage, family="vit")
    images = _image(64)
    for tower in (by_name, by_family):
        torch.testing.assert_close(tower.forward_head(tower.forward_features(images), pre_logits=True),
                                   clip.image_features(images))

    with pytest.raises(CheckpointError, match=r"output 'image_preset' is 'vit_base_patch16_tiny', not a model checkpoint"):
        mmafm.load_model(stage, output="image_preset")
    with pytest.raises(CheckpointError, match="output 'nothing' is not in its manifest"):
        mmafm.load_model(stage, output="nothing")
    with pytest.raises(CheckpointError, match="0 model outputs of family text/ptmoe"):
        mmafm.load_model(stage, family=("text", "ptmoe"))
    two = _stage(tmp_path / "two", {"a": str(clip_path), "b": str(tower_path)})
    with pytest.raises(CheckpointError, match="2 model outputs in its manifest.*pick one with output=NAME"):
        mmafm.load_model(two)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        mmafm.load_model(tmp_path / "unfinished")


def test_image_tower_is_saved_without_flip_masking(tmp_path):
    """The tower record keeps the preset's mask_ratio (0); overrides= puts FLIP back for fine-tuning."""
    from mmafm.models.clip import CLIP, save_image_tower

    clip = CLIP(mmafm.get_config("clip_tiny", mask_ratio=0.5))
    assert clip.visual.config.mask_ratio == 0.5
    path = save_image_tower(clip, tmp_path / "tower")
    record = json.loads(checkpoint_paths(path)[1].read_text())["model"]
    assert record["config"]["mask_ratio"] == 0.0 and record["overrides"]["mask_ratio"] == 0.0
    assert record["preset"] == "vit_base_patch16_tiny" and record["overrides"]["img_size"] == 64
    assert mmafm.load_model(path).config.mask_ratio == 0.0
    masked = mmafm.load_model(path, overrides={"mask_ratio": 0.5})
    assert masked.config.mask_ratio == 0.5 and masked.model_spec.overrides["mask_ratio"] == 0.5
    tower = mmafm.get_config("vit_base_patch16_tiny")
    saved, doubled = ((side // tower.patch_size) ** 2 + 1 for side in (64, 128))  # patches + [CLS]
    with pytest.raises(CheckpointError, match=rf"tensor 'pos_embed': expected shape \(1, {doubled}, {tower.embed_dim}\), "
                                              rf"found \(1, {saved}, {tower.embed_dim}\)"):
        mmafm.load_model(path, overrides={"img_size": 128})


# ------------------------------------------------------------------------------------- failures
@pytest.fixture
def text_path(tmp_path) -> Path:
    return mmafm.save_model(tmp_path / "text", mmafm.create_model("afm_2024_device_tiny", vocab_size=300))


def _edit_record(path: Path, **config) -> None:
    meta_path = checkpoint_paths(path)[1]
    metadata = json.loads(meta_path.read_text())
    metadata["model"]["config"].update(config)
    meta_path.write_text(json.dumps(metadata))


def test_wrong_family(text_path):
    with pytest.raises(CheckpointError, match=rf"{text_path} holds a 'text' model, expected family 'clip'$"):
        mmafm.load_model(text_path, family="clip")
    with pytest.raises(CheckpointError, match="expected family 'vit' or 'vitdet'"):
        mmafm.load_model(text_path, family=("vit", "vitdet"))
    assert mmafm.load_model(text_path, family=("text", "ptmoe")).config.vocab_size == 300


def test_wrong_shape_names_file_tensor_and_both_shapes(text_path):
    _edit_record(text_path, vocab_size=310)  # embedding (vocab, dim) = (310, 96) expected, (300, 96) stored
    with pytest.raises(CheckpointError) as err:
        mmafm.load_model(text_path)
    message = str(err.value)
    assert str(text_path) in message and "does not fit the text model its metadata describes" in message
    assert "tensor 'embed.weight': expected shape (310, 96), found (300, 96)" in message


def test_missing_and_unexpected_tensors(text_path, tmp_path):
    tensors, metadata = mmafm.checkpoint.load_checkpoint(text_path)
    dropped = sorted(tensors)[0]
    shape = tuple(tensors.pop(dropped).shape)
    tensors["extra.weight"] = torch.zeros(3)
    partial = save_checkpoint(tmp_path / "partial", tensors, metadata)
    with pytest.raises(CheckpointError) as err:
        mmafm.load_model(partial)
    message = str(err.value)
    assert str(partial) in message
    assert f"tensor {dropped!r}: expected shape {shape}, found none (missing)" in message
    assert "tensor 'extra.weight': not in the model, found shape (3,)" in message


def test_missing_corrupt_and_foreign_files(text_path, tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'nothing.safetensors'}"):
        mmafm.load_model(tmp_path / "nothing")
    weights, meta = checkpoint_paths(text_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(weights.read_bytes()[:100])
    (tmp_path / "broken.json").write_text(meta.read_text())
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint {broken}"):
        mmafm.load_model(broken)
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint metadata {meta}"):
        mmafm.load_model(text_path)
    plain = save_checkpoint(tmp_path / "plain", {"x": torch.zeros(1)}, {"step": 3})
    with pytest.raises(CheckpointError, match=rf"{plain}: its metadata .* holds no model record .*\['step'\]"):
        mmafm.load_model(plain)
    good = mmafm.save_model(tmp_path / "good", mmafm.create_model("afm_2024_device_tiny"))
    _edit_record(good, n_kv_heads=4)  # 6 heads are not a multiple of 4 KV heads: the config itself is bad
    with pytest.raises(CheckpointError, match=f"{good}: cannot rebuild its model from .*n_kv_heads"):
        mmafm.load_model(good)


# ------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_for_checkpoint_and_stage(text_checkpoint, tmp_path):
    want = text_checkpoint["tokenizer"]
    for source in (text_checkpoint["checkpoint"], text_checkpoint["stage_dir"]):
        loaded = load_tokenizer_for(source, vocab_size=want.vocab_size)
        assert loaded.encode("a red circle") == want.encode("a red circle")
        model = mmafm.load_model(source, family="text")
        torch.testing.assert_close(_outputs(model), _outputs(text_checkpoint["model"]), atol=0, rtol=0)
    with pytest.raises(ConfigError, match=f"has {want.vocab_size} tokens, the model 999"):
        load_tokenizer_for(text_checkpoint["checkpoint"], vocab_size=999)
    with pytest.raises(ConfigError, match="tokenizer '.*missing.model' not found"):
        load_tokenizer_for(text_checkpoint["checkpoint"], tokenizer=tmp_path / "missing.model")
    bare = mmafm.save_model(tmp_path / "bare", text_checkpoint["model"])
    with pytest.raises(ConfigError, match="tokenizer 'None' not found"):
        load_tokenizer_for(bare)


def test_clip_gets_its_caption_tokenizer_back(text_checkpoint, tmp_path):
    import shutil

    from mmafm.models.clip import CLIP
    from mmafm.tokenizer import load_caption_tokenizer

    tokenizer_path = tmp_path / "tok.model"
    shutil.copy(text_checkpoint["tokenizer"].path, tokenizer_path)
    tokenizer = load_caption_tokenizer(str(tokenizer_path), 32)
    clip = CLIP(mmafm.get_config("clip_tiny", text=tokenizer.text_config(mmafm.get_config("clip_tiny").text))).eval()
    clip.tokenizer = tokenizer
    path = mmafm.save_model(tmp_path / "clip", clip)
    assert json.loads(checkpoint_paths(path)[1].read_text())["tokenizer"] == str(tokenizer_path)
    loaded = mmafm.load_model(path)
    torch.testing.assert_close(loaded.encode_text(["a red circle"]), clip.encode_text(["a red circle"]))
    tokenizer_path.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mmafm.load_model(path).tokenizer is None
    assert any("not loadable" in str(w.message) for w in caught)
