"""The evaluation library (mmafm.eval) against independent references: perplexity as exp of a
per-token NLL written out by hand, retrieval on hand-placed unit vectors whose ranks are known,
chance levels by enumerating every ranking, open_clip's zero-shot classifier, and caption scoring
on a constructed captioner whose likelihoods have a closed form."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmafm
from mmafm.eval import (
    MAX_LOG_PERPLEXITY,
    caption_perplexity,
    chance_recall,
    class_embeddings,
    evaluate_captions,
    evaluate_clip,
    generate_captions,
    held_out_perplexity,
    perplexity,
    retrieval_metrics,
    zero_shot_classification,
)
from mmafm.models.multimodal import IGNORE_INDEX


# ------------------------------------------------------------------------ held-out perplexity
class TinyLM(nn.Module):
    """Embedding + linear head: logits of the next token from the current one."""

    def __init__(self, vocab: int, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(self.embed(ids))


def _batches(vocab: int, shapes: list[tuple[int, int]], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(vocab, shape, generator=generator), torch.randint(vocab, shape, generator=generator))
        for shape in shapes
    ]


def _naive_mean_nll(model: nn.Module, batches) -> float:
    """One token at a time, in float64: -log softmax(logits)[target], averaged over all tokens."""
    nlls = []
    with torch.no_grad():
        for ids, targets in batches:
            logits = model(ids).double()
            for b in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    nlls.append(F.cross_entropy(logits[b, t][None], targets[b, t][None]).item())
    return sum(nlls) / len(nlls)


def test_perplexity_is_exp_of_mean_nll_per_token():
    torch.manual_seed(0)
    model = TinyLM(vocab=11)
    batches = _batches(11, [(2, 5), (3, 4), (1, 7)])  # unequal batches: a token-weighted mean
    result = held_out_perplexity(model, batches)
    expected = _naive_mean_nll(model, batches)
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert result["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_perplexity_of_a_real_text_model():
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=64).eval()
    batches = _batches(64, [(2, 6), (1, 9)], seed=1)
    result = held_out_perplexity(model, batches)
    assert result["val_ppl"] == pytest.approx(math.exp(_naive_mean_nll(model, batches)), rel=1e-5)


def test_uniform_model_has_the_vocabulary_as_perplexity():
    model = TinyLM(vocab=37)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)  # every logit 0: p = 1/37 for every token
    result = held_out_perplexity(model, _batches(37, [(2, 3)]))
    assert result["val_loss"] == pytest.approx(math.log(37), rel=1e-6)
    assert result["val_ppl"] == pytest.approx(37.0, rel=1e-6)


def test_perplexity_is_capped_not_overflowing():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e4) == math.exp(MAX_LOG_PERPLEXITY)  # exp(1e4) would overflow
    assert held_out_perplexity(TinyLM(5), []) == {"val_loss": 0.0, "val_ppl": 1.0}


# --------------------------------------------------------------------------------- retrieval
def _unit(degrees: list[float]) -> torch.Tensor:  # (N, 2)
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# Images at 0, 90, 180, 270 degrees; caption j belongs to image j. Cosine similarity falls with the
# angle between them, so the ranks can be read off by hand:
#   image 0: c0 (10) < c3 (60) < c1 (80) < c2 (100)  -> hit at 1
#   image 1: c1 (10) < c0 (80) < c3 (150) < c2 (170) -> hit at 1
#   image 2: c2 (80) < c1 (100) < c3 (120) < c0 (170) -> hit at 1
#   image 3: c2 (10) < c3 (30) < c0 (100) < c1 (170) -> hit at 2
#   caption 0 (10):  i0 (10) first                   -> hit at 1
#   caption 1 (80):  i1 (10) first                   -> hit at 1
#   caption 2 (260): i3 (10) < i2 (80)               -> hit at 2
#   caption 3 (300): i3 (30) first                   -> hit at 1
IMAGES = _unit([0, 90, 180, 270])
CAPTIONS = _unit([10, 80, 260, 300])


def test_retrieval_recall_on_hand_placed_vectors():
    metrics = retrieval_metrics(IMAGES, CAPTIONS, ks=(1, 2))
    assert metrics["i2t_R@1"] == pytest.approx(3 / 4) and metrics["i2t_R@2"] == 1.0
    assert metrics["t2i_R@1"] == pytest.approx(3 / 4) and metrics["t2i_R@2"] == 1.0
    # one correct answer among 4: chance R@1 = 1/4, R@2 = 1 - C(3,2)/C(4,2) = 1/2
    assert metrics["chance_i2t_R@1"] == pytest.approx(1 / 4) and metrics["chance_t2i_R@2"] == pytest.approx(1 / 2)


def test_retrieval_counts_equal_captions_as_correct():
    # captions 2 and 3 have the same text: image 3's first answer (caption 2) is now right, and so
    # is caption 2's first answer (image 3)
    metrics = retrieval_metrics(IMAGES, CAPTIONS, ks=(1,), groups=["a", "b", "c", "c"])
    assert metrics["i2t_R@1"] == 1.0 and metrics["t2i_R@1"] == 1.0
    assert metrics["chance_i2t_R@1"] == pytest.approx((1 / 4 + 1 / 4 + 2 / 4 + 2 / 4) / 4)


def test_chance_recall_equals_the_mean_over_every_ranking():
    positives = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    for k in (1, 2, 3, 5):
        hits = [
            positives[row, list(order[:k])].any().item()
            for row in range(4) for order in itertools.permutations(range(5))
        ]
        assert chance_recall(positives, k) == pytest.approx(np.mean(hits), abs=1e-12), k


# --------------------------------------------------------------------------------- zero-shot
class GradedEncoder(nn.Module):
    """Images are their own embeddings (``(N, C)`` score vectors); a prompt embeds as the one-hot
    of the class whose name it holds."""

    def __init__(self, class_names: list[str]):
        super().__init__()
        self.class_names = class_names
        self.anchor = nn.Parameter(torch.zeros(1))

    def tokenize(self, prompts):
        return torch.tensor([[next(i for i, n in enumerate(self.class_names) if p.endswith(n))] for p in prompts])

    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return F.one_hot(tokens[:, 0], len(self.class_names)).float()


def test_zero_shot_accuracy_on_a_constructed_case():
    names = [f"class{i}" for i in range(7)]
    descending = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])  # class 0 first ... class 6 last
    images = torch.stack([
        torch.roll(descending, 2),  # best class 2: right
        torch.roll(descending, 5),  # best class 5: right
        descending,                 # best class 0, label 3 is 4th best: top-5 hit only
        descending,                 # best class 0, label 6 is last: miss in both
    ])
    labels = torch.tensor([2, 5, 3, 6])
    encoder = GradedEncoder(names)
    result = zero_shot_classification(encoder, images, labels, names, ["a {}"], encoder.tokenize, batch_size=3)
    assert result.top1 == pytest.approx(2 / 4)
    assert result.top5 == pytest.approx(3 / 4)
    assert result.predictions.tolist() == [2, 5, 0, 0]
    assert result.chance == pytest.approx(1 / 7)


def test_class_embeddings_equal_open_clip_zero_shot_classifier():
    pytest.importorskip("open_clip")
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from mmafm.tokenizer import load_caption_tokenizer

    torch.manual_seed(0)
    model = mmafm.create_model("clip_tiny", image_size=32).eval()
    tokenizer = load_caption_tokenizer("openclip", model.config.text.context_length)
    names = ["circle", "square", "star"]
    templates = ["a {}", "a drawing of a {}", "a red {}"]
    ours = class_embeddings(model, names, templates, tokenizer)  # (C, E)
    theirs = build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=2)  # (E, C)
    torch.testing.assert_close(ours, theirs.T, rtol=1e-5, atol=1e-6)

    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    result = zero_shot_classification(model, images, labels, names, templates, tokenizer)
    with torch.no_grad():
        reference = (model.encode_image(images) @ theirs).argmax(dim=1)
    assert result.predictions.tolist() == reference.tolist()
    assert result.top1 == pytest.approx(float((reference == labels).float().mean()))


def test_evaluate_clip_combines_both_and_restores_the_mode():
    names = ["cat", "dog", "bird"]
    encoder = GradedEncoder(names).train()
    held_out = {
        "fmnist_images": torch.eye(3)[[0, 1, 2, 2]],
        "fmnist_labels": torch.tensor([0, 1, 2, 1]),
        "fmnist_prompts": names,
        "tokenize": encoder.tokenize,
        "val_images": torch.eye(3),
        "val_tokens": torch.tensor([[0], [2], [1]]),  # captions of images 1 and 2 swapped
        "val_captions": ["a cat", "a dog", "a bird"],
    }
    metrics, details = evaluate_clip(encoder, held_out)
    assert encoder.training
    assert metrics["fmnist_top1"] == pytest.approx(3 / 4) and metrics["fmnist_chance"] == pytest.approx(1 / 3)
    assert metrics["i2t_R@1"] == pytest.approx(1 / 3) and metrics["t2i_R@1"] == pytest.approx(1 / 3)
    torch.testing.assert_close(details["similarity"], torch.eye(3)[:, [0, 2, 1]])


# ---------------------------------------------------------------------------------- captions
BOS, IMAGE, EOS, PAD = 1, 2, 3, 0
VOCAB = 16
PREFERENCE = 5.0  # logit of an image's preferred token; every other logit is 0


class WordTokenizer:
    """Captions are space-separated token ids."""

    bos_id, image_id, eos_id, pad_id = BOS, IMAGE, EOS, PAD

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


class PreferenceCaptioner(nn.Module):
    """A stand-in for MultimodalModel: every position predicts the image's preferred token (the
    value in its pixels) with logit ``PREFERENCE``, everything else with logit 0; the
    ``<image>`` slot carries no label, as the real model's image tokens do."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(pad_token_id=PAD)
        self.prompts = None

    def forward(self, ids, images, mode, labels):
        preferred = images[:, 0, 0, 0].long()  # (B,)
        logits = torch.zeros(*ids.shape, VOCAB) + self.anchor  # (B, T, V)
        logits[torch.arange(len(ids)), :, preferred] = PREFERENCE
        labels = labels.masked_fill(ids == IMAGE, IGNORE_INDEX)
        return SimpleNamespace(logits=logits, labels=labels)

    def generate(self, images, prompt, mode, max_new_tokens, eos_id):
        self.prompts = prompt
        return torch.tensor([[10, EOS, 7], [11, 12, EOS]])[: len(images)]


