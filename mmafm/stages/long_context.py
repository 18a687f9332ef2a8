"""Stage 05: context lengthening: a raised RoPE base, long sequences, long-context tasks.

The 2024 AFM report (section 3.3; ``../shared/WAVE2.md`` "Pretraining recipe") ends pretraining
with 100B tokens at sequence length 32768, four times the continued stage's 8192, with the RoPE
base raised from 500k to 6,315,089, on long sequences plus "synthetic long-context Q&A data"; it
reports RULER falling from 91.7 at 4k to 43.3 at 32k (Table 9). The base follows
:func:`mmafm.layers.rope.rope_base_for_context` (``base ** (ln(T'/2pi) / ln(T/2pi))``, which gives
exactly 6,315,089). The 2025 report's final stage goes to 65K: ``configs/stages/05_long_context_65k.yaml``.

At tiny scale, on the shared trainer:

1. the weights of ``04_continued_pretrain`` (``init_checkpoint``), ``rope_theta`` raised from
   the checkpoint's base for ``trained_len`` -> ``target_len`` (defaults: 04's ``seq_len`` and
   twice it);
2. rows of ``target_len`` tokens: windows of the concatenated documents of the data stage's
   sources and the generated ones (``mixture``, as in 04) and, for a ``task_share`` of the rows,
   generated long-context tasks (:mod:`mmafm.data.long_context`: passkey, needles, multi-key
   needles, variable tracking) in haystacks of the *train* split's documents, scored on their
   answer tokens only (``answer_only``: the documents' mean loss plus the answers' mean), and
   optionally repeated-span rows that teach copying (``copy_examples``, :func:`copy_rows`); with
   ``curriculum_steps``, those steps come first and use short rows only (``curriculum_len``: copy
   rows, short task examples, document windows; :func:`curriculum_pool`), the LR flat through
   them (:func:`curriculum_schedule`), because copying forms in steps, not tokens; with
   ``curriculum_stages`` > 1 the rows double in length from stage to stage (:func:`curriculum_plan`),
   so they reach ``target_len`` in steps: one jump from 64 to 512 tokens undid the curriculum; the
   curriculum's document windows follow ``mixture`` (:func:`mixture_document_rows`), and with
   ``curriculum_long_share`` some of its steps are plain long rows (:func:`curriculum_long_step`),
   both to keep the held-out perplexity near the no-curriculum run's (docs/training.md);
3. before and after, the RULER-like ladder (:mod:`mmafm.eval.long_context`): greedy exact match
   of every task at every length of ``ladder`` on haystacks of the *held-out* documents, plus the
   answer's log-likelihood per token (teacher-forced; it moves long before greedy answers turn
   right at this scale);
4. the figure of the report's Table 9 shape, accuracy against context length before / after
   with the trained lengths marked, the answer log-likelihood beside it, loss curves, and the
   checkpoint (its config carries the new ``rope_theta`` and ``max_seq_len``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mmafm.config import ConfigError
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig
from mmafm.stages.continued_pretrain import (
    data_stage_record,
    load_text_model,
    save_text_stage,
    trained_seq_len,
    training_facts,
)
from mmafm.stages.text_pretrain import TextPretrainTask
from mmafm.train.schedule import WarmupConstant, WarmupCosine, build_scheduler
from mmafm.train.trainer import setting

__all__ = ["LongContextConfig", "LongContextRows", "LongContextTask", "answer_nll", "answer_only_targets", "answer_tokens",
           "copy_rows", "CurriculumLR", "CurriculumStage", "curriculum_batch_size", "curriculum_long_step", "curriculum_plan", "curriculum_stage_ends", "curriculum_stage_of",
           "document_rows", "mixture_document_rows", "curriculum_pool", "curriculum_schedule", "parse_ladder",
           "run", "task_rows"]

STAGE = "05_long_context"
EVAL_SEED_OFFSET = 1_000_003  # evaluation examples never share a seed with training examples
IGNORE = -100  # a target the loss skips (the text model's ignore_index)
CURRICULUM_POOL = 4096  # curriculum rows built up front at most (a longer curriculum cycles through them)
CURRICULUM_SEED_OFFSET = 2_000_003  # curriculum task examples differ from the long training examples


@dataclass
class LongContextConfig(TrainStageConfig):
    """Context lengthening. Defaults: the tiny pipeline (trained 256 -> 512 tokens)."""

    # --- inputs (a pipeline wires them)
    init_checkpoint: str = field(default="", metadata={"path": "model"})  # 04_continued_pretrain's `checkpoint` (or its stage folder)
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer`
    data_dir: str = field(default="", metadata={"path": "dir"})  # 00_data's `data_dir` (sources, split, caps)
    # --- context lengthening
    trained_len: int = field(default=0, metadata={"min": 0})  # T: length init_checkpoint was trained at; 0 = its recorded seq_len [paper: 8192]
    target_len: int = field(default=0, metadata={"min": 0})  # T': new training length (seq_len); 0 = 2 x trained_len [paper: 32768 = 4 x 8192]
    rope_theta: float = field(default=0.0, metadata={"min": 0.0})  # new RoPE base; 0 = rope_base_for_context(checkpoint's base, T, T') [paper: 500k -> 6,315,089]
    # --- data
    mixture: str = "wikipedia:0.4,jargon:0.2,arithmetic:0.2,code:0.2"  # document rows: source:weight as in 04 [open]
    generated_documents: int = field(default=1000, metadata={"min": 10})  # documents per generated source
    task_share: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # share of rows that are long-context tasks [paper: "synthetic long-context Q&A", share unpublished; open]
    tasks: str = "passkey,needle,multikey,variable_tracking"  # mmafm.data.long_context.TASKS, comma-separated
    haystack_sources: str = "wikipedia,jargon"  # the tasks' haystacks: data-stage text sources (train split for training, val for evaluation)
    task_examples: int = field(default=96, metadata={"min": 1})  # generated training examples (cycled through)
    copy_examples: int = field(default=0, metadata={"min": 0})  # repeated-span rows (copy_rows) added to the task rows' pool: they teach copying [open]
    answer_only: bool = True  # a task row is scored on its answer tokens and the EOS ending them only (their own mean, added to the documents' loss) [open: as RULER-style Q&A tuning; false = on all its tokens]
    digits: int = field(default=5, metadata={"min": 2, "max": 12})  # digits of every needle value [RULER: 7; tiny: 5, open]
    curriculum_steps: int = field(default=0, metadata={"min": 0})  # the first steps train on short rows alone (curriculum_len tokens, a long step's tokens per step): repeated spans scored on the copy (copy_rows), short task examples and, for 1 - task_share of the rows, document windows; copying (induction) forms there in steps, not tokens [open: not in the report; 0 at tiny size (it costs ~2.5 CPU minutes); configs/pipelines/reproduce.yaml's 05 uses 800 with curriculum_stages=3 and curriculum_long_share=0.125, the setting that gave nonzero exact match at a held-out ppl within 14% of the run without, docs/training.md]
    curriculum_len: int = field(default=128, metadata={"min": 16})  # row length of the curriculum steps (of its first stage), in tokens [open]
    curriculum_stages: int = field(default=1, metadata={"min": 1})  # the curriculum's row lengths: curriculum_len doubled from stage to stage (3: 64 -> 128 -> 256), each stage half the steps of the one before (4/7, 2/7, 1/7 of curriculum_steps), so the rows lengthen in steps before target_len instead of in one jump (curriculum_plan) [open: a single jump from 64-token rows to 512 undid the curriculum, docs/training.md]
    curriculum_long_share: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5})  # of the curriculum's steps, the share (evenly spaced, curriculum_long_step) that are plain long rows: target_len windows of the mixture, no task rows, so the text at the new length and RoPE base is not left for the last steps alone [open: not in the report; 0 = none, docs/training.md]
    curriculum_task_share: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # of the curriculum's non-document rows, the share that are task examples (of the tasks that fit curriculum_len), the rest copy rows [open]
    batch_size: int = field(default=4, metadata={"min": 1})  # rows of target_len per step per rank
    # --- optimization (shared trainer) [paper: 100B tokens; the 2024 recipe's continued-stage
    # settings carried over, open]
    optimizer: str = setting("optimizer", "afm")  # [code+paper: the AFM optimizer]
    max_steps: int = setting("max_steps", 60)
    lr: float = setting("lr", 1e-3)  # peak [open: as 04 at tiny size; 3e-4 recalled at full size]
    weight_decay: float = setting("weight_decay", 1e-5)  # [recalled: 1e-5, as continued pretraining]
    warmup_steps: int = setting("warmup_steps", 5)
    min_lr_ratio: float = setting("min_lr_ratio", 0.001)  # [paper: continued stage's 0.001]
    eval_every: int = setting("eval_every", 0)  # held-out document loss at the end (the ladder runs before and after)
    ckpt_every: int = setting("ckpt_every", 30)
    # --- evaluation: the RULER-like ladder
    ladder: str = "192,256,512,1024"  # context lengths in tokens, comma-separated (each fits every task: multikey needs ~150 at digits=5); the longest sets max_seq_len
    eval_examples: int = field(default=6, metadata={"min": 1})  # examples per task and length
    eval_batches: int = field(default=2, metadata={"min": 1})  # held-out document batches (general loss)


def parse_ladder(text: str) -> list[int]:
    """``"128,256,512"`` -> ``[128, 256, 512]`` (sorted, each > 0).

    Raises:
        ConfigError: an entry that is not a positive integer, or no entry.
    """
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise ConfigError(f"{STAGE}: ladder {text!r}: expected comma-separated token counts, e.g. '256,512,1024'") from err
    if not lengths or lengths[0] < 1:
        raise ConfigError(f"{STAGE}: ladder {text!r}: expected comma-separated positive token counts")
    return lengths


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ConfigError(f"{STAGE}: {what} {text!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return names


# -------------------------------------------------------------------------------- the data
class LongContextRows:
    """``(input_ids, targets, is_task)`` batches ``(B, T)``, ``(B, T)``, ``(B,)`` mixing document
    windows and long-context tasks.

    Each row is, with probability ``task_share``, one of ``task_rows`` (a task example's tokens,
    EOS, then document tokens up to ``T + 1``), else a window of the documents (``documents``, a
    :class:`~mmafm.data.mixture.MixtureShards` of the same ``T``). With ``answer_spans`` (``(N, 2)``:
    the row positions ``[first, end)`` of each task row's answer tokens) a task row's targets are
    ``IGNORE`` everywhere but its answer: the model is scored on answering, not on the haystack.
    Draws are fixed by ``(seed, epoch, batch)``, so the trainer's exact resume holds; an epoch has
    ``len(documents)`` batches.

    A curriculum (``curriculum``: ``(rows (M, t + 1), spans (M, 2))`` of short rows, ``t`` < ``T``,
    and ``curriculum_batches`` > 0) comes first: the first ``curriculum_batches`` batches (counted
    over epochs: ``epoch * len(self) + batch``) are ``(b, t)`` rows of that pool alone
    (``b = curriculum_batch_size``, 0 = ``B``), every one scored on its span only; a row whose
    span is the whole row (``(1, t + 1)``: a document window, :func:`document_rows`) is flagged a
    document row, the others task rows. The long rows follow it. A staged curriculum passes a list
    of such pools (one row length each, shortest first) and a list of batch sizes: curriculum
    batch ``k`` draws from pool :func:`curriculum_stage_of` ``(k, curriculum_batches, len(pools))``;
    with ``curriculum_long_share`` > 0, the curriculum batches :func:`curriculum_long_step` picks
    are plain long rows instead (the document batch, no task rows).
    """

    def __init__(self, documents: Any, task_rows: np.ndarray, task_share: float, seed: int = 0,
                 answer_spans: np.ndarray | None = None,
                 curriculum: tuple[np.ndarray, np.ndarray] | None = None, curriculum_batches: int = 0,
                 curriculum_batch_size: int = 0, curriculum_long_share: float = 0.0):
        self.documents, self.task_rows, self.task_share, self.seed = documents, task_rows, task_share, seed
        if task_share > 0 and len(task_rows) == 0:
            raise ValueError("task_share > 0 needs at least one task row")
        if answer_spans is not None and np.shape(answer_spans) != (len(task_rows), 2):
            raise ValueError(f"answer_spans must be ({len(task_rows)}, 2), got {np.shape(answer_spans)}")
        pools = [] if curriculum is None else list(curriculum) if isinstance(curriculum, list) else [curriculum]
        if curriculum_batches and (not pools or any(len(rows) == 0 or np.shape(spans) != (len(rows), 2)
                                                    for rows, spans in pools)):
            raise ValueError("curriculum_batches > 0 needs curriculum = (rows (M, t + 1), spans (M, 2)) with M >= 1, "
                             "or a list of such pools")
        sizes = list(curriculum_batch_size) if isinstance(curriculum_batch_size, (list, tuple)) else [curriculum_batch_size] * len(pools)
        if len(sizes) != len(pools):
            raise ValueError(f"curriculum_batch_size: {len(sizes)} sizes for {len(pools)} curriculum pools")
        self.answer_spans = answer_spans
        self.curriculum, self.curriculum_batches = pools, curriculum_batches
        self.curriculum_batch_size = sizes
        self.curriculum_long_share = curriculum_long_share
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.documents.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for index, (inputs, targets) in enumerate(self.documents):
            counted = self.epoch * len(self) + index
            if counted < self.curriculum_batches and curriculum_long_step(counted, self.curriculum_long_share):
                yield inputs, targets, torch.zeros(inputs.shape[0], dtype=torch.bool)  # plain long rows: documents only
                continue
            if counted < self.curriculum_batches:
                stage = curriculum_stage_of(counted, self.curriculum_batches, len(self.curriculum))
                yield self._curriculum_batch(self.curriculum[stage], self.curriculum_batch_size[stage] or inputs.shape[0], index)
                continue
            rng = np.random.default_rng([self.seed, self.epoch, index, 5])
            use_task = rng.random(inputs.shape[0]) < self.task_share  # (B,)
            if use_task.any():
                rows = torch.cat([inputs, targets[:, -1:]], dim=1)  # (B, T+1)
                picks = rng.integers(0, len(self.task_rows), size=int(use_task.sum()))
                rows[torch.from_numpy(use_task)] = torch.from_numpy(self.task_rows[picks].astype(np.int64))
                inputs, targets = rows[:, :-1], rows[:, 1:].clone()
                if self.answer_spans is not None:
                    for row, pick in zip(np.flatnonzero(use_task), picks):
                        targets[row] = answer_only_targets(targets[row], *self.answer_spans[pick])
            yield inputs, targets, torch.from_numpy(use_task)

    def _curriculum_batch(self, pool: tuple[np.ndarray, np.ndarray], batch_size: int, index: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batch_size`` rows of a curriculum ``pool``, drawn by ``(seed, epoch, index)``: inputs and
        span-only targets ``(B, t)``, and which rows are task (copy) rows ``(B,)``."""
        rows, spans = pool
        picks = np.random.default_rng([self.seed, self.epoch, index, 6]).integers(0, len(rows), size=batch_size)
        chosen = torch.from_numpy(rows[picks].astype(np.int64))  # (B, t + 1)
        inputs, targets = chosen[:, :-1], chosen[:, 1:].clone()
        is_task = torch.ones(batch_size, dtype=torch.bool)  # (B,)
        for row, pick in enumerate(picks):
            first, end = spans[pick]
            if (first, end) == (1, rows.shape[1]):  # a span over the whole row: a document window
                is_task[row] = False
            targets[row] = answer_only_targets(targets[row], first, end)
        return inputs, targets, is_task


def answer_only_targets(targets: torch.Tensor, first: int, end: int) -> torch.Tensor:  # (T,)
    """``targets`` (``row[1:]`` of a row of ``T + 1`` tokens) with every position ``IGNORE`` but
    those predicting the row's tokens ``[first, end)`` (target ``p`` is row token ``p + 1``)."""
    if not 1 <= first <= end <= targets.numel() + 1:
        raise ValueError(f"answer span [{first}, {end}) does not fit a row of {targets.numel() + 1} tokens")
    out = torch.full_like(targets, IGNORE)
    out[first - 1 : end - 1] = targets[first - 1 : end - 1]
    return out


def answer_tokens(example: Any, tokenizer: Any) -> tuple[list[int], int, int]:
    """``(ids, first, end)``: ``example.text`` as token ids (no BOS / EOS) with its answer at
    ``ids[first:end]``, the tokens after ``encode(example.prompt)`` (when the tokenizer merges
    across the boundary, the answer is encoded apart after the prompt)."""
    prompt = tokenizer.encode(example.prompt)
    full = tokenizer.encode(example.text)
    if full[: len(prompt)] != prompt:  # a merge across the boundary: encode the answer apart
        full = prompt + tokenizer.encode(" " + example.answer)
    return full, len(prompt), len(full)


def task_rows(examples: Sequence[Any], tokenizer: Any, filler: np.ndarray, seq_len: int, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (N, seq_len + 1), answer_spans (N, 2))``: each example's text (prompt and answer
    tokens as :func:`answer_tokens`), EOS, then a seeded window of ``filler``; ``answer_spans[i]``
    the row positions ``[first, end)`` of example ``i``'s answer *and the EOS after it* (when the
    row holds it): scored on it, the model learns to end its answer, which greedy exact match needs
    (a model scored on the digits alone retrieves them, then repeats the last one: "1094999")."""
    rng = random.Random(f"task-rows-{seed}")
    rows = np.zeros((len(examples), seq_len + 1), dtype=np.int64)
    spans = np.zeros((len(examples), 2), dtype=np.int64)
    for row, example in enumerate(examples):
        ids, first, end = answer_tokens(example, tokenizer)
        if end > seq_len + 1:
            raise ValueError(f"task example {row} ({example.task}) measures {end} tokens, more than a row of {seq_len + 1}")
        ids = (ids + [tokenizer.eos_id])[: seq_len + 1]
        start = rng.randrange(max(1, len(filler) - seq_len - 1))
        rest = np.asarray(filler[start : start + seq_len + 1 - len(ids)], dtype=np.int64)
        rows[row, : len(ids)] = ids
        rows[row, len(ids) : len(ids) + len(rest)] = rest
        spans[row] = (first, min(end + 1, seq_len + 1))  # the answer and its EOS
    return rows, spans


def copy_rows(filler: np.ndarray, count: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (count, seq_len + 1), answer_spans (count, 2))`` of repeated spans: a window ``w`` of
    ``filler`` (``L`` tokens, drawn in ``[seq_len / 8, seq_len / 2]``), ``w`` again, then another
    window of ``filler``; the span ``[L + 1, 2L)`` is the copy after its first token (which
    nothing announces). Scored on that span alone, such rows teach copying from far back in the
    context (induction), which every retrieval task needs and which a small pretrained model may
    not have (docs/training.md: the tiny 04 model copies nothing)."""
    if len(filler) < 2 * seq_len + 2:
        raise ValueError(f"copy rows need a filler of at least {2 * seq_len + 2} tokens, got {len(filler)}")
    rng = np.random.default_rng([seed, 7])
    rows = np.zeros((count, seq_len + 1), dtype=np.int64)
    spans = np.zeros((count, 2), dtype=np.int64)
    for row in range(count):
        length = int(rng.integers(max(2, seq_len // 8), seq_len // 2 + 1))
        start, rest = (int(v) for v in rng.integers(0, len(filler) - seq_len - 1, size=2))
        window = np.asarray(filler[start : start + length], dtype=np.int64)
        rows[row] = np.concatenate([window, window, np.asarray(filler[rest : rest + seq_len + 1 - 2 * length], dtype=np.int64)])
        spans[row] = (length + 1, 2 * length)
    return rows, spans


@dataclass(frozen=True)
class CurriculumStage:
    """One row length of a staged curriculum: steps ``[first, end)`` of ``rows`` rows of ``length`` tokens."""

    first: int
    end: int
    length: int
    rows: int


def curriculum_stage_ends(curriculum_steps: int, stages: int) -> list[int]:
    """The step where each curriculum stage ends: stage ``i`` gets ``2**(stages - 1 - i)`` shares of
    the ``2**stages - 1`` (3 stages: 4/7, 2/7, 1/7 of the steps), each stage half as many steps as
    the one before: copying forms in the first, shortest stage, which needs its hundreds of steps
    (docs/training.md), and the later ones only carry it to longer rows. End ``i`` is
    ``curriculum_steps * (2**stages - 2**(stages - 1 - i)) // (2**stages - 1)``.

    Raises:
        ValueError: fewer than ``2**stages - 1`` steps (some stage would get none).
    """
    if stages < 1 or curriculum_steps < 2**stages - 1:
        raise ValueError(f"curriculum_stages {stages} needs at least {2**stages - 1} curriculum_steps, got {curriculum_steps}")
    whole = 2**stages - 1
    return [curriculum_steps * (2**stages - 2 ** (stages - 1 - i)) // whole for i in range(stages)]


def curriculum_long_step(batch: int, share: float) -> bool:
    """Whether curriculum batch ``batch`` is one of plain long rows: ``floor((batch + 1) * share) >
    floor(batch * share)``, so ``share`` of the batches are, evenly spaced (0.125: every 8th, the
    first at batch 7), and none with ``share`` 0."""
    return int((batch + 1) * share) > int(batch * share)


def curriculum_stage_of(batch: int, curriculum_steps: int, stages: int) -> int:
    """The stage (0-based) of curriculum batch ``batch`` (< ``curriculum_steps``): the first whose
    end (:func:`curriculum_stage_ends`) lies after it."""
    if not 0 <= batch < curriculum_steps:
        raise ValueError(f"curriculum batch {batch} outside [0, {curriculum_steps})")
    return next(i for i, end in enumerate(curriculum_stage_ends(curriculum_steps, stages)) if batch < end)


def curriculum_plan(curriculum_steps: int, curriculum_len: int, stages: int, batch_size: int, seq_len: int
                    ) -> list[CurriculumStage]:
    """The staged curriculum: stage ``i`` has rows of ``curriculum_len * 2**i`` tokens,
    :func:`curriculum_batch_size` of them a step, over the steps :func:`curriculum_stage_ends` gives
    it; the rows lengthen in steps up to ``seq_len`` (the stage's rows), which every stage's length
    must stay below. Raises ``ValueError`` on a length that does not, or on too few steps."""
    ends = curriculum_stage_ends(curriculum_steps, stages)
    longest = curriculum_len * 2 ** (stages - 1)
    if longest >= seq_len:
        raise ValueError(f"curriculum_len {curriculum_len} doubled over {stages} stages reaches {longest}, "
                         f"not shorter than target_len {seq_len}")
    return [CurriculumStage(([0] + ends)[i], ends[i], curriculum_len * 2**i,
                            curriculum_batch_size(batch_size, seq_len, curriculum_len * 2**i)) for i in range(stages)]


def curriculum_batch_size(batch_size: int, seq_len: int, curriculum_len: int) -> int:
    """Rows per curriculum batch: as many tokens as a batch of ``batch_size`` rows of ``seq_len``
    (``batch_size * (seq_len // curriculum_len)``), so a curriculum step costs no more than a long
    step and carries more rows (copying forms in steps, not tokens: docs/training.md)."""
    return batch_size * max(1, seq_len // curriculum_len)


@dataclass
class CurriculumLR:
    """LR multiplier: the warm-up and then the peak for the ``curriculum_steps`` (with a cosine over
    the whole run the LR had fallen to a third of its peak before copying formed, docs/training.md),
    then ``after(step - curriculum_steps)``: the stage's schedule over the remaining steps."""

    curriculum_steps: int
    warmup: WarmupConstant
    after: Callable[[int], float]

    def __call__(self, step: int) -> float:
        return self.warmup(step) if step < self.curriculum_steps else self.after(step - self.curriculum_steps)


def curriculum_schedule(optimizer: torch.optim.Optimizer, config: Any, curriculum_steps: int = 0) -> LambdaLR:
    """The trainer's schedule (``config.schedule``: warm-up + cosine over ``max_steps`` or constant)
    when ``curriculum_steps`` is 0; else :class:`CurriculumLR`: warm-up and flat through the
    curriculum, then a second warm-up (the long rows are a new distribution: at the peak LR their
    first steps undid the curriculum, docs/training.md) and the cosine or the constant over the
    ``max_steps - curriculum_steps`` left."""
    if not curriculum_steps:
        return build_scheduler(optimizer, config)
    after = (WarmupCosine(config.warmup_steps, max(1, config.max_steps - curriculum_steps), config.min_lr_ratio)
             if getattr(config, "schedule", "cosine") == "cosine" else WarmupConstant(config.warmup_steps))
    return LambdaLR(optimizer, CurriculumLR(curriculum_steps, WarmupConstant(config.warmup_steps), after))


def document_rows(filler: np.ndarray, count: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (count, seq_len + 1), spans (count, 2))``: seeded windows of ``filler``, each span the
    whole row ``(1, seq_len + 1)`` (every token scored, as a document row is)."""
    if len(filler) < seq_len + 2:
        raise ValueError(f"document rows need a filler of at least {seq_len + 2} tokens, got {len(filler)}")
    starts = np.random.default_rng([seed, 9]).integers(0, len(filler) - seq_len - 1, size=count)
    rows = np.stack([np.asarray(filler[s : s + seq_len + 1], dtype=np.int64) for s in starts]) if count else \
        np.zeros((0, seq_len + 1), dtype=np.int64)
    return rows, np.tile(np.array([[1, seq_len + 1]], dtype=np.int64), (count, 1))


def mixture_document_rows(streams: Mapping[str, np.ndarray], weights: Mapping[str, float], count: int, seq_len: int,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (count, seq_len + 1), spans (count, 2))``: :func:`document_rows` windows of every
    source of ``weights`` (its token stream in ``streams``), as many of each as its weight's share
    of ``count`` (largest remainders), in a seeded order: the curriculum's plain-text rows follow
    the stage's mixture as its long rows do (windows of one source alone raised the held-out
    perplexity, docs/training.md)."""
    names = [name for name in weights if weights[name] > 0]
    if not names:
        raise ValueError(f"mixture_document_rows: no source of positive weight in {dict(weights)}")
    total = sum(weights[name] for name in names)
    exact = [count * weights[name] / total for name in names]
    counts = [int(share) for share in exact]
    for i in sorted(range(len(names)), key=lambda i: counts[i] - exact[i])[: count - sum(counts)]:
        counts[i] += 1  # the largest remainders first
    parts = [document_rows(streams[name], n, seq_len, seed + 1000 * i) for i, (name, n) in enumerate(zip(names, counts))]
    rows = np.concatenate([r for r, _ in parts]).reshape(count, seq_len + 1)
    spans = np.concatenate([s for _, s in parts]).reshape(count, 2)
    order = np.random.default_rng([seed, 11]).permutation(count)
    return rows[order], spans[order]


def curriculum_pool(tasks: tuple[np.ndarray, np.ndarray], copies: tuple[np.ndarray, np.ndarray], task_share: float,
                    size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (size, t + 1), spans (size, 2))``: ``round(task_share * size)`` rows of ``tasks``
    (cycled in order) and the rest of ``copies`` (cycled), in a seeded order; each pool is a
    ``(rows, spans)`` pair of rows of one length ``t + 1`` (:func:`task_rows`, :func:`copy_rows`)."""
    if not 0.0 <= task_share <= 1.0 or size < 1:
        raise ValueError(f"curriculum_pool: task_share in [0, 1] and size >= 1 expected, got {task_share}, {size}")
    wanted = round(task_share * size)
    parts = []
    for (rows, spans), count, name in ((tasks, wanted, "tasks"), (copies, size - wanted, "copies")):
        if count and len(rows) == 0:
            raise ValueError(f"curriculum_pool: {count} rows of {name} asked for, but the {name} pool is empty")
        if count:
            parts.append((np.resize(rows, (count, rows.shape[1])), np.resize(spans, (count, 2))))
    widths = {rows.shape[1] for rows, _ in parts}
    if len(widths) != 1:
        raise ValueError(f"curriculum_pool: task and copy rows differ in length ({sorted(widths)})")
    rows, spans = np.concatenate([r for r, _ in parts]), np.concatenate([s for _, s in parts])
    order = np.random.default_rng([seed, 8]).permutation(size)
    return rows[order], spans[order]


class LongContextTask(TextPretrainTask):
    """:class:`TextPretrainTask` on :class:`LongContextRows` batches: the loss is the documents'
    mean cross-entropy plus, when the batch holds task rows, their answers' mean cross-entropy
    (each a mean over its own tokens, so a few answer tokens are not drowned by the documents').
    Metrics: ``ce`` (documents), ``ce_answer``, ``task_rows``."""

    def training_forward(self, batch: tuple) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        inputs, targets = batch[0], batch[1]  # (B, T), (B, T)
        is_task = batch[2] if len(batch) > 2 else torch.zeros(inputs.shape[0], dtype=torch.bool)  # (B,)
        logits = self.model(inputs)  # (B, T, V)
        losses, metrics = {}, {"task_rows": float(is_task.sum())}
        for name, rows in (("lm", ~is_task), ("answer", is_task)):
            # the same names on every step and rank (their records are summed across ranks): a
            # kind absent from the batch adds a zero loss and logs 0 (task_rows tells which)
            if rows.any():
                losses[name], parts = self.compute_loss(logits[rows], targets[rows])
            else:
                losses[name], parts = logits.sum() * 0.0, {"ce": 0.0}
            metrics["ce" if name == "lm" else "ce_answer"] = parts["ce"]
        return losses, metrics


# -------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_nll(model: nn.Module, tokenizer: Any, examples: Sequence[Any], batch_size: int = 4) -> list[float]:
    """Mean negative log-likelihood per answer token of each example, teacher-forced: the answer
    tokens are those of ``encode(example.text)`` after ``encode(example.prompt)``."""
    model.eval()
    device = next(model.parameters()).device
    rows, spans = [], []
    for example in examples:
        full, first, end = answer_tokens(example, tokenizer)
        rows.append(full)
        spans.append((first, end))
    out = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)  # right padding: a causal model never looks right
        logprobs = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # (B, W, V)
        for i, r in enumerate(chunk):
            first, end = spans[begin + i]
            positions = torch.arange(first - 1, end - 1, device=device)
            picked = logprobs[i, positions, torch.tensor(r[first:end], device=device)]
            out.append(float(-picked.mean()))
    return out


def ladder_scores(model: nn.Module, tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], count: int,
                  documents: Sequence[str], seed: int, digits: int) -> dict:
    """:func:`mmafm.eval.long_context.evaluate_long_context` (greedy exact match) plus the mean
    answer NLL per task and length: ``{"mean", "accuracy", "nll", "nll_mean", "examples"}``."""
    from mmafm.data.long_context import long_context_examples
    from mmafm.eval.long_context import evaluate_long_context

    result = evaluate_long_context(model, tokenizer, tasks=tasks, lengths=lengths, count=count, seed=seed,
                                   documents=documents, digits=digits)
    nll = {task: {} for task in tasks}
    for task in tasks:
        for length in lengths:
            examples = long_context_examples(task, length, count, documents, tokenizer, seed=seed, digits=digits)
            nll[task][length] = float(np.mean(answer_nll(model, tokenizer, examples)))
    result["nll"] = nll
    result["nll_mean"] = {length: float(np.mean([nll[t][length] for t in tasks])) for length in lengths}
    return result


def _figures(stage_dir: StageDir, before: dict, after: dict, marks: Mapping[str, int], records: list[dict],
             batch_size: int, curriculum_steps: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmafm.eval.long_context import plot_accuracy_vs_length

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    plot_accuracy_vs_length({"before (04)": before["mean"], "after (05)": after["mean"]}, ax=left,
                            title="RULER-like accuracy (mean over tasks)")
    for label, curve in (("before (04)", before["nll_mean"]), ("after (05)", after["nll_mean"])):
        lengths = sorted(curve)
        right.plot(lengths, [curve[n] for n in lengths], "o-", label=label)
    for axis in (left, right):
        for (label, length), style in zip(marks.items(), ("--", ":")):
            axis.axvline(length, ls=style, c="grey", label=f"{label}: {length}")
    right.set_xscale("log", base=2)
    lengths = sorted(before["nll_mean"])
    right.set_xticks(lengths, [str(n) for n in lengths])
    right.minorticks_off()
    right.set(xlabel="context length (tokens)", ylabel="nats / answer token", title="answer NLL (teacher-forced)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    stage_dir.save_figure(fig, "accuracy_vs_length")
    plt.close(fig)

    tasks = list(before["accuracy"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.4), squeeze=False, sharex=True)
    for column, task in enumerate(tasks):
        for row, (key, ylabel) in enumerate((("accuracy", "exact match"), ("nll", "answer NLL (nats/token)"))):
            axis = axes[row, column]
            for label, result in (("before", before), ("after", after)):
                lengths = sorted(result[key][task])
                axis.plot(lengths, [result[key][task][n] for n in lengths], "o-", label=label)
            for (_, length), style in zip(marks.items(), ("--", ":")):
                axis.axvline(length, ls=style, c="grey")
            axis.set_xscale("log", base=2)
            axis.set_xticks(lengths, [str(n) for n in lengths])
            axis.minorticks_off()
            if row == 0:
                axis.set(title=task, ylim=(-0.02, 1.02))
            else:
                axis.set(xlabel="tokens")
            if column == 0:
                axis.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    stage_dir.save_figure(fig, "accuracy_per_task")
    plt.close(fig)

    train = [r for r in records if "ce" in r and r.get("task_rows", 0) < batch_size]  # steps with document rows
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="documents (every token)")
    answers = [r for r in records if r.get("task_rows", 0) > 0]
    if answers:
        ax.plot([r["step"] for r in answers], [r["ce_answer"] for r in answers], label="task rows (answer tokens)")
    if curriculum_steps:
        ax.axvline(curriculum_steps, ls=":", c="grey", label="end of the short-row curriculum")
    ax.set(xlabel="step", ylabel="train cross-entropy (nats / token)", title=f"context lengthening at {marks['05 trained']} tokens")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- run
def run(cfg: LongContextConfig) -> dict[str, str]:
    """Lengthen the context of ``init_checkpoint``; returns the stage outputs."""
    from mmafm.checkpoint import load_model
    from mmafm.data.long_context import TASKS, haystack_documents, make_example
    from mmafm.data.mixture import MixtureShards, data_stage_sources, parse_mixture, source_streams
    from mmafm.layers.rope import rope_base_for_context
    from mmafm.stages.text_pretrain import TEXT_FAMILIES, held_out_batches
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    for name in ("init_checkpoint", "tokenizer", "data_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"{STAGE}: {name} is empty; pass "
                              + {"init_checkpoint": "04_continued_pretrain's `checkpoint`",
                                 "tokenizer": "00_data's `tokenizer`", "data_dir": "00_data's `data_dir`"}[name])
    data_config, data_outputs = data_stage_record(cfg.data_dir)
    try:
        weights = parse_mixture(cfg.mixture, data_stage_sources(data_config))
    except ValueError as err:
        raise ConfigError(f"{STAGE}: {err}") from err
    tasks = _names(cfg.tasks, TASKS, "tasks")
    natural = [n for n in data_stage_sources(data_config) if n in str(data_config["text_sources"]).split(",")]
    haystack_sources = _names(cfg.haystack_sources, [n for n in natural if n != "captions"], "haystack_sources")
    ladder = parse_ladder(cfg.ladder)
    trained = cfg.trained_len or trained_seq_len(cfg.init_checkpoint)
    target = cfg.target_len or 2 * trained
    if target <= trained:
        raise ConfigError(f"{STAGE}: target_len {target} must exceed trained_len {trained}")
    if cfg.curriculum_steps and cfg.curriculum_len >= target:
        raise ConfigError(f"{STAGE}: curriculum_len {cfg.curriculum_len} must be shorter than target_len {target}")
    plan: list[CurriculumStage] = []
    if cfg.curriculum_steps:
        try:
            plan = curriculum_plan(cfg.curriculum_steps, cfg.curriculum_len, cfg.curriculum_stages, cfg.batch_size, target)
        except ValueError as err:
            raise ConfigError(f"{STAGE}: {err}") from err
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    context = max(target, ladder[-1])

    base = float(load_model(cfg.init_checkpoint, family=TEXT_FAMILIES).config.rope_theta)
    theta = cfg.rope_theta or rope_base_for_context(base, trained, target)
    before_model = load_text_model(cfg.init_checkpoint, tokenizer.vocab_size, context, STAGE)

    docs = dict(sources=tuple(haystack_sources), limit=int(data_config.get("text_cap", 0)),
                seed=int(data_config.get("seed", 0)), val_fraction=float(data_config.get("val_fraction", 0.05)))
    eval_haystack = haystack_documents(split="val", **docs)
    train_haystack = haystack_documents(split="train", **docs)
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    for task in tasks:  # every rung must hold every task's needles and question: fail before any work
        try:
            make_example(task, ladder[0], eval_haystack, tokenizer, seed=eval_seed, digits=cfg.digits)
        except ValueError as err:
            raise ConfigError(f"{STAGE}: ladder {cfg.ladder!r}: {err}") from err
    before = ladder_scores(before_model, tokenizer, tasks, ladder, cfg.eval_examples, eval_haystack, eval_seed, cfg.digits)
    del before_model

    model = load_text_model(cfg.init_checkpoint, tokenizer.vocab_size, context, STAGE, rope_theta=theta)
    streams, _ = source_streams(cfg.data_dir, data_config, tokenizer, list(weights), cfg.generated_documents)
    documents = MixtureShards({n: streams[n]["train"] for n in weights}, weights, target, cfg.batch_size, seed=cfg.seed)
    examples = [
        _train_example(tasks[index % len(tasks)], target, train_haystack, tokenizer, cfg.seed, index, cfg.digits)
        for index in range(cfg.task_examples)
    ]
    filler = streams[next(iter(weights))]["train"]
    rows, spans = task_rows(examples, tokenizer, filler, target, cfg.seed)
    if cfg.copy_examples:  # repeated spans in the same pool of task rows
        copies, copy_spans = copy_rows(filler, cfg.copy_examples, target, cfg.seed)
        rows, spans = np.concatenate([rows, copies]), np.concatenate([spans, copy_spans])
    curriculum, curriculum_tasks = [], []
    for stage in plan:  # one pool per row length, shortest first
        pool, fitting = _curriculum(cfg, stage, tasks, train_haystack, tokenizer, filler,
                                    {n: streams[n]["train"] for n in weights}, weights)
        curriculum.append(pool)
        curriculum_tasks += [task for task in fitting if task not in curriculum_tasks]
    train_data = LongContextRows(documents, rows, cfg.task_share, seed=cfg.seed,
                                 answer_spans=spans if cfg.answer_only else None,
                                 curriculum=curriculum or None, curriculum_batches=cfg.curriculum_steps,
                                 curriculum_batch_size=[stage.rows for stage in plan],
                                 curriculum_long_share=cfg.curriculum_long_share)
    val = held_out_batches(data_outputs["tokens_dir"], target, cfg.batch_size, cfg.eval_batches)
    trainer = Trainer(LongContextTask(model, val), train_data, cfg.train_config(), stage_dir,
                      scheduler_factory=partial(curriculum_schedule, curriculum_steps=cfg.curriculum_steps))
    records = trainer.fit()
    state = trainer.full_state_dict()
    if trainer.rank != 0:
        return {}
    model = load_text_model(cfg.init_checkpoint, tokenizer.vocab_size, context, STAGE, rope_theta=theta)
    model.load_state_dict(state)
    after = ladder_scores(model, tokenizer, tasks, ladder, cfg.eval_examples, eval_haystack, eval_seed, cfg.digits)

    marks = {"04 trained": trained, "05 trained": target}
    _figures(stage_dir, before, after, marks, records, cfg.batch_size, cfg.curriculum_steps)
    final = [r for r in records if "eval/val_loss" in r][-1]
    atomic_write_json(stage_dir.root / "ladder.json", {
        "lengths": ladder, "trained_len": trained, "target_len": target,
        "before": {k: before[k] for k in ("accuracy", "mean", "nll", "nll_mean")},
        "after": {k: after[k] for k in ("accuracy", "mean", "nll", "nll_mean")},
        "examples_after": after["examples"][: 4 * len(tasks)],
    })
    summary: dict[str, Any] = {
        "rope_theta_before": base,
        "rope_theta": round(theta, 1),
        "trained_len": trained,
        "target_len": target,
        "ruler_before": {str(n): round(v, 3) for n, v in before["mean"].items()},
        "ruler_after": {str(n): round(v, 3) for n, v in after["mean"].items()},
        "answer_nll_before": {str(n): round(v, 3) for n, v in before["nll_mean"].items()},
        "answer_nll_after": {str(n): round(v, 3) for n, v in after["nll_mean"].items()},
        "val_loss": round(final["eval/val_loss"], 4),
        "val_ppl": round(final["eval/val_ppl"], 3),
        **training_facts(weights, trainer, cfg, target, start, task_share=cfg.task_share,
                         curriculum_steps=cfg.curriculum_steps, curriculum_tasks=",".join(curriculum_tasks),
                         curriculum_lens=",".join(str(stage.length) for stage in plan)),
    }
    for stage in plan:  # curriculum steps saw their own rows of stage.length, but for the plain long ones
        short = sum(not curriculum_long_step(k, cfg.curriculum_long_share) for k in range(stage.first, min(stage.end, trainer.step)))
        summary["train_tokens"] -= short * (cfg.batch_size * target - stage.rows * stage.length) \
            * cfg.grad_accum_steps * trainer.world_size
    return save_text_stage(STAGE, cfg, stage_dir, model, trainer.step, summary, target,
                           {"ladder": str(stage_dir.root / "ladder.json")})


def _curriculum(cfg: LongContextConfig, stage: CurriculumStage, tasks: Sequence[str], haystack: Sequence[str],
                tokenizer: Any, filler: np.ndarray, streams: Mapping[str, np.ndarray], weights: Mapping[str, float]
                ) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    """One curriculum stage's pool (:func:`curriculum_pool`, one fresh row per curriculum row of the
    stage, at most ``CURRICULUM_POOL`` rows) and the tasks in it: those whose needles and question
    fit ``stage.length`` tokens, each example drawn at a length in [length / 4, length]; its
    document rows are windows of the mixture's ``streams`` by ``weights`` (:func:`mixture_document_rows`)."""
    from mmafm.data.long_context import make_example

    length = stage.length
    fitting = []
    for task in tasks:
        try:
            make_example(task, length, haystack, tokenizer, seed=cfg.seed, digits=cfg.digits)
            fitting.append(task)
        except ValueError:  # this task's needles and question alone exceed curriculum_len
            continue
    share = cfg.curriculum_task_share if fitting else 0.0
    if cfg.curriculum_task_share and not fitting:
        raise ConfigError(f"{STAGE}: curriculum row length {length}: no task of {list(tasks)} fits; raise curriculum_len "
                          "or set curriculum_task_share=0")
    total = min((stage.end - stage.first) * stage.rows, CURRICULUM_POOL)
    size = max(1, round(cfg.task_share * total))  # copy and task rows; the rest document windows, as in the long rows
    count = round(share * size)
    seed = cfg.seed + CURRICULUM_SEED_OFFSET + length - cfg.curriculum_len  # each stage's examples its own
    examples = [_train_example(fitting[i % len(fitting)], length, haystack, tokenizer, seed, i, cfg.digits)
                for i in range(count)]
    empty = (np.zeros((0, length + 1), dtype=np.int64), np.zeros((0, 2), dtype=np.int64))
    task_pool = task_rows(examples, tokenizer, filler, length, cfg.seed) if examples else empty
    copy_pool = copy_rows(filler, size - count, length, cfg.seed) if size > count else empty
    spans_rows = curriculum_pool(task_pool, copy_pool, share, size, cfg.seed)
    documents = mixture_document_rows(streams, weights, total - size, length, cfg.seed)
    order = np.random.default_rng([cfg.seed, 10]).permutation(total)
    return (np.concatenate([spans_rows[0], documents[0]])[order], np.concatenate([spans_rows[1], documents[1]])[order]), fitting


def _train_example(task: str, length: int, haystack: Sequence[str], tokenizer: Any, seed: int, index: int, digits: int):
    """Training example ``index``: its length drawn in [length / 4, length] (seeded), so the model
    retrieves at every distance up to the new context, not only at the longest."""
    from mmafm.data.long_context import make_example

    drawn = random.Random(f"train-length-{seed}-{index}").randint(max(length // 4, 1), length)
    try:
        return make_example(task, drawn, haystack, tokenizer, seed=seed, index=index, digits=digits)
    except ValueError:  # too short for this task's needles: the full length
        return make_example(task, length, haystack, tokenizer, seed=seed, index=index, digits=digits)


register_stage(STAGE, LongContextConfig, run)
