"""The 2024 AFM report's pretraining tables at small scale (``notebooks/reproduce_pretraining.ipynb``).

- **Table 5** (the optimizer ablation): ``02_text_pretrain``'s own training code run with the AFM
  recipe (``optimizer="afm"``: AdaStar, mu-param, its schedule and guard, exactly the stage
  YAML's values) and with the AdamW baseline, at equal tokens, over seeds; held-out perplexity
  and the lm-eval tasks, mean ± sample standard deviation (:func:`table5_runs`,
  :func:`table5_summary`, :func:`table5_figure`).
- **Tables 7/8** (core -> continued -> long-context): every checkpoint on every local lm-eval
  task and held-out perplexity (:func:`evaluate_checkpoint`, :func:`checkpoint_figure`).
- **Table 9** (context lengthening): the RULER-like ladder of ``05_long_context`` before (04's
  model) and after (05's), the trained lengths marked (:func:`ladder_before_after`).

Every number comes from running this code; the stage configs (``configs/stages/*.yaml``) are
read when it runs, so a change of their defaults flows into the tables.

    rows = table5_runs("runs/t5", tokens_dir, tokenizer, seeds=(0, 1, 2), steps=200)
    summary = table5_summary(rows, table5_metrics(rows))
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmafm.config import ConfigError, to_dict

__all__ = [
    "OPTIMIZERS",
    "ARMS",
    "REPORT_EMA_ARM",
    "text_stage_config",
    "scaled_warmup",
    "table5_runs",
    "table5_metrics",
    "table5_summary",
    "summary_markdown",
    "table5_figure",
    "evaluate_checkpoint",
    "checkpoint_markdown",
    "checkpoint_figure",
    "ladder_before_after",
]

OPTIMIZERS = ("afm", "adamw")  # Table 5's two arms: the AFM recipe, the AdamW baseline
# a third arm: the AFM recipe with the report's update EMA (0.95) whatever the YAML sets (the tiny
# 02 turns it off, an open choice: configs/stages/02_text_pretrain.yaml)
REPORT_EMA_ARM = "afm_ema"
ARMS = ("afm", REPORT_EMA_ARM, "adamw")
TEXT_CONFIG = "configs/stages/02_text_pretrain.yaml"
LONG_CONTEXT_CONFIG = "configs/stages/05_long_context.yaml"
TABLE5_METRICS = ("val_ppl", "val_loss")  # + every lm-eval score the stage puts in its summary


def _resolve(path: str | Path) -> Path:
    from mmafm.runner import project_root

    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def scaled_warmup(config_warmup: int, config_steps: int, steps: int) -> int:
    """The YAML's warm-up scaled to a run of ``steps`` (the schedule keeps its shape), at least 1.

    >>> scaled_warmup(50, 1200, 240)
    10
    """
    return max(1, round(config_warmup * steps / max(1, config_steps)))


def text_stage_config(
    optimizer: str,
    seed: int,
    steps: int,
    out_dir: str | Path,
    tokens_dir: str,
    tokenizer: str,
    *,
    config_file: str | Path = TEXT_CONFIG,
    adamw_lr: float = 3e-3,
    adamw_weight_decay: float = 0.1,
    eval_batches: int = 0,
    task_size: int = 20,
    sample_tokens: int = 8,
) -> Any:
    """One Table 5 run's ``02_text_pretrain`` config: the stage YAML (read now) with ``steps``,
    its warm-up scaled to them (:func:`scaled_warmup`), ``seed`` and the data.

    ``optimizer="afm"`` keeps every optimizer field of the YAML (the recipe); ``"afm_ema"`` is that
    with the report's update EMA 0.95 (``afm_update_ema``, which the tiny YAML turns off); ``"adamw"`` is the
    baseline of docs/training.md: ``lr=adamw_lr``, ``weight_decay=adamw_weight_decay`` (times the
    LR), no skip guard (``grad_skip=0``), clipping and schedule as the recipe's.

    Raises:
        ConfigError: an unknown optimizer, or a value the stage config rejects.
    """
    from mmafm.runner import resolve_stage_config

    if optimizer not in ARMS:
        raise ConfigError(f"Table 5: optimizer {optimizer!r}: expected one of {ARMS}")
    config_file = _resolve(config_file)
    base = resolve_stage_config("02_text_pretrain", config_file)
    params: dict[str, Any] = {
        "optimizer": "afm" if optimizer == REPORT_EMA_ARM else optimizer,
        "seed": seed, "max_steps": steps, "tokens_dir": tokens_dir, "tokenizer": tokenizer,
        "warmup_steps": scaled_warmup(base.warmup_steps, base.max_steps, steps),
        "eval_every": 0, "ckpt_every": 0, "eval_task_size": task_size, "sample_tokens": sample_tokens,
    }
    if eval_batches:
        params["eval_batches"] = eval_batches
    if optimizer == "adamw":
        params.update(lr=adamw_lr, weight_decay=adamw_weight_decay, grad_skip=0.0)
    if optimizer == REPORT_EMA_ARM:
        params["afm_update_ema"] = 0.95  # [code: axlearn adastar, the AFM config]
    return resolve_stage_config("02_text_pretrain", config_file, params, out_dir=out_dir)


def _finished_summary(config: Any) -> dict | None:
    """The summary of a finished run of exactly ``config`` in its folder, else None."""
    from mmafm.stages.base import ManifestError, read_manifest

    try:
        manifest = read_manifest(config.out_dir)
    except ManifestError:
        return None
    return manifest["summary"] if manifest.get("config") == to_dict(config) else None


def table5_runs(
    out_dir: str | Path,
    tokens_dir: str,
    tokenizer: str,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    optimizers: Sequence[str] = OPTIMIZERS,
    **options: Any,
) -> list[dict]:
    """Train ``02_text_pretrain`` (its ``run``) once per optimizer and seed into
    ``out_dir/<optimizer>_seed<k>/``; a folder holding a finished run of the same config is
    reused. Returns one row per run: ``optimizer``, ``seed``, ``train_tokens`` and the stage
    summary (``val_ppl``, ``val_loss``, task scores, ``seconds``...).

    Args:
        options: :func:`text_stage_config` keywords (``adamw_lr``, ``task_size``, ...).
    """
    from tqdm.auto import tqdm

    from mmafm.stages.text_pretrain import run

    jobs = [(optimizer, seed) for seed in seeds for optimizer in optimizers]  # interleaved: load hits both arms
    rows = []
    for optimizer, seed in tqdm(jobs, desc="Table 5 runs"):
        config = text_stage_config(optimizer, seed, steps, Path(out_dir) / f"{optimizer}_seed{seed}", tokens_dir,
                                   tokenizer, **options)
        summary = _finished_summary(config)
        if summary is None:
            run(config)
            summary = _finished_summary(config)
        rows.append({"optimizer": optimizer, "seed": seed, "lr": config.lr, **summary})
    return rows


def table5_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns of Table 5: held-out perplexity and loss, then every lm-eval score in the rows
    (``cloze_acc``, ``wordnet_acc``, ``arith_exact_match``: :func:`mmafm.eval.harness.summary_key`)."""
    from mmafm.eval.harness import summary_key
    from mmafm.eval.tasks import TASK_NAMES

    prefixes = tuple(summary_key(f"{name}/x")[:-1] for name in TASK_NAMES)
    tasks = sorted({key for row in rows for key in row if key.startswith(prefixes) and key != "tasks_seconds"})
    return [*TABLE5_METRICS, *tasks]


