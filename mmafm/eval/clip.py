"""Evaluation of contrastive image-text models: zero-shot classification and retrieval.

- Zero-shot classification (Radford et al. 2021, section 3.1.4): each class is the mean of the
  L2-normalized text embeddings of prompt templates filled with its name; an image is assigned
  the class whose embedding has the largest cosine similarity with its own.
- Image<->text retrieval recall@k on held-out pairs: for each image, is its caption among the k
  most similar captions (image->text), and vice versa (text->image). Captions that occur several
  times (the shapes data repeats short descriptions) make every pair sharing the caption a
  correct answer; the chance level of each query is then computed exactly, not assumed 1/N.

Every function takes a model-like object with ``encode_image(images)`` and
``encode_text(tokens)`` (a :class:`mmafm.models.clip.CLIP` or anything shaped like it), so the
metrics can be checked on constructed encoders whose answers are known.

:func:`evaluate_clip` runs both on the held-out set the CLIP stage builds (Fashion-MNIST test images
and the data stage's ``val`` pairs); every metric the stage logs comes from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FASHION_MNIST_TEMPLATES",
    "FASHION_MNIST_PROMPT_NAMES",
    "ZeroShotResult",
    "class_embeddings",
    "zero_shot_classification",
    "embed_images",
    "embed_texts",
    "retrieval_metrics",
    "chance_recall",
    "fashion_mnist_tensor",
    "evaluate_clip",
]

# Prompt templates and class words [open], chosen as CLIP chose its prompts -- on held-out images
# that are not the reported ones: 12 template sets x 4 name sets were compared on 2,000
# Fashion-MNIST *train* images (inverted) with the CLIP of the tiny pipeline (configs/stages/
# 00_data.yaml + 01_clip_pretrain.yaml); numbers are reported on the test split only. The
# templates follow the drawn garment captions (mmafm.data.garments: "a drawing of a red striped
# t-shirt"), ensembled over six colours as CLIP ensembles over its 80 templates; the colour words
# that the grey product photos can match scored best (the colourless "a {}" / "a drawing of a {}" /
# "a picture of a {}" / "a photo of a {}": 19% top-1 on those train images; this ensemble: 36%).
FASHION_MNIST_TEMPLATES = tuple(
    f"a drawing of a {colour} {{}}" for colour in ("black", "grey", "dark grey", "white", "dark blue", "brown")
)
FASHION_MNIST_PROMPT_NAMES = {  # the keys are fashion_mnist.CLASS_NAMES
    "T-shirt/top": "t-shirt",
    "Trouser": "pair of trousers",
    "Pullover": "pullover",
    "Dress": "dress",
    "Coat": "coat",
    "Sandal": "sandal",
    "Shirt": "shirt",
    "Sneaker": "sneaker",
    "Bag": "bag",
    "Ankle boot": "ankle boot",
}


@dataclass
class ZeroShotResult:
    """What zero-shot classification found."""

    top1: float  # accuracy, in [0, 1]
    top5: float  # top-5 accuracy (1.0 when there are at most 5 classes)
    per_class: list[float]  # recall of each class (NaN for a class without images)
    confusion: np.ndarray  # (C, C) counts, rows = true class, columns = predicted
    predictions: np.ndarray  # (N,) predicted class per image
    chance: float  # accuracy of a uniform random guess: 1 / C

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_top1": self.top1, f"{prefix}_top5": self.top5}


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


@torch.no_grad()
def embed_images(model: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:  # (N, E)
    """L2-normalized image embeddings, computed in batches (on CPU afterwards)."""
    device = _device(model)
    out = [F.normalize(model.encode_image(images[rows].to(device)).float(), dim=-1).cpu() for rows in _batches(len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def embed_texts(model: Any, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:  # (N, E)
    """L2-normalized text embeddings of token ids ``(N, T)``, computed in batches."""
    device = _device(model)
    out = [F.normalize(model.encode_text(tokens[rows].to(device)).float(), dim=-1).cpu() for rows in _batches(len(tokens), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def class_embeddings(
    model: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[Sequence[str]], torch.Tensor],
) -> torch.Tensor:  # (C, E)
    """One unit vector per class: the renormalized mean of its prompts' unit embeddings."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = embed_texts(model, tokenize(prompts))  # (C * K, E)
    embeddings = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)