def _images(preferred: list[int]) -> torch.Tensor:  # (N, 3, 2, 2) holding each preferred token
    return torch.tensor(preferred, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 2, 2)


def test_pick_the_caption_and_perplexity_on_a_constructed_captioner():
    model = PreferenceCaptioner()
    captions = ["10", "11", "12", "13"]  # image i prefers token 10 + i: its caption's one word
    metrics = evaluate_captions(model, WordTokenizer(), _images([10, 11, 12, 13]), captions, "balanced",
                                num_candidates=4)
    # Under its own image the true caption's word gets logit 5, every other candidate's 0 (EOS
    # scores the same for all): always picked. Under another image, that image's own caption
    # wins: the truth never is.
    assert metrics["choice_accuracy"] == 1.0
    assert metrics["choice_accuracy_wrong_image"] == 0.0
    assert metrics["choice_chance"] == pytest.approx(1 / 4) and metrics["eval_pairs"] == 4
    # closed form: each caption is [word, EOS]; log Z = log(e^5 + V - 1)
    log_z = math.log(math.exp(PREFERENCE) + VOCAB - 1)
    mean_nll = ((log_z - PREFERENCE) + log_z) / 2
    assert metrics["caption_ppl"] == pytest.approx(math.exp(mean_nll), rel=1e-5)


def test_caption_perplexity_weights_every_token_equally():
    sums = torch.tensor([-2.0, -9.0])
    counts = torch.tensor([1, 3])
    assert caption_perplexity(sums, counts) == pytest.approx(math.exp(11.0 / 4))


def test_generated_captions_stop_at_eos():
    model = PreferenceCaptioner().train()
    texts = generate_captions(model, WordTokenizer(), _images([10, 11]), "balanced", max_new_tokens=3)
    assert texts == ["10", "11 12"]
    assert model.prompts == [[BOS, IMAGE], [BOS, IMAGE]]
    assert model.training  # the mode is restored
