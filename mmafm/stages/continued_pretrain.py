"""Stage 04: continued pretraining: the core model, a doubled sequence length, more math and code.

The 2024 AFM report (section 3.2; ``../shared/WAVE2.md`` "Pretraining recipe") follows core
pretraining with *continued* pretraining: 1T tokens at sequence length 8192 (twice the core's
4096) on a mixture that "upweights math and code", peak LR 3e-4 [recalled], warm-up 1k steps
[paper], decay to 0.001 x peak [paper], decoupled weight decay 1e-5 [recalled]. This stage does
it at tiny scale on the shared trainer:

1. the weights of ``02_text_pretrain`` (``init_checkpoint``; :func:`mmafm.load_model`);
2. the data stage's text sources rebuilt per source plus generated arithmetic and code
   (:mod:`mmafm.data.mixture`, :mod:`mmafm.data.synthetic_text`), drawn by the ``mixture``
   weights; ``seq_len`` 0 = twice the sequence length ``init_checkpoint`` was trained at;
3. held-out perplexity on three slices before and after: *general* (the data stage's
   ``val.bin``, 02's held-out set), *arithmetic* and *code* (their generated val documents);
4. figures (the mixture shift, perplexity before/after per slice, loss curves), greedy samples
   of a math and a code prompt before/after, the checkpoint (its metadata records ``seq_len``,
   which ``05_long_context`` reads as its trained length).

The trainer is the one every stage uses (:class:`mmafm.train.Trainer`), with the task of
``02_text_pretrain`` (:class:`~mmafm.stages.text_pretrain.TextPretrainTask`) evaluating every
slice. The 2025 report's vocabulary extension (100k -> 150k) in this step is not done here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmafm.checkpoint import checkpoint_paths, read_metadata, save_model
from mmafm.config import ConfigError, to_dict
from mmafm.eval.perplexity import held_out_perplexity
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, read_manifest, require_inputs
from mmafm.stages.text_pretrain import TEXT_FAMILIES, TextPretrainTask, held_out_batches
from mmafm.train.trainer import setting
from mmafm.train.vocab import extend_tokenizer, extend_vocabulary, tokens_per_byte

__all__ = [
    "ContinuedPretrainConfig",
    "SliceTask",
    "checkpoint_file",
    "trained_seq_len",
    "data_stage_record",
    "load_text_model",
    "slice_perplexities",
    "training_facts",
    "save_text_stage",
    "run",
]

STAGE = "04_continued_pretrain"
SLICES = ("general", "arithmetic", "code")  # held-out perplexity slices
SAMPLE_PROMPTS = ("Question: What is 23 + 58?\nAnswer:", "def add_seven(x):\n")


@dataclass
class ContinuedPretrainConfig(TrainStageConfig):
    """Continued pretraining. Defaults: the tiny pipeline (well under a minute on 2 idle cores).

    The trainer's settings come from :class:`~mmafm.train.trainer.TrainSettings`; re-declared
    below are those with this stage's own default or source.
    """

    # --- inputs (a pipeline wires them)
    init_checkpoint: str = field(default="", metadata={"path": "model"})  # 02_text_pretrain's `checkpoint` (or its stage folder)
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer`, the one init_checkpoint was trained with
    data_dir: str = field(default="", metadata={"path": "dir"})  # 00_data's `data_dir`: its manifest names the sources, caps, seed and split
    # --- data
    # source=weight over the data stage's text sources (captions, wikipedia, wordnet, fortunes,
    # jargon) and the generated arithmetic and code (mmafm.data.synthetic_text); normalised.
    # [paper: "upweights math and code", weights unpublished; these are open]
    mixture: str = "wikipedia:0.3,jargon:0.1,wordnet:0.05,fortunes:0.05,captions:0.05,arithmetic:0.25,code:0.2"
    generated_documents: int = field(default=2000, metadata={"min": 10})  # documents per generated source (train + val split)
    seq_len: int = field(default=0, metadata={"min": 0})  # tokens per row; 0 = 2 x init_checkpoint's [paper: 4096 -> 8192]
    batch_size: int = field(default=8, metadata={"min": 1})  # rows per step per rank [open at tiny size]
    # --- optimization (shared trainer) [paper: warm-up 1k, decay to 0.001 x peak; recalled: peak
    # LR 3e-4, weight decay 1e-5, with the AFM optimizer]
    optimizer: str = setting("optimizer", "afm")  # [code+paper: the AFM optimizer, as in core pretraining]
    max_steps: int = setting("max_steps", 100)  # [paper: 1T tokens; tiny: ~200k tokens, open]
    lr: float = setting("lr", 1e-3)  # peak [recalled: 3e-4 at full size; tiny: 1e-3 so 100 steps move the math/code slices, open]
    weight_decay: float = setting("weight_decay", 1e-5)  # decoupled, not scaled by the peak LR [recalled: 1e-5]
    warmup_steps: int = setting("warmup_steps", 10)  # [paper: 1k steps; tiny: 10, open]
    min_lr_ratio: float = setting("min_lr_ratio", 0.001)  # cosine floor / peak [paper: 0.001]
    # --- evaluation, checkpoints, samples
    eval_every: int = setting("eval_every", 25)  # held-out evaluation of every slice (and at the end)
    eval_batches: int = field(default=2, metadata={"min": 1})  # held-out batches per slice per evaluation
    ckpt_every: int = setting("ckpt_every", 50)
    sample_tokens: int = field(default=24, metadata={"min": 1})  # greedy tokens per sample prompt, before and after
    # --- vocabulary extension (mmafm.train.vocab) [paper 2025: 100k -> 150k during continued
    # pretraining; open: how pieces are chosen (here the mixture's most frequent new BPE merges)
    # and how rows start (here the mean of their sub-pieces' rows)]. 0 = keep the tokenizer (the
    # tiny pipeline: later stages read 00's token shards, which name 00's vocabulary size).
    extend_vocab_to: int = field(default=0, metadata={"min": 0})


# ---------------------------------------------------------------------------------- the task
class SliceTask(TextPretrainTask):
    """02's next-token task, evaluated on several held-out slices.

    Args:
        model: the text decoder.
        slices: ``{name: held-out batches}``; the first is reported as ``val_loss`` /
            ``val_ppl`` (02's names, so its curves compare), every one as ``<name>_loss`` /
            ``<name>_ppl``.
    """

    def __init__(self, model: nn.Module, slices: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]):
        super().__init__(model, next(iter(slices.values())))
        self.slices = slices

    def evaluate(self) -> dict[str, float]:
        return slice_perplexities(self.model, self.slices)


def slice_perplexities(model: nn.Module, slices: dict[str, list]) -> dict[str, float]:
    """``{"val_loss", "val_ppl"}`` of the first slice and ``{"<name>_loss", "<name>_ppl"}`` of each
    (:func:`mmafm.eval.perplexity.held_out_perplexity`)."""
    device = next(getattr(model, "module", model).parameters()).device
    out: dict[str, float] = {}
    for index, (name, batches) in enumerate(slices.items()):
        result = held_out_perplexity(model, batches, device)
        if index == 0:
            out.update(result)
        out[f"{name}_loss"], out[f"{name}_ppl"] = result["val_loss"], result["val_ppl"]
    return out


# ------------------------------------------------------------------------------ the inputs
def checkpoint_file(source: str | Path) -> Path:
    """The checkpoint a model source names: the file itself, or a finished stage's ``checkpoint``."""
    source = Path(source)
    if source.is_dir():
        outputs = read_manifest(source)["outputs"]
        if "checkpoint" not in outputs:
            raise ConfigError(f"stage folder {source} names no `checkpoint` output (outputs: {sorted(outputs)})")
        return Path(outputs["checkpoint"])
    return source


def trained_seq_len(source: str | Path) -> int:
    """The sequence length the model of ``source`` was trained at (its stage config's ``seq_len``).

    Raises:
        ConfigError: the checkpoint's metadata records none (pass ``seq_len`` explicitly).
    """
    path = checkpoint_file(source)
    stage_config = read_metadata(path).get("stage_config") or {}
    if not int(stage_config.get("seq_len") or 0):
        raise ConfigError(f"{checkpoint_paths(path)[1]} records no training seq_len (stage_config.seq_len); "
                          "set seq_len (and trained_len) explicitly")
    return int(stage_config["seq_len"])


def data_stage_record(data_dir: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(config, outputs)`` of a finished ``00_data`` run's manifest."""
    manifest = read_manifest(data_dir)
    if manifest.get("stage") != "00_data" or not manifest.get("config"):
        raise ConfigError(f"data_dir {data_dir} is not a finished 00_data stage folder (its manifest: stage "
                          f"{manifest.get('stage')!r}); pass the data stage's `data_dir` output")
    return manifest["config"], manifest["outputs"]


def load_text_model(source: str, vocab_size: int, seq_len: int, stage: str, **overrides: Any) -> nn.Module:
    """The text model of ``source`` in train-ready float32, its context grown to ``seq_len``.

    Raises:
        ConfigError: its vocabulary is not the tokenizer's.
    """
    from mmafm.checkpoint import load_model

    probe = load_model(source, family=TEXT_FAMILIES)
    if probe.config.vocab_size != vocab_size:
        raise ConfigError(f"{stage}: {source} has a {probe.config.vocab_size}-token vocabulary, the tokenizer "
                          f"{vocab_size}; pass the tokenizer it was trained with")
    if seq_len > probe.config.max_seq_len:
        overrides["max_seq_len"] = seq_len
    model = load_model(source, family=TEXT_FAMILIES, dtype=torch.float32, overrides=overrides or None) if overrides else probe
    return model.float()


def training_facts(weights: dict[str, float], trainer: Any, cfg: TrainStageConfig, seq_len: int, start: float,
                   **after_mixture: Any) -> dict[str, Any]:
    """The closing keys of a continued / long-context stage's summary: its ``mixture``, any
    stage keys (``after_mixture``, in order), ``steps``, ``train_tokens`` (every rank's windows of
    ``seq_len`` tokens) and wall ``seconds`` since ``start``."""
    from mmafm.data.mixture import format_mixture

    return {
        "mixture": format_mixture(weights),
        **after_mixture,
        "steps": trainer.step,
        "train_tokens": trainer.step * cfg.batch_size * seq_len * cfg.grad_accum_steps * trainer.world_size,
        "seconds": round(time.time() - start, 1),
    }


def save_text_stage(stage: str, cfg: TrainStageConfig, stage_dir: StageDir, model: nn.Module, step: int,
                    summary: dict[str, Any], seq_len: int, extra_outputs: dict[str, str],
                    tokenizer: str | None = None) -> dict[str, str]:
    """Save a text stage's trained model (its summary and config, ``seq_len`` the context it
    trained at, in the checkpoint's metadata) and write the stage manifest. Returns the outputs:
    ``checkpoint``, ``preset``, ``tokenizer`` (``tokenizer`` if given, e.g. an extended one, else
    ``cfg.tokenizer``), then ``extra_outputs``, then ``metrics``."""
    tokenizer = tokenizer or cfg.tokenizer
    checkpoint = save_model(stage_dir.checkpoint_dir / "text_model", model, {
        "stage": stage, "tokenizer": tokenizer, "step": step, "summary": summary,
        "stage_config": to_dict(cfg) | {"seq_len": seq_len},
    })
    outputs = {
        "checkpoint": str(checkpoint),
        "preset": getattr(getattr(model, "model_spec", None), "preset", None) or "",
        "tokenizer": tokenizer,
        **extra_outputs,
        "metrics": str(stage_dir.metrics_path),
    }
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


# --------------------------------------------------------------------------------- figures
def _figures(stage_dir: StageDir, records: list[dict], shares: dict[str, dict[str, float]],
             before: dict[str, float], after: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    sources = list(dict.fromkeys(name for share in shares.values() for name in share))
    positions = np.arange(len(sources))
    for offset, (label, share) in zip((-0.2, 0.2), shares.items()):
        left.bar(positions + offset, [share.get(s, 0.0) for s in sources], width=0.4, label=label)
    left.set_xticks(positions, sources, rotation=30, ha="right")
    left.set(ylabel="share of training tokens", title="the data mixture shifts to math and code")
    left.legend(fontsize=8)
    positions = np.arange(len(SLICES))
    for offset, (label, values) in zip((-0.2, 0.2), (("before (02's weights)", before), ("after", after))):
        heights = [values[f"{name}_ppl"] for name in SLICES]
        bars = right.bar(positions + offset, heights, width=0.4, label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(positions, [f"{name}\n(held out)" for name in SLICES])
    right.set(ylabel="perplexity", yscale="log", title="held-out perplexity per slice")
    right.legend(fontsize=8)
    fig.tight_layout()
    stage_dir.save_figure(fig, "perplexity_before_after")
    plt.close(fig)

    train = [r for r in records if "ce" in r]
    evals = [r for r in records if "eval/val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy (mixture)")
    for name in SLICES:
        ax.plot([0] + [r["step"] for r in evals], [before[f"{name}_loss"]] + [r[f"eval/{name}_loss"] for r in evals],
                "o-", label=f"held-out {name}")
    ax.set(xlabel="step", ylabel="nats / token", title="continued pretraining loss")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)


@torch.no_grad()
def _samples(model: nn.Module, tokenizer: Any, tokens: int) -> list[str]:
    from mmafm.inference import generate_text

    model.eval()
    return [row["completion"] for row in generate_text(model, tokenizer, list(SAMPLE_PROMPTS), tokens)]


# ---------------------------------------------------------------------------------------- run
def run(cfg: ContinuedPretrainConfig) -> dict[str, str]:
    """Continue pretraining ``init_checkpoint`` on the shifted mixture; returns the stage outputs."""
    from mmafm.data.mixture import MixtureShards, data_stage_sources, parse_mixture, source_streams, stream_batches
    from mmafm.data.shards import read_token_meta
    from mmafm.data.synthetic_text import GENERATED_TEXT_SOURCES
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    require_inputs(cfg, STAGE, {"init_checkpoint": "02_text_pretrain's `checkpoint`", "tokenizer": "00_data's `tokenizer`",
                                "data_dir": "00_data's `data_dir`"})
    data_config, data_outputs = data_stage_record(cfg.data_dir)
    allowed = data_stage_sources(data_config)
    try:
        weights = parse_mixture(cfg.mixture, allowed)
    except ValueError as err:
        raise ConfigError(f"{STAGE}: {err}") from err
    trained = trained_seq_len(cfg.init_checkpoint)
    seq_len = cfg.seq_len or 2 * trained
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    tokens_dir = data_outputs["tokens_dir"]
    if int(read_token_meta(tokens_dir)["vocab_size"]) != tokenizer.vocab_size:
        raise ConfigError(f"{STAGE}: {tokens_dir} was made with another tokenizer than {cfg.tokenizer}")
    base_tokenizer = tokenizer
    vocab_facts: dict[str, Any] = {}
    if cfg.extend_vocab_to:
        tokenizer, vocab_facts = _extend_tokenizer(cfg, data_config, weights, base_tokenizer, stage_dir)

    def start_model() -> nn.Module:  # 02's weights at the new context (and vocabulary)
        model = load_text_model(cfg.init_checkpoint, base_tokenizer.vocab_size, seq_len, STAGE)
        return extend_vocabulary(model, base_tokenizer, tokenizer) if cfg.extend_vocab_to else model

    model = start_model()
    sources = allowed  # all of them: 02's shares are measured on the same streams
    streams, source_stats = source_streams(cfg.data_dir, data_config, tokenizer, sources, cfg.generated_documents)
    slices = {
        "general": held_out_batches(tokens_dir, seq_len, cfg.batch_size, cfg.eval_batches),
        "arithmetic": stream_batches(streams["arithmetic"]["val"], seq_len, cfg.batch_size, cfg.eval_batches),
        "code": stream_batches(streams["code"]["val"], seq_len, cfg.batch_size, cfg.eval_batches),
    }
    before = slice_perplexities(model, slices)
    samples_before = _samples(model, tokenizer, cfg.sample_tokens)

    train_data = MixtureShards({name: streams[name]["train"] for name in weights}, weights, seq_len, cfg.batch_size,
                               seed=cfg.seed)
    trainer = Trainer(SliceTask(model, slices), train_data, cfg.train_config(), stage_dir)
    records = trainer.fit()
    weights_state = trainer.full_state_dict()
    if trainer.rank != 0:
        return {}
    model = start_model()
    model.load_state_dict(weights_state)
    after = {k[len("eval/"):]: v for k, v in [r for r in records if "eval/val_loss" in r][-1].items() if k.startswith("eval/")}
    samples_after = _samples(model, tokenizer, cfg.sample_tokens)

    # 02 draws windows uniformly over train.bin: its shares are the sources' shares of train tokens
    core_tokens = {name: source_stats[name]["train_tokens"] for name in sources if name not in GENERATED_TEXT_SOURCES}
    core_total = sum(core_tokens.values()) or 1
    shares = {"02 core (train.bin)": {name: count / core_total for name, count in core_tokens.items()},
              "04 continued (mixture)": dict(weights)}
    _figures(stage_dir, records, shares, before, after)
    samples = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(SAMPLE_PROMPTS, samples_before, samples_after)]
    atomic_write_json(stage_dir.root / "samples.json", samples)
    generated_stats = {name: source_stats[name] for name in ("arithmetic", "code")}
    atomic_write_json(stage_dir.root / "data_card_stats.json", {
        "text_sources": generated_stats, "config": {"seed": data_config.get("seed", 0),
                                                     "val_fraction": data_config.get("val_fraction")}})
    summary: dict[str, Any] = {
        f"{name}_ppl_{when}": round(values[f"{name}_ppl"], 3)
        for name in SLICES for when, values in (("before", before), ("after", after))
    }
    summary |= {"seq_len": seq_len, "trained_seq_len": trained, **vocab_facts,
                **training_facts(weights, trainer, cfg, seq_len, start)}
    return save_text_stage(STAGE, cfg, stage_dir, model, trainer.step, summary, seq_len,
                           {"data_dir": cfg.data_dir, "samples": str(stage_dir.root / "samples.json")},
                           tokenizer=str(tokenizer.path))


def _extend_tokenizer(cfg: ContinuedPretrainConfig, data_config: dict, weights: dict[str, float], base: Any,
                      stage_dir: StageDir) -> tuple[Any, dict[str, Any]]:
    """The base tokenizer grown to ``extend_vocab_to`` pieces on the train documents of the
    mixture's sources (``<stage>/tokenizer/tokenizer.model``), and the summary facts: sizes and
    tokens per byte of each source's val documents under both tokenizers."""
    from mmafm.data.mixture import source_documents, split_of

    if cfg.extend_vocab_to <= base.vocab_size:
        raise ConfigError(f"{STAGE}: extend_vocab_to={cfg.extend_vocab_to} must exceed the tokenizer's "
                          f"{base.vocab_size} pieces (0 keeps it)")
    val_fraction = float(data_config.get("val_fraction", 0.05))
    pairs_dir = Path(cfg.data_dir) / "pairs"
    train_texts, val_texts = [], {}
    for name in weights:
        documents, _ = source_documents(name, data_config, pairs_dir, cfg.generated_documents)
        train_texts += [text for key, text in documents if split_of(key, val_fraction) == "train"]
        val_texts[name] = [text for key, text in documents if split_of(key, val_fraction) == "val"]
    try:
        extended = extend_tokenizer(base, train_texts, cfg.extend_vocab_to, stage_dir.root / "tokenizer" / "tokenizer",
                                    seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"{STAGE}: {err}") from err
    facts: dict[str, Any] = {"vocab_size_before": base.vocab_size, "vocab_size_after": extended.vocab_size}
    for name, texts in val_texts.items():
        if texts:
            facts[f"{name}_tokens_per_byte_before"] = round(tokens_per_byte(base, texts), 4)
            facts[f"{name}_tokens_per_byte_after"] = round(tokens_per_byte(extended, texts), 4)
    return extended, facts


register_stage(STAGE, ContinuedPretrainConfig, run)