@torch.no_grad()
def zero_shot_classification(
    model: Any,
    images: torch.Tensor,  # (N, 3, H, W), normalized as in training
    labels: torch.Tensor | np.ndarray,  # (N,) class indices
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int = 256,
) -> ZeroShotResult:
    """Classify ``images`` among ``class_names`` by prompt similarity (no training on them)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many images as labels (>0), got {len(images)} images, {len(labels)} labels")
    num_classes = len(class_names)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    classes = class_embeddings(model, class_names, templates, tokenize)  # (C, E)
    scores = embed_images(model, images, batch_size) @ classes.T  # (N, C)
    top = scores.topk(min(5, num_classes), dim=1).indices  # (N, k)
    predictions = top[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predictions.numpy()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = (np.diag(confusion) / confusion.sum(axis=1)).tolist()
    return ZeroShotResult(
        top1=float((predictions == labels).float().mean()),
        top5=float((top == labels[:, None]).any(dim=1).float().mean()),
        per_class=per_class,
        confusion=confusion,
        predictions=predictions.numpy(),
        chance=1.0 / num_classes,
    )


def _positives(groups: Sequence[Hashable] | None, n: int) -> torch.Tensor:  # (N, N) bool
    if groups is None:
        return torch.eye(n, dtype=torch.bool)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} pairs")
    ids = {}
    codes = torch.tensor([ids.setdefault(g, len(ids)) for g in groups])
    return codes[:, None] == codes[None, :]


def chance_recall(positives: torch.Tensor, k: int) -> float:
    """Expected recall@k of a random ranking: mean over queries of ``1 - C(N-m, k) / C(N, k)``."""
    n = positives.shape[1]
    k = min(k, n)
    values = []
    for m in positives.sum(dim=1).tolist():
        miss = math.comb(n - m, k) / math.comb(n, k) if n - m >= k else 0.0
        values.append(1.0 - miss)
    return float(np.mean(values))


def retrieval_metrics(
    image_features: torch.Tensor,  # (N, E)
    text_features: torch.Tensor,  # (N, E), row i = the caption of image i
    ks: Sequence[int] = (1, 5),
    groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Recall@k both ways, plus each one's chance level.

    Args:
        image_features: Image embeddings (normalized or not; cosine similarity is used).
        text_features: Caption embeddings in the same order.
        ks: The k of recall@k.
        groups: Optional key per pair (e.g. the caption string); pairs with equal keys count as
            correct answers for each other. None = only the pair itself.

    Returns:
        ``{"i2t_R@k", "t2i_R@k", "chance_i2t_R@k", "chance_t2i_R@k"}`` for each k, in [0, 1].
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2 or len(image_features) == 0:
        raise ValueError(
            f"need (N, E) image and text features of the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    n = len(image_features)
    positives = _positives(groups, n)
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    metrics = {}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
        for k in ks:
            top = scores.topk(min(k, n), dim=1).indices  # (N, k)
            hits = positives.gather(1, top).any(dim=1)
            metrics[f"{direction}_R@{k}"] = float(hits.float().mean())
            metrics[f"chance_{direction}_R@{k}"] = chance_recall(positives, k)
    return metrics


def fashion_mnist_tensor(
    images: np.ndarray,  # (N, 28, 28) uint8
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    invert: bool = True,
) -> torch.Tensor:  # (N, 3, S, S)
    """Fashion-MNIST as normalized RGB tensors at the model's resolution.

    Args:
        images: The uint8 grey images (white garment on black).
        image_size: Output side (bilinear resize).
        mean: Per-channel mean of the training normalization.
        std: Per-channel std of the training normalization.
        invert: Dark garment on white, like the training pictures (emoji, clip art, drawn shapes
            on light backgrounds) [open: a fixed, label-free domain choice].
    """
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) grey images, got shape {images.shape}")
    pixels = torch.tensor(images, dtype=torch.float32).div(255.0)  # (N, H, W), a copy of read-only data
    if invert:
        pixels = 1.0 - pixels
    pixels = pixels[:, None].expand(-1, 3, -1, -1)  # (N, 3, H, W)
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.clamp(0, 1) - mean_t) / std_t


def evaluate_clip(model: Any, held_out: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Zero-shot Fashion-MNIST and held-out image<->text retrieval, in eval mode.

    Args:
        model: A CLIP-like model (``encode_image``, ``encode_text``); its train/eval mode is
            restored afterwards.
        held_out: ``fmnist_images`` ``(N, 3, S, S)``, ``fmnist_labels`` ``(N,)``,
            ``fmnist_prompts`` (one prompt name per class), ``tokenize`` (captions -> ids),
            ``val_images`` ``(M, 3, S, S)``, ``val_tokens`` ``(M, T)`` and ``val_captions`` (the
            caption strings: equal captions count as correct answers for each other).

    Returns:
        ``(metrics, details)``: ``fmnist_top1`` / ``fmnist_top5`` / ``fmnist_chance`` plus
        :func:`retrieval_metrics` at k = 1 and 5; ``details`` holds the
        :class:`ZeroShotResult` (``zero_shot``) and the ``(M, M)`` image-caption cosine
        similarities (``similarity``) for figures.
    """
    was_training = model.training
    model.eval()
    zero_shot = zero_shot_classification(
        model, held_out["fmnist_images"], held_out["fmnist_labels"], held_out["fmnist_prompts"],
        FASHION_MNIST_TEMPLATES, held_out["tokenize"],
    )
    image_features = embed_images(model, held_out["val_images"])  # (M, E)
    text_features = embed_texts(model, held_out["val_tokens"])  # (M, E)
    retrieval = retrieval_metrics(image_features, text_features, ks=(1, 5), groups=held_out["val_captions"])
    model.train(was_training)
    metrics = {"fmnist_top1": zero_shot.top1, "fmnist_top5": zero_shot.top5, "fmnist_chance": zero_shot.chance}
    metrics.update(retrieval)
    details = {"zero_shot": zero_shot, "similarity": image_features @ text_features.T}
    return metrics, details
