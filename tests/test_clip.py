"""CLIP model, losses and evaluation, each against an independent reference: open_clip's text tower
with copied weights, open_clip's losses and closed-form losses, constructed encoders whose
zero-shot and retrieval answers are known."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.checkpoint import CheckpointError, load_model, save_checkpoint, save_model
from mmafm.eval.clip import chance_recall, class_embeddings, fashion_mnist_tensor, retrieval_metrics, zero_shot_classification
from mmafm.models.clip import (
    CLIP,
    eot_positions,
    save_image_tower,
)
from mmafm.tokenizer import load_caption_tokenizer

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def bpe():
    return load_caption_tokenizer("openclip", 16)


def tiny_clip(**overrides) -> CLIP:
    return mmafm.create_model("clip_tiny", image_size=32, **overrides)


# ------------------------------------------------------------------------------ tokenizer
def test_caption_layout_and_truncation(bpe):
    tokens = bpe(["a red circle", "word " * 40])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    expected = [bpe.sot_id, *open_clip.tokenizer.SimpleTokenizer().encode("a red circle"), bpe.eot_id]
    assert tokens[0, : len(expected)].tolist() == expected
    assert (tokens[0, len(expected):] == bpe.pad_id).all()
    assert tokens[1, -1] == bpe.eot_id and tokens[1, 0] == bpe.sot_id  # truncated, end kept
    # open_clip's own tokenizer gives the same ids
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32", context_length=16)(["a red circle", "word " * 40]))


def test_eot_positions():
    tokens = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 7, 9, 0], [5, 6, 7, 0, 0]])
    assert eot_positions(tokens, eot_id=9, pad_id=0).tolist() == [2, 1, 2]  # no end token: last non-pad


def test_unknown_tokenizer_spec_is_clear():
    with pytest.raises(FileNotFoundError, match="tokenizer .*not found"):
        load_caption_tokenizer("/no/such/tokenizer.model", 16)
    with pytest.raises(ValueError, match="spec is empty"):
        load_caption_tokenizer("", 16)


# ----------------------------------------------------------------------------- text tower
def _open_clip_twin(model: CLIP):
    """open_clip's CLIP with our text tower's shape and (copied) weights."""
    text = model.config.text
    cfg = {
        "embed_dim": model.config.embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size,
                     "width": text.width, "heads": text.num_heads, "layers": text.depth,
                     "mlp_ratio": text.mlp_dim / text.width},
    }
    twin = _create_open_clip(cfg)
    ours = model.state_dict()
    theirs = {
        "token_embedding.weight": ours["text.token_embedding.weight"],
        "positional_embedding": ours["text.positional_embedding"],
        "ln_final.weight": ours["text.norm.weight"],
        "ln_final.bias": ours["text.norm.bias"],
        "text_projection": ours["text_proj.weight"].T,
    }
    names = {"norm1": "ln_1", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj", "norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(text.depth):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                key = f"transformer.resblocks.{i}.{dst}_{kind}" if dst == "attn.in_proj" else f"transformer.resblocks.{i}.{dst}.{kind}"
                theirs[key] = ours[f"text.blocks.{i}.{src}.{kind}"]
    missing, _ = twin.load_state_dict(theirs, strict=False)
    assert not [k for k in missing if not k.startswith("visual") and k != "logit_scale"], missing
    return twin.eval()


def _create_open_clip(cfg: dict, name: str = "mmafm-test-twin"):
    import os
    import tempfile

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(cfg, handle)
    open_clip.add_model_config(path)
    return open_clip.create_model(name)


def test_text_tower_matches_open_clip(bpe):
    model = tiny_clip(text=mmafm.models.clip.text_tower_config("tiny", context_length=16)).eval()
    twin = _open_clip_twin(model)
    tokens = bpe(["a red circle", "two small blue squares on the left", "x"])
    with torch.no_grad():
        ours = model.encode_text(tokens, normalize=False)
        theirs = twin.encode_text(tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_text_tower_is_causal_and_pools_at_end(bpe):
    model = tiny_clip().eval()
    tokens = load_caption_tokenizer("openclip", 32)(["a red circle"])
    changed = tokens.clone()
    end = int(eot_positions(tokens, model.config.text.eot_id, 0))
    changed[0, end + 1 :] = 123  # tokens after the end token cannot reach it
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(changed))


@pytest.mark.parametrize("variant", [dict(ffn="swiglu", norm="rmsnorm", position="rope")])
def test_afm_style_text_tower(variant, bpe):
    text = mmafm.models.clip.text_tower_config("tiny", context_length=16, **variant)
    model = tiny_clip(text=text)
    out = model(torch.randn(2, 3, 32, 32), bpe(["a", "b c"]))
    (out["image_features"] @ out["text_features"].T).sum().backward()
    assert model.text.blocks[0].mlp.w_gate.weight.grad is not None


# --------------------------------------------------------------------------------- losses
def _naive_clip_loss(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _naive_siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    signs = 2 * torch.eye(len(logits)) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def test_clip_loss_equals_open_clip_and_closed_form(bpe):
    from mmafm.stages.clip_pretrain import ClipTask

    model = tiny_clip()
    images, tokens = torch.randn(6, 3, 32, 32), bpe([f"caption {i}" for i in range(6)])
    task = ClipTask(model, "clip", held_out={})
    losses, metrics = task.training_forward((images, tokens))
    logits_per_image, logits_per_text = model.get_logits(images, tokens)
    torch.testing.assert_close(logits_per_text, logits_per_image.T)
    out = model(images, tokens)
    reference = open_clip.loss.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    torch.testing.assert_close(losses["contrastive"], reference)
    torch.testing.assert_close(losses["contrastive"], _naive_clip_loss(logits_per_image))
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_siglip_loss_and_bias(bpe):
    from mmafm.stages.clip_pretrain import ClipTask

    model = tiny_clip(loss="siglip")
    assert model.scale().item() == pytest.approx(10.0) and model.logit_bias.item() == pytest.approx(-10.0)
    images, tokens = torch.randn(5, 3, 32, 32), bpe([f"caption {i}" for i in range(5)])
    losses, _ = ClipTask(model, "siglip", held_out={}).training_forward((images, tokens))
    logits, _ = model.get_logits(images, tokens)
    out = model(images, tokens)
    reference = open_clip.loss.SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    torch.testing.assert_close(losses["contrastive"], reference)
    torch.testing.assert_close(losses["contrastive"], _naive_siglip_loss(logits))


def test_logit_scale_is_clamped_and_learnable(bpe):
    model = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    out = model(torch.randn(4, 3, 32, 32), bpe(["a", "b", "c", "d"]))
    open_clip.loss.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    assert "logit_scale" in model.no_weight_decay() and "visual.pos_embed" in model.no_weight_decay()


# ------------------------------------------------------------------------- image tower, FLIP
def test_any_vision_preset_and_flip_masking(bpe):
    model = tiny_clip(image_preset="vitdet_large_patch16_rw_tiny")
    assert model(torch.randn(2, 3, 32, 32), bpe(["a", "b"]))["image_features"].shape == (2, 64)
    with pytest.raises(ValueError, match="does not support FLIP patch masking"):
        tiny_clip(image_preset="vitdet_large_patch16_tiny", mask_ratio=0.5)
    masked = tiny_clip(mask_ratio=0.5)
    images = torch.randn(2, 3, 32, 32)
    masked.eval()  # no masking in eval: deterministic
    torch.testing.assert_close(masked.encode_image(images), masked.encode_image(images))
    masked.train()
    assert not torch.allclose(masked.encode_image(images), masked.encode_image(images))


def test_full_size_presets_build_on_meta():
    counts = {}
    for name in ("clip_vit_base_patch16", "clip_vit_giant_patch14", "clip_vitdet_large_patch16_rw"):
        model = mmafm.create_model(name, device="meta")
        counts[name] = sum(p.numel() for p in model.parameters())
    # open_clip ViT-B-16 has 149,620,737 parameters; ours differs by its ln_pre (2 x 768) less the
    # timm patch-embedding bias (768) that open_clip's conv1 lacks.
    assert counts["clip_vit_base_patch16"] == 149_620_737 - 2 * 768 + 768
    assert 1.2e9 < counts["clip_vit_giant_patch14"] < 1.5e9
    assert 0.35e9 < counts["clip_vitdet_large_patch16_rw"] < 0.5e9


# --------------------------------------------------------------------------- checkpoints
def test_save_and_load_clip(tmp_path, bpe):
    model = tiny_clip()
    model.tokenizer = load_caption_tokenizer("openclip", 32)
    path = save_model(tmp_path / "clip", model)
    loaded = load_model(path, family="clip")
    images = torch.randn(3, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(loaded.encode_text(["a red circle"]), model.encode_text(["a red circle"]))
    tower_path = save_image_tower(model, tmp_path / "tower")
    tower = load_model(tower_path)
    torch.testing.assert_close(tower.forward_head(tower.forward_features(images), pre_logits=True), model.image_features(images))
    save_checkpoint(tmp_path / "other", {"x": torch.zeros(1)}, {"kind": "something else"})
    with pytest.raises(CheckpointError, match="holds no model record"):
        load_model(tmp_path / "other", family="clip")
    with pytest.raises(CheckpointError, match="holds a 'vit' model, expected family 'clip'"):
        load_model(tower_path, family="clip")


# ---------------------------------------------------------------------------- evaluation
class OneHotEncoder(torch.nn.Module):
    """Image i's embedding is the one-hot of the class stored in its pixels; a prompt's is the
    one-hot of the class whose name it contains."""

    def __init__(self, class_names):
        super().__init__()
        self.class_names = list(class_names)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def tokenize(self, prompts):
        ids = [next(i for i, name in enumerate(self.class_names) if f" {name}" in f" {p}") for p in prompts]
        return torch.tensor(ids)[:, None]  # (N, 1)

    def encode_image(self, images):
        return F.one_hot(images[:, 0, 0, 0].long(), len(self.class_names)).float()

    def encode_text(self, tokens):
        return F.one_hot(tokens[:, 0], len(self.class_names)).float()


def test_zero_shot_known_answer():
    names = ["cat", "dog", "bird", "fish"]
    encoder = OneHotEncoder(names)
    true = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    shown = torch.tensor([0, 1, 2, 3, 3, 2, 0, 1])  # the last two images look like the other class
    images = shown.float()[:, None, None, None].expand(-1, 3, 4, 4)
    result = zero_shot_classification(encoder, images, true, names, ["a {}", "a photo of a {}"], encoder.tokenize)
    assert result.top1 == pytest.approx(6 / 8)
    assert result.top5 == 1.0  # 4 classes: always within the top 5
    assert result.chance == pytest.approx(0.25)
    expected = np.zeros((4, 4), dtype=int)
    for t, p in zip(true.tolist(), shown.tolist()):
        expected[t, p] += 1
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.per_class == pytest.approx([0.5, 0.5, 1.0, 1.0])
    classes = class_embeddings(encoder, names, ["a {}"], encoder.tokenize)
    torch.testing.assert_close(classes, torch.eye(4))


def test_zero_shot_rejects_bad_input():
    encoder = OneHotEncoder(["a", "b"])
    with pytest.raises(ValueError, match="labels must be in"):
        zero_shot_classification(encoder, torch.zeros(2, 3, 2, 2), torch.tensor([0, 5]), ["a", "b"], ["{}"], encoder.tokenize)
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        zero_shot_classification(encoder, torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), ["a", "b"], ["x"], encoder.tokenize)


def test_retrieval_known_ranks():
    # Similarity of image i to caption j; the correct caption of image i is j = i.
    sim = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # rank 1
        [0.5, 0.4, 0.0, 0.0, 0.0, 0.0],  # rank 2
        [0.9, 0.8, 0.0, 0.6, 0.5, 0.7],  # rank 6 (last)
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # rank 1
        [0.0, 0.0, 0.0, 0.0, 0.3, 0.2],  # rank 1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # rank 1
    ])
    # Features whose cosine similarities are (a monotone map of) sim: images = rows, texts = identity.
    metrics = retrieval_metrics(sim, torch.eye(6), ks=(1, 5))
    assert metrics["i2t_R@1"] == pytest.approx(4 / 6)
    assert metrics["i2t_R@5"] == pytest.approx(5 / 6)
    # text->image compares one caption's scores across images, so the row normalisation counts
    normed = F.normalize(sim, dim=-1)
    ranks_t2i = [(normed[:, j] > normed[j, j]).sum().item() + 1 for j in range(6)]
    assert metrics["t2i_R@1"] == pytest.approx(sum(r <= 1 for r in ranks_t2i) / 6)
    assert metrics["chance_i2t_R@1"] == pytest.approx(1 / 6) and metrics["chance_t2i_R@5"] == pytest.approx(5 / 6)


def test_retrieval_with_repeated_captions():
    images = torch.eye(4)
    texts = torch.eye(4)[[1, 0, 2, 3]]  # images 0 and 1 retrieve each other's caption...
    plain = retrieval_metrics(images, texts, ks=(1,))
    assert plain["i2t_R@1"] == pytest.approx(0.5)
    grouped = retrieval_metrics(images, texts, ks=(1,), groups=["two cats", "two cats", "a dog", "a fish"])
    assert grouped["i2t_R@1"] == 1.0  # ...which is right: both say "two cats"
    # chance: 2 of 4 queries have 2 correct answers among 4
    assert grouped["chance_i2t_R@1"] == pytest.approx((2 * 0.5 + 2 * 0.25) / 4)


def test_chance_recall_matches_simulation():
    positives = torch.zeros(5, 9, dtype=torch.bool)
    for row, count in enumerate([1, 2, 3, 1, 4]):
        positives[row, :count] = True
    rng = np.random.default_rng(0)
    trials = [positives[r, rng.permutation(9)[:3]].any().item() for r in range(5) for _ in range(4000)]
    assert chance_recall(positives, 3) == pytest.approx(np.mean(trials), abs=0.02)


def test_fashion_mnist_tensor():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[1] = 255
    out = fashion_mnist_tensor(images, 16, mean=(0.5,) * 3, std=(0.5,) * 3, invert=True)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0], torch.ones(3, 16, 16))  # black background -> white -> +1
    torch.testing.assert_close(out[1], -torch.ones(3, 16, 16))