def table5_summary(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], by: str = "optimizer") -> list[dict]:
    """Per value of ``by``: ``n`` and each metric's mean and sample std (``<metric>_std``)."""
    from mmafm.report import mean_std

    out = []
    for value in dict.fromkeys(row[by] for row in rows):
        group = [row for row in rows if row[by] == value]
        entry: dict[str, Any] = {by: value, "n": len(group)}
        for metric in metrics:
            values = [float(row[metric]) for row in group if metric in row]
            if values:
                entry[metric], entry[f"{metric}_std"] = mean_std(values)
        out.append(entry)
    return out


def summary_markdown(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str], by: str = "optimizer") -> str:
    """Markdown: one row per group, ``mean ± std`` per metric."""
    lines = [f"| {by} | n | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for entry in summary:
        cells = [f"{entry[m]:.4g} ± {entry[m + '_std']:.2g}" if m in entry else "" for m in metrics]
        lines.append(f"| {entry[by]} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table5_figure(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], by: str = "optimizer"):
    """One panel per metric: a bar per group at its mean, the std as an error bar, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(row[by] for row in rows))
    summary = {entry[by]: entry for entry in table5_summary(rows, metrics, by)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, group in enumerate(groups):
            entry = summary[group]
            if metric not in entry:
                continue
            ax.bar(i, entry[metric], yerr=entry[f"{metric}_std"], capsize=4, color=f"C{i}", alpha=0.6)
            values = [row[metric] for row in rows if row[by] == group and metric in row]
            ax.plot([i] * len(values), values, "k.", ms=6)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(metric, fontsize=9)
        if metric == "val_ppl":  # the bars' differences, not their heights, are the result
            low = min(row[metric] for row in rows)
            ax.set_ylim(low * 0.95, max(row[metric] for row in rows) * 1.02)
    fig.suptitle("Table 5 at small scale: mean ± std over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------- Tables 7/8
def evaluate_checkpoint(
    source: str | Path,
    tokenizer: str,
    tokens_dir: str,
    *,
    tasks: Sequence[str] | None = None,
    task_size: int = 20,
    lengths: Sequence[int] = (256, 512),
    ppl_lengths: Sequence[int] = (128, 512),
    eval_batches: int = 4,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """A text checkpoint on every local lm-eval task and held-out perplexity.

    The model's context is grown to the longest length used (as ``05_long_context`` evaluates
    its "before" model: RoPE positions beyond the trained length are what the table measures).

    Returns:
        ``{"ppl@<L>": held-out perplexity of 00_data's val.bin in windows of L tokens, ...,
        "<task>_<metric>": lm-eval score (:func:`mmafm.eval.harness.summary_key`), "seconds"}``.
    """
    import torch

    from mmafm.eval.harness import MMAFMLM, evaluate_tasks, summary_key, task_scores
    from mmafm.eval.perplexity import token_nll
    from mmafm.eval.tasks import TASK_NAMES
    from mmafm.stages.continued_pretrain import load_text_model
    from mmafm.stages.text_pretrain import held_out_batches
    from mmafm.tokenizer import Tokenizer

    start = time.time()
    tok = Tokenizer.load(tokenizer)
    model = load_text_model(str(source), tok.vocab_size, max([*lengths, *ppl_lengths]), "Tables 7/8").eval()
    row: dict[str, float] = {}
    with torch.no_grad():
        for length in ppl_lengths:
            total, count = token_nll(model, held_out_batches(tokens_dir, length, 4, eval_batches))
            row[f"ppl@{length}"] = round(math.exp(total / count), 3)
    results = evaluate_tasks(MMAFMLM(model, tokenizer=tok, batch_size=batch_size), list(tasks or TASK_NAMES),
                             size=task_size, seed=seed, lengths=list(lengths))
    row.update({summary_key(key): value for key, value in task_scores(results).items()})
    row["seconds"] = round(time.time() - start, 1)
    return row


def checkpoint_markdown(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """Markdown: one row per checkpoint, one column per metric."""
    lines = ["| checkpoint | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.4g}" if c in row else "" for c in columns) + " |")
    return "\n".join(lines)


def checkpoint_figure(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]):
    """Grouped bars: task scores (left axis, 0..1) per checkpoint, and perplexities (right panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = [c for c in columns if c.startswith("ppl@")]
    scores = [c for c in columns if c not in ppl]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(rows))
    for i, (label, row) in enumerate(rows.items()):
        left.bar([j + i * width for j in range(len(scores))], [row.get(c, 0.0) for c in scores], width, label=label)
        right.bar([j + i * width for j in range(len(ppl))], [row.get(c, 0.0) for c in ppl], width, label=label)
    left.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(scores))], scores, rotation=30, ha="right",
                    fontsize=8)
    left.set(ylabel="score", ylim=(0, 1), title="every task, every checkpoint")
    right.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(ppl))], ppl, fontsize=8)
    right.set(ylabel="held-out perplexity", title="perplexity")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------- Table 9
