"""Stage 06: multimodal adaptation, continued pretraining with images that keeps the text intact.

The 2025 report adds image understanding to the pretrained text model by continuing its
pretraining on a mixture of text-only data, image-text pairs and interleaved image-text
documents, and reports that the model gains image understanding without losing its text
abilities (issue 13, section 3; REFERENCE.md, "Vision encoders" and "Vision-language adapter").
This stage does that at tiny scale:

1. the model: the CLIP stage's image tower (``image_tower``, 01) -> a *freshly initialised*
   vision-language adapter -> the text model (``text_checkpoint``: 04's in the tiny
   pipeline, or 02's), assembled by :func:`mmafm.stages.vl_alignment.build_model`, the code 03 uses;
2. the data, from the data stage: text windows of ``tokens_dir``, image-caption rows
   ``<s> <image> caption </s>`` of ``pairs_dir`` (03's layout), and interleaved documents
   built from those pairs by :mod:`mmafm.data.interleaved` (several images of one source inside
   a text, their captions around them);
3. every batch holds a fixed number of rows of each kind, set by the ``mixture`` knob
   (``text=W,pairs=W,interleaved=W``, shares of rows; :func:`rows_per_kind`); the loss is the
   decoder's next-token loss over all target tokens of the batch, as in pretraining;
4. held-out evaluation *before and after*: the text model's perplexity on the data stage's
   ``val.bin`` (the report's claim: it should not get worse), 03's image-text metrics (caption
   perplexity, "pick the right caption" against chance and against a wrong image), and the
   perplexity of held-out interleaved documents; a figure of the curves and the before/after bars;
5. optionally, the trade-off the knob sets (``compare_mixtures``): each listed mixture trained
   ``compare_steps`` steps from the same start (the same fresh adapter, the same text model), then
   its text perplexity change against its "pick the right caption" accuracy, one point per
   mixture (figure ``mixture_tradeoff``, summary ``mixture_comparison``).

What trains (fields ``train_vision`` / ``train_adapter`` / ``train_text``): the adapter (fresh:
it must), the text model (continued pretraining changes it; the text-only share of the mixture is
what protects it), and not the CLIP tower (kept as 01 trained it). With ``train_text = false`` the
text model is bitwise unchanged and its perplexity after equals before exactly (a test checks it).

Outputs: ``checkpoint`` (the multimodal model), ``text_model`` (its text decoder alone, for the
text stages that follow), ``preset``, ``tokenizer``, ``mode``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmafm.config import ConfigError
from mmafm.models.adapter import MODES
from mmafm.models.multimodal import IGNORE_INDEX, MultimodalModel
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig
from mmafm.train.trainer import setting

__all__ = [
    "MultimodalAdaptationConfig",
    "KINDS",
    "parse_mixture",
    "parse_mixture_list",
    "rows_per_kind",
    "MixtureRow",
    "collate_rows",
    "MixtureBatches",
    "scale_text_lr",
    "AdaptationTask",
    "rows_nll",
    "run",
]

STAGE = "06_multimodal_adaptation"
KINDS = ("text", "pairs", "interleaved")  # the mixture's row kinds, in this order everywhere


@dataclass
class MultimodalAdaptationConfig(TrainStageConfig):
    """Stage 06. Defaults are the tiny CPU run (~95 s of CPU time on one thread, docs/training.md)."""

    # --- inputs (a pipeline wires them from upstream manifests; all required) ---
    pairs_dir: str = field(default="", metadata={"path": "dir"})  # 00_data `pairs_dir`: pairs and the interleaved documents' images
    tokens_dir: str = field(default="", metadata={"path": "dir"})  # 00_data `tokens_dir`: text-only rows (train.bin) and held-out text (val.bin)
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data `tokenizer` (.model), the text model's
    image_tower: str = field(default="", metadata={"path": "model"})  # 01_clip_pretrain `image_tower`
    image_preset: str = ""  # 01_clip_pretrain `image_preset`
    text_checkpoint: str = field(default="", metadata={"path": "model"})  # the text model: 04_continued_pretrain `checkpoint` (the tiny pipeline), or 02_text_pretrain's
    text_preset: str = ""  # that stage's `preset`
    model_preset: str = "afm_vl_tiny"  # multimodal preset supplying the adapter and mode table
    # --- what trains [open: see the module docstring and docs/training.md] ---
    train_vision: bool = False  # the CLIP tower stays as 01 trained it [open]
    train_adapter: bool = True  # the adapter is fresh, so it trains
    train_text: bool = True  # continued pretraining of the text model [issue 13: "continued pretraining with images"]
    # --- the mixture (the knob) ---
    mixture: str = "text:0.45,pairs:0.5,interleaved:0.05"  # row shares per batch [open, measured: docs/training.md; MM1 (McKinzie et al. 2024) pretrained on 10% text / 45% pairs / 45% interleaved]
    loss_weighting: str = field(default="tokens", metadata={"choices": ("tokens", "kinds")})  # "tokens": one mean over all target tokens, as pretraining; "kinds": each kind's mean, weighted by `mixture` [open]
    seq_len: int = field(default=64, metadata={"min": 8})  # tokens per text-only row (and per held-out text row)
    min_images: int = field(default=2, metadata={"min": 1})  # fewest images in an interleaved document [open]
    max_images: int = field(default=3, metadata={"min": 1})  # most images in an interleaved document [open]
    max_caption_tokens: int = field(default=40, metadata={"min": 4})  # caption tokens kept (EOS included), as in 03
    max_document_tokens: int = field(default=160, metadata={"min": 8})  # interleaved document tokens kept (before image expansion)
    # --- resolution (as 03) ---
    mode: str = field(default="balanced", metadata={"choices": MODES})  # resolution mode trained and evaluated [2nd: balanced 672]
    image_size: int = field(default=64, metadata={"min": 0})  # side of one view in `mode`; 0 = preset's [paper: 672; tiny: 64 = data stage]
    image_tokens: int = field(default=16, metadata={"min": 0})  # tokens per view in `mode` (a square); 0 = preset's [paper: 144]
    # --- optimisation ---
    # (schedule, grad_accum_steps, grad_clip, precision, log_every: the trainer's defaults, TrainSettings)
    max_steps: int = setting("max_steps", 200)  # optimizer steps (image use shows after ~1,500-3,000 caption rows: docs/training.md)
    optimizer: str = setting("optimizer", "adamw")  # [open: the report names no optimizer for this stage; AdamW as 03, whose lr it shares]
    text_lr_scale: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})  # the text model's LR = lr x this [open; 0.1 kept the decoder from learning to read images, 0.5 halves the text cost: docs/training.md]
    batch_size: int = field(default=24, metadata={"min": 1})  # rows per step, split between the kinds by `mixture` (11 / 12 / 1 at the default)
    lr: float = setting("lr", 3e-3)  # peak LR, the fresh adapter's (the text model: x text_lr_scale) [open: 1e-3 and 1e-2 were not better here]
    warmup_steps: int = setting("warmup_steps", 20)  # linear warm-up: the fresh adapter's first steps are large
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)  # final LR / peak (cosine) [open]
    weight_decay: float = setting("weight_decay", 0.05)  # decoupled decay [open, as 03]
    parallel: str = setting("parallel", "none", choices=("none",))  # one process: not run under torchrun yet
    eval_every: int = setting("eval_every", 40)  # steps between the small held-out checks of the figure; 0 = end only
    ckpt_every: int = setting("ckpt_every", 0)  # resumable checkpoints: at the end only (the run is ~1 minute)
    # --- evaluation ---
    eval_text_rows: int = field(default=128, metadata={"min": 1})  # held-out text rows of seq_len tokens (val.bin) for the perplexity
    eval_pairs: int = field(default=128, metadata={"min": 2})  # held-out pairs (first N of the val split) for 03's metrics
    eval_documents: int = field(default=48, metadata={"min": 1})  # held-out interleaved documents (built from the val pairs)
    num_candidates: int = field(default=4, metadata={"min": 2})  # captions per image in "pick the right caption"
    # --- optional: the text-vs-image trade-off over mixtures ---
    compare_mixtures: str = ""  # mixtures separated by ";" (each as `mixture`), each trained compare_steps steps from the main run's start; "" = none (the tiny pipeline, for time)
    compare_steps: int = field(default=40, metadata={"min": 1})  # steps per compared mixture (the main run's settings otherwise) [open]


# ------------------------------------------------------------------------------------- mixture
def parse_mixture(text: str) -> dict[str, float]:
    """``"text=0.3,pairs=0.35,interleaved=0.35"`` -> a weight per kind of :data:`KINDS`, summing
    to 1 (a kind left out weighs 0); the syntax of 04's source mixture
    (:func:`mmafm.data.mixture.parse_mixture`). Raises :class:`ConfigError` naming the bad entry."""
    from mmafm.data import mixture

    try:
        weights = mixture.parse_mixture(text, KINDS)
    except ValueError as err:
        raise ConfigError(f"{STAGE}: key 'mixture': {err}") from None
    return {kind: weights.get(kind, 0.0) for kind in KINDS}


def parse_mixture_list(text: str) -> list[str]:
    """``"text:0.9,pairs:0.1; text:0.1,pairs:0.9"`` -> the mixtures, each checked by
    :func:`parse_mixture` (``";"`` separates them because a mixture holds commas); ``""`` -> []."""
    mixtures = [part.strip() for part in text.split(";") if part.strip()]
    for mixture in mixtures:
        try:
            parse_mixture(mixture)
        except ConfigError as err:
            raise ConfigError(f"{STAGE}: key 'compare_mixtures': {mixture!r}: {err}") from None
    return mixtures


def rows_per_kind(weights: dict[str, float], batch_size: int) -> dict[str, int]:
    """Rows of each kind in every batch: ``weight * batch_size`` rounded by largest remainder
    (ties to the earlier kind of :data:`KINDS`), so the rows always sum to ``batch_size``.

    Raises:
        ConfigError: a kind with a weight > 0 would get no row (raise ``batch_size``).
    """
    exact = {kind: weights.get(kind, 0.0) * batch_size for kind in KINDS}
    rows = {kind: int(math.floor(value)) for kind, value in exact.items()}
    by_remainder = sorted(KINDS, key=lambda kind: (-(exact[kind] - rows[kind]), KINDS.index(kind)))
    for kind in by_remainder[: batch_size - sum(rows.values())]:
        rows[kind] += 1
    starved = [kind for kind in KINDS if weights.get(kind, 0.0) > 0 and rows[kind] == 0]
    if starved:
        raise ConfigError(f"{STAGE}: batch_size={batch_size} leaves no row for {starved} of mixture {weights}; raise batch_size")
    return rows


@dataclass(frozen=True)
class MixtureRow:
    """One training or held-out row: token ids and its images, in placeholder order."""

    ids: torch.Tensor  # (T,) long, one `<image>` per image
    images: tuple[int, ...]  # indices into the image pool
    kind: str  # one of KINDS


def collate_rows(rows: Sequence[MixtureRow], image_pool: Sequence[torch.Tensor], pad_id: int
                 ) -> dict[str, torch.Tensor]:
    """A batch: ``ids`` / ``labels`` ``(B, T)`` right-padded (padding unlabelled), ``images``
    ``(N, 3, S, S)`` in placeholder order over the rows (``(0, ...)`` when there are none) and
    ``kinds`` ``(B,)`` (index into :data:`KINDS`)."""
    width = max(row.ids.numel() for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : row.ids.numel()] = row.ids
        labels[index, : row.ids.numel()] = row.ids
    chosen = [image_pool[i] for row in rows for i in row.images]
    images = torch.stack(chosen) if chosen else torch.zeros(0, *image_pool[0].shape)
    kinds = torch.tensor([KINDS.index(row.kind) for row in rows], dtype=torch.long)
    return {"ids": ids, "labels": labels, "images": images, "kinds": kinds}


def text_rows(tokens: np.ndarray, windows: Sequence[int], seq_len: int, image_id: int, unk_id: int) -> list[MixtureRow]:
    """Text-only rows: window ``w`` is tokens ``[w * seq_len, (w + 1) * seq_len)``. A stray
    ``<image>`` id in the text (the literal string in a document) becomes ``<unk>``: a text row
    has no image to fill it."""
    rows = []
    for window in windows:
        ids = torch.from_numpy(np.asarray(tokens[window * seq_len : (window + 1) * seq_len], dtype=np.int64))
        rows.append(MixtureRow(ids.masked_fill(ids == image_id, unk_id), (), "text"))
    return rows


class MixtureBatches:
    """Re-iterable training batches of the mixture; one iteration = one epoch (reproducible).

    An epoch has as many batches as it takes for the pair rows to visit every training pair once
    (the interleaved rows when there are no pair rows, the text rows when there are neither).
    Its pairs come in a permutation, its text windows in another, its interleaved documents are
    built for it (seeded by ``(seed, epoch)``), so a resumed run sees the same batches.
    """

    def __init__(self, *, tokens: np.ndarray, pairs: Sequence[Any], image_pool: Sequence[torch.Tensor],
                 tokenizer: Any, rows: dict[str, int], cfg: MultimodalAdaptationConfig):
        self.tokens, self.pairs, self.image_pool, self.tokenizer = tokens, pairs, image_pool, tokenizer
        self.rows, self.cfg = rows, cfg
        self.num_windows = (len(tokens) - 1) // cfg.seq_len
        if rows["text"] and self.num_windows < 1:
            raise ValueError(f"{cfg.tokens_dir}: train.bin holds {len(tokens)} tokens, fewer than one row of seq_len={cfg.seq_len}")
        per_batch = rows["pairs"] or rows["interleaved"] * cfg.min_images or rows["text"]
        source_size = len(pairs) if rows["pairs"] or rows["interleaved"] else self.num_windows
        self.batches_per_epoch = max(1, source_size // per_batch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _cycle(self, order: np.ndarray, count: int) -> np.ndarray:
        """The first ``count`` items of ``order`` repeated as often as needed."""
        return np.resize(order, count) if count else order[:0]

    def documents(self, epoch: int) -> list:
        """The interleaved documents of ``epoch`` (:func:`mmafm.data.interleaved.build_documents`)."""
        from mmafm.data.interleaved import build_documents

        if not self.rows["interleaved"]:
            return []
        cfg = self.cfg
        return build_documents(
            [p.caption for p in self.pairs], [p.source for p in self.pairs], self.rows["interleaved"] * self.batches_per_epoch,
            seed=cfg.seed * 1_000_003 + epoch, min_images=cfg.min_images, max_images=cfg.max_images,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from mmafm.data.interleaved import encode_document
        from mmafm.eval.captions import caption_ids

        cfg, rows, n = self.cfg, self.rows, self.batches_per_epoch
        rng = np.random.default_rng([cfg.seed, self.epoch])
        windows = self._cycle(rng.permutation(max(self.num_windows, 1)), rows["text"] * n)
        pair_order = self._cycle(rng.permutation(len(self.pairs)), rows["pairs"] * n)
        documents = self.documents(self.epoch)
        for batch in range(n):
            batch_rows = text_rows(self.tokens, windows[batch * rows["text"] : (batch + 1) * rows["text"]],
                                   cfg.seq_len, self.tokenizer.image_id, self.tokenizer.unk_id)
            for index in pair_order[batch * rows["pairs"] : (batch + 1) * rows["pairs"]]:
                ids = caption_ids(self.tokenizer, self.pairs[index].caption, cfg.max_caption_tokens)
                batch_rows.append(MixtureRow(ids, (int(index),), "pairs"))
            for document in documents[batch * rows["interleaved"] : (batch + 1) * rows["interleaved"]]:
                ids, images = encode_document(document, self.tokenizer, cfg.max_document_tokens)
                batch_rows.append(MixtureRow(torch.tensor(ids, dtype=torch.long), images, "interleaved"))
            yield collate_rows(batch_rows, self.image_pool, self.tokenizer.pad_id)


def scale_text_lr(optimizer: torch.optim.Optimizer, text: torch.nn.Module, scale: float) -> torch.optim.Optimizer:
    """Split every parameter group of a fresh optimizer into its text-model part, whose ``lr``
    is multiplied by ``scale``, and the rest (the other options are kept, so AdamW and the AFM
    optimizer's groups both split). Done before the scheduler is built, which then scales each
    group's own peak. Returns the same optimizer."""
    if scale == 1.0:
        return optimizer
    text_params = {id(p) for p in text.parameters()}
    groups = []
    for group in optimizer.param_groups:
        for in_text in (False, True):
            params = [p for p in group["params"] if (id(p) in text_params) == in_text]
            if params:
                groups.append({**group, "params": params, "lr": group["lr"] * (scale if in_text else 1.0)})
    optimizer.param_groups = groups
    return optimizer


# ------------------------------------------------------------------------------------- task
def _row_token_nll(model: MultimodalModel, batch: dict[str, torch.Tensor], mode: str, labels: bool = True):
    """The forward pass, and per row the summed next-token NLL (float32) and target count."""
    out = model(batch["ids"], batch["images"] if batch["images"].shape[0] else None, mode=mode,
                labels=batch["labels"] if labels else None)
    targets = torch.full_like(out.labels, IGNORE_INDEX)  # (B, L), L = expanded length
    targets[:, :-1] = out.labels[:, 1:]  # next token; image slots and padding are IGNORE_INDEX
    nll = F.cross_entropy(out.logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")  # (B, L)
    keep = targets != IGNORE_INDEX
    return out, (nll * keep).sum(1), keep.sum(1)


@torch.no_grad()
def rows_nll(model: MultimodalModel, batches: Sequence[dict[str, torch.Tensor]], mode: str) -> tuple[float, int]:
    """Summed next-token NLL (nats) over the target tokens of held-out batches, and their count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        _, sums, counts = _row_token_nll(model, batch, mode)
        total += float(sums.sum())
        count += int(counts.sum())
    model.train(was_training)
    return total, count


class AdaptationTask:
    """The shared trainer's task: the decoder's loss over the whole batch, plus the
    cross-entropy of each kind of row (``ce_text``, ``ce_pairs``, ``ce_interleaved``) as metrics.

    Args:
        model: the multimodal model.
        mode: resolution mode.
        rows: rows per kind (only kinds with rows are reported).
        held_out: small held-out sets for the checks during training: ``text`` batches
            ``(input_ids, targets)`` and ``pairs`` / ``interleaved`` collated batches.
    """

    def __init__(self, model: MultimodalModel, mode: str, rows: dict[str, int], held_out: dict[str, list],
                 kind_weights: dict[str, float] | None = None):
        self.model = model  # the trainer may swap in a wrapper
        self.plain = model
        self.mode, self.rows, self.held_out = mode, rows, held_out
        self.kind_weights = kind_weights  # None: one mean over all target tokens

    def training_forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out, sums, counts = _row_token_nll(self.model, batch, self.mode)
        metrics = dict(out.metrics)
        means = {}
        for index, kind in enumerate(KINDS):
            if self.rows[kind]:
                chosen = batch["kinds"] == index
                means[kind] = sums[chosen].sum() / counts[chosen].sum().clamp(min=1)
                metrics[f"ce_{kind}"] = float(means[kind].detach())
                metrics[f"tokens_{kind}"] = float(counts[chosen].sum())
        loss = out.loss
        if self.kind_weights is not None:  # swap the all-token mean for the weighted mean of the kinds' means
            present = {kind: w for kind, w in self.kind_weights.items() if kind in means and w > 0}
            weighted = sum(w * means[kind] for kind, w in present.items()) / sum(present.values())
            loss = loss - sums.sum() / counts.sum().clamp(min=1) + weighted  # z-loss / aux terms kept
        return {"lm": loss}, metrics

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())  # labelled tokens before image expansion

    def evaluate(self) -> dict[str, float]:
        from mmafm.eval.perplexity import held_out_perplexity, perplexity

        results = {"val_text_ppl": held_out_perplexity(self.plain.text, self.held_out["text"])["val_ppl"]}
        for kind in ("pairs", "interleaved"):
            total, count = rows_nll(self.plain, self.held_out[kind], self.mode)
            results[f"val_{kind}_ppl"] = perplexity(total / max(count, 1))
        return results


# ----------------------------------------------------------------------------------- figures
def _figures(stage_dir: StageDir, records: list[dict], before: dict, after: dict, example: tuple | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for kind in KINDS:
        train = [r for r in records if f"ce_{kind}" in r]
        if train:
            axes[0].plot([r["step"] for r in train], [r[f"ce_{kind}"] for r in train], label=kind)
    axes[0].set(title="training loss per kind of row\n(nats per target token)", xlabel="step")
    axes[0].legend(fontsize=8)
    evals = [r for r in records if "eval/val_text_ppl" in r]
    for kind, style in (("text", "o-"), ("pairs", "s-"), ("interleaved", "^-")):
        key = f"eval/val_{kind}_ppl"
        axes[1].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], style, label=kind)
    axes[1].set(title="held-out perplexity during training\n(step 0 = before; subsets)", xlabel="step", yscale="log")
    axes[1].legend(fontsize=8)
    names = ["text ppl", "interleaved ppl", "caption ppl"]
    keys = ["text_ppl", "interleaved_ppl", "caption_ppl"]
    x = np.arange(len(names))
    for offset, (label, values, colour) in enumerate((("before", before, "tab:grey"), ("after", after, "tab:blue"))):
        bars = axes[2].bar(x + (offset - 0.5) * 0.38, [values[k] for k in keys], 0.38, label=label, color=colour)
        axes[2].bar_label(bars, fmt="%.1f", fontsize=7)
    axes[2].set_xticks(x, names)
    axes[2].set(yscale="log", title=(f"held out, before vs after (text {after['text_ppl'] / before['text_ppl'] - 1:+.1%})\n"
                                     f"pick the caption {after['choice_accuracy']:.0%} (wrong image "
                                     f"{after['choice_accuracy_wrong_image']:.0%}, chance {after['choice_chance']:.0%})"))
    axes[2].legend(fontsize=8)
    stage_dir.save_figure(fig, "adaptation")
    plt.close(fig)

    if example is None:
        return
    import textwrap

    document, pictures = example
    fig, axes = plt.subplots(1, len(pictures), figsize=(2.2 * len(pictures), 2.9), squeeze=False)
    for ax, picture in zip(axes[0], pictures):
        ax.imshow(picture)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("\n".join(textwrap.wrap(f"held-out interleaved document: {document.text}", 110)[:5]), fontsize=7.5)
    stage_dir.save_figure(fig, "interleaved_example")
    plt.close(fig)


def _tradeoff_figure(stage_dir: StageDir, points: list[dict], steps: int, chance: float) -> None:
    """Text perplexity change against caption accuracy, one point per compared mixture."""
    from matplotlib.ticker import PercentFormatter

    from mmafm.report import stage_figure

    with stage_figure(stage_dir, "mixture_tradeoff", figsize=(6.5, 4.5)) as (_, ax):
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.axhline(0.0, color="black", linewidth=0.8, label="text perplexity unchanged")
        ax.axvline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0%})")
        for point in points:
            shares = point["mixture"]
            label = " / ".join(f"{kind[:5]} {shares[kind]:.2f}" for kind in KINDS if shares[kind] > 0)
            (marker,) = ax.plot([point["choice_accuracy"]], [100 * point["text_ppl_change"]], "o", label=label)
            ax.plot([point["choice_accuracy_wrong_image"]], [100 * point["text_ppl_change"]], "o", mfc="none",
                    color=marker.get_color())
        ax.set(xlabel="pick the right caption, held out (open circle: with a wrong image)",
               ylabel="text perplexity change (%; + = worse)",
               title=f"the mixture knob: each mixture {steps} steps from the same start")
        ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------- run
def _check_inputs(cfg: MultimodalAdaptationConfig) -> None:
    from mmafm.stages.vl_alignment import check_tower_inputs

    missing = [name for name in ("pairs_dir", "tokens_dir", "tokenizer", "image_tower", "text_checkpoint")
               if not getattr(cfg, name)]
    if missing:
        raise ConfigError(
            f"{STAGE}: {', '.join(missing)} empty; the stage adapts trained towers on the data stage's data: pass "
            "00_data's pairs_dir/tokens_dir/tokenizer, 01_clip_pretrain's image_tower/image_preset and the latest "
            "text stage's checkpoint/preset (configs/pipelines/tiny.yaml wires them)"
        )
    check_tower_inputs(cfg, STAGE)
    if cfg.min_images > cfg.max_images:
        raise ConfigError(f"{STAGE}: min_images={cfg.min_images} > max_images={cfg.max_images}")


def _held_out(cfg: MultimodalAdaptationConfig, tokenizer: Any, image_size: int, pad_id: int) -> dict[str, Any]:
    """The held-out sets: text batches, pairs (images + captions), interleaved document batches."""
    from mmafm.data.interleaved import build_documents, encode_document, load_sourced_pairs
    from mmafm.data.shards import TokenShards, image_to_tensor
    from mmafm.eval.captions import caption_ids

    text = TokenShards(cfg.tokens_dir, cfg.seq_len, batch_size=min(cfg.eval_text_rows, 32), seed=cfg.seed, split="val",
                       shard_by_rank=False)
    text_batches = []
    for batch in text:  # the first eval_text_rows rows of a fixed order
        text_batches.append(batch)
        if sum(b[0].shape[0] for b in text_batches) >= cfg.eval_text_rows:
            break
    pairs, skipped = load_sourced_pairs(cfg.pairs_dir, "val")
    if len(pairs) < max(cfg.num_candidates, cfg.min_images):
        raise ValueError(f"{cfg.pairs_dir}: {len(pairs)} held-out pairs, fewer than num_candidates={cfg.num_candidates}")
    pool = [image_to_tensor(p.image, image_size) for p in pairs]
    documents = build_documents([p.caption for p in pairs], [p.source for p in pairs], cfg.eval_documents,
                                seed=cfg.seed + 7919, min_images=cfg.min_images, max_images=cfg.max_images)
    rows = []
    for document in documents:
        ids, images = encode_document(document, tokenizer, cfg.max_document_tokens)
        rows.append(MixtureRow(torch.tensor(ids, dtype=torch.long), images, "interleaved"))
    interleaved = [collate_rows(rows[i : i + 16], pool, pad_id) for i in range(0, len(rows), 16)]
    evaluated = pairs[: cfg.eval_pairs]
    pair_rows = [MixtureRow(caption_ids(tokenizer, p.caption, cfg.max_caption_tokens), (i,), "pairs")
                 for i, p in enumerate(evaluated[:64])]
    return {
        "text": text_batches, "pairs": pairs, "pool": pool, "documents": documents, "interleaved": interleaved,
        "images": torch.stack(pool[: len(evaluated)]), "captions": [p.caption for p in evaluated],
        "pair_batches": [collate_rows(pair_rows[i : i + 32], pool, pad_id) for i in range(0, len(pair_rows), 32)],
        "skipped": skipped,
    }


def _measure(model: MultimodalModel, tokenizer: Any, held: dict, cfg: MultimodalAdaptationConfig) -> dict[str, float]:
    """Every held-out number: text / interleaved perplexity and 03's caption metrics."""
    from mmafm.eval.captions import evaluate_captions
    from mmafm.eval.perplexity import held_out_perplexity, perplexity

    was_training = model.training
    model.eval()
    text = held_out_perplexity(model.text, held["text"])
    total, count = rows_nll(model, held["interleaved"], cfg.mode)
    captions = evaluate_captions(model, tokenizer, held["images"], held["captions"], cfg.mode, cfg.num_candidates,
                                 cfg.max_caption_tokens, cfg.seed)
    model.train(was_training)
    return {"text_ppl": text["val_ppl"], "text_loss": text["val_loss"], "interleaved_ppl": perplexity(total / max(count, 1)),
            **captions}


def _compare_mixtures(cfg: MultimodalAdaptationConfig, start: MultimodalModel, mixtures: list[str], data: dict,
                      held: dict, tokenizer: Any, before: dict) -> list[dict]:
    """Train a copy of ``start`` (the model before the main run's first step) for
    ``compare_steps`` on each mixture, in memory, and measure it on the held-out sets."""
    from mmafm.train import Trainer
    from mmafm.train.optim import build_optimizer

    points = []
    for mixture in mixtures:
        weights = parse_mixture(mixture)
        rows = rows_per_kind(weights, cfg.batch_size)
        model = copy.deepcopy(start)
        batches = MixtureBatches(rows=rows, cfg=cfg, tokenizer=tokenizer, **data)
        held_small = {"text": held["text"][:1], "pairs": held["pair_batches"][:1], "interleaved": held["interleaved"][:2]}
        task = AdaptationTask(model, cfg.mode, rows, held_small, weights if cfg.loss_weighting == "kinds" else None)
        settings = cfg.train_config(max_steps=cfg.compare_steps, warmup_steps=min(cfg.warmup_steps, cfg.compare_steps - 1),
                                    eval_every=0, ckpt_every=0)
        trainer = Trainer(task, batches, settings, None, optimizer_factory=lambda module, config: scale_text_lr(
            build_optimizer(module, config), getattr(module, "module", module).text, cfg.text_lr_scale))
        trainer.fit()
        after = _measure(trainer.model, tokenizer, held, cfg)
        points.append({"mixture": {k: round(v, 4) for k, v in weights.items()}, "rows_per_batch": rows,
                       "steps": trainer.step, "text_ppl_change": round(after["text_ppl"] / before["text_ppl"] - 1.0, 4),
                       **{k: round(after[k], 4) for k in ("text_ppl", "caption_ppl", "interleaved_ppl", "choice_accuracy",
                                                          "choice_accuracy_wrong_image")}})
        print(f"[{STAGE}] mixture {mixture}: text ppl {points[-1]['text_ppl_change']:+.1%}, "
              f"pick the caption {after['choice_accuracy']:.0%} after {trainer.step} steps")
    return points


def run(cfg: MultimodalAdaptationConfig) -> dict[str, str]:
    """Adapt, evaluate before and after, plot and write the checkpoints later stages start from."""
    from mmafm.checkpoint import save_model
    from mmafm.data.interleaved import document_counts, load_sourced_pairs
    from mmafm.data.shards import TOKEN_DTYPE, image_to_tensor, read_token_meta
    from mmafm.io import atomic_write_json
    from mmafm.stages.vl_alignment import build_model
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    start = time.time()
    _check_inputs(cfg)
    rows = rows_per_kind(parse_mixture(cfg.mixture), cfg.batch_size)
    compared = parse_mixture_list(cfg.compare_mixtures)
    for mixture in compared:  # refuse a mixture the batch cannot hold before the main run trains
        rows_per_kind(parse_mixture(mixture), cfg.batch_size)
    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    meta = read_token_meta(cfg.tokens_dir)
    if meta.get("vocab_size") != tokenizer.vocab_size:
        raise ConfigError(f"{STAGE}: tokens_dir {cfg.tokens_dir} was tokenized with a {meta.get('vocab_size')}-token "
                          f"vocabulary, tokenizer {cfg.tokenizer} has {tokenizer.vocab_size}; pass 00_data's pair of them")
    model = build_model(cfg, tokenizer, stage=STAGE)
    image_size = model.resolution_mode(cfg.mode).image_size

    held = _held_out(cfg, tokenizer, image_size, tokenizer.pad_id)
    before = _measure(model, tokenizer, held, cfg)
    text_before = {name: p.detach().clone() for name, p in model.text.named_parameters()}
    start_model = copy.deepcopy(model) if compared else None  # the comparison's common start

    pairs, skipped = load_sourced_pairs(cfg.pairs_dir, "train")
    image_pool = [image_to_tensor(p.image, image_size) for p in pairs]
    tokens = np.memmap(Path(cfg.tokens_dir) / "train.bin", dtype=TOKEN_DTYPE, mode="r")
    data = {"tokens": tokens, "pairs": pairs, "image_pool": image_pool}
    batches = MixtureBatches(rows=rows, cfg=cfg, tokenizer=tokenizer, **data)
    held_small = {"text": held["text"][:1], "pairs": held["pair_batches"][:1], "interleaved": held["interleaved"][:2]}
    task = AdaptationTask(model, cfg.mode, rows, held_small,
                          parse_mixture(cfg.mixture) if cfg.loss_weighting == "kinds" else None)
    from mmafm.train.optim import build_optimizer

    trainer = Trainer(task, batches, cfg.train_config(), stage_dir, optimizer_factory=lambda module, config: scale_text_lr(
        build_optimizer(module, config), getattr(module, "module", module).text, cfg.text_lr_scale))
    with torch.no_grad():  # the small checks on the weights before any step (resuming happens in fit)
        initial = {f"eval/{k}": v for k, v in task.evaluate().items()}
    records = trainer.fit()
    model = trainer.model
    after = _measure(model, tokenizer, held, cfg)
    text_unchanged = all(torch.equal(text_before[n], p) for n, p in model.text.named_parameters())
    stage_dir.log({"step": trainer.step, **{f"before/{k}": v for k, v in before.items()},
                   **{f"before/{k[len('eval/'):]}": v for k, v in initial.items()},
                   **{f"final/{k}": v for k, v in after.items()}})

    example_doc = held["documents"][0]
    example = (example_doc, [held["pairs"][i].image for i in example_doc.images])
    _figures(stage_dir, [{"step": 0, **initial}, *records], before, after, example)
    compare_start = time.time()
    comparison = _compare_mixtures(cfg, start_model, compared, data, held, tokenizer, before) if compared else []
    compare_seconds = time.time() - compare_start
    if comparison:
        _tradeoff_figure(stage_dir, comparison, cfg.compare_steps, after["choice_chance"])

    checkpoint = save_model(stage_dir.root / "mm_model", model, {
        "tokenizer": str(cfg.tokenizer), "step": trainer.step, "mode": cfg.mode, "metrics": after})
    text_model = save_model(stage_dir.root / "text_model", model.text, {
        "tokenizer": str(cfg.tokenizer), "step": trainer.step, "stage": STAGE})
    train_documents = document_counts(batches.documents(0))
    atomic_write_json(stage_dir.root / "data_card_stats.json", {
        "image_sources": {"interleaved": {
            "kept": train_documents["documents"] + len(held["documents"]), "train": train_documents["documents"],
            "val": len(held["documents"]), "corrupt": sum(skipped.values()) + sum(held["skipped"].values())}},
        "interleaved_train_epoch0": train_documents, "interleaved_val": document_counts(held["documents"]),
        "config": {"seed": cfg.seed}})
    token_counts = {kind: sum(r.get(f"tokens_{kind}", 0.0) for r in records) for kind in KINDS}
    token_total = sum(token_counts.values()) or 1.0
    outputs = {
        "checkpoint": str(checkpoint),
        "text_model": str(text_model),
        "preset": cfg.model_preset,
        "tokenizer": str(cfg.tokenizer),
        "mode": cfg.mode,
        "metrics": str(stage_dir.metrics_path),
    }
    summary = {
        **{f"{k}_before": round(v, 4) for k, v in before.items() if k in ("text_ppl", "interleaved_ppl", "caption_ppl", "choice_accuracy")},
        **{k: round(v, 4) for k, v in after.items()},
        "text_ppl_change": round(after["text_ppl"] / before["text_ppl"] - 1.0, 4),  # relative: + = text got worse
        "text_unchanged": text_unchanged,
        "mixture": {k: round(v, 4) for k, v in parse_mixture(cfg.mixture).items()},
        "rows_per_batch": rows,
        "logged_target_token_share": {k: round(v / token_total, 4) for k, v in token_counts.items()},
        "image_tokens": model.num_image_tokens(cfg.mode),
        "trainable": model.trainable_parts(),
        "train_pairs": len(pairs),
        "steps": trainer.step,
        "seconds": round(time.time() - start, 1),
    }
    if comparison:
        summary.update({"mixture_comparison": comparison, "compare_steps": cfg.compare_steps,
                        "compare_seconds": round(compare_seconds, 1)})
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, MultimodalAdaptationConfig, run)