def ladder_before_after(
    before: str | Path,
    after: str | Path,
    tokenizer: str,
    data_dir: str,
    *,
    config_file: str | Path = LONG_CONTEXT_CONFIG,
    ladder: str = "",
    count: int = 0,
) -> dict[str, Any]:
    """The RULER-like ladder of ``05_long_context`` (its tasks, haystacks, digits and evaluation
    seed; ladder and examples per rung from its YAML unless given) on the model before context
    lengthening (04's) and after (05's).

    Returns:
        ``{"lengths", "trained": {"before": T, "after": T'}, "before": {...}, "after": {...}}``
        where each side is :func:`mmafm.stages.long_context.ladder_scores`' result without its
        examples (``mean``, ``accuracy`` per task, answer ``nll``).
    """
    from mmafm.data.long_context import haystack_documents
    from mmafm.runner import resolve_stage_config
    from mmafm.stages.continued_pretrain import data_stage_record, load_text_model, trained_seq_len
    from mmafm.stages.long_context import EVAL_SEED_OFFSET, _names, ladder_scores, parse_ladder
    from mmafm.data.long_context import TASKS
    from mmafm.tokenizer import Tokenizer

    cfg = resolve_stage_config("05_long_context", _resolve(config_file))
    lengths = parse_ladder(ladder or cfg.ladder)
    count = count or cfg.eval_examples
    tasks = _names(cfg.tasks, TASKS, "tasks")
    data_config, _ = data_stage_record(data_dir)
    sources = tuple(name.strip() for name in cfg.haystack_sources.split(",") if name.strip())
    documents = haystack_documents(split="val", sources=sources, limit=int(data_config.get("text_cap", 0)),
                                   seed=int(data_config.get("seed", 0)),
                                   val_fraction=float(data_config.get("val_fraction", 0.05)))  # as 05 builds them
    tok = Tokenizer.load(tokenizer)
    out: dict[str, Any] = {"lengths": lengths, "tasks": tasks, "count": count,
                           "trained": {"before": trained_seq_len(before), "after": trained_seq_len(after)}}
    for side, source in (("before", before), ("after", after)):
        model = load_text_model(str(source), tok.vocab_size, lengths[-1], "Table 9").eval()
        result = ladder_scores(model, tok, tasks, lengths, count, documents, cfg.seed + EVAL_SEED_OFFSET, cfg.digits)
        out[side] = {key: result[key] for key in ("mean", "accuracy", "nll", "nll_mean")}
    return out

