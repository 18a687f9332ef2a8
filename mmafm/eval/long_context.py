"""Long-context evaluation, RULER-like: retrieval accuracy against context length.

The 2024 AFM report measures its context lengthening with RULER (Hsieh et al., 2024): accuracy
of needle retrieval and variable tracking at 4k ... 32k tokens, 91.7 at 4k falling to 43.3 at 32k
(its Table 9, ``../shared/WAVE2.md``). Here the same shape at any scale: the examples come from
:mod:`mmafm.data.long_context` (haystacks of the data stage's *held-out* Wikipedia summaries,
needles with values that occur once; written by the long-context data owner, used as is), each
model answers by greedy generation through the inference wing, and an answer counts when its
first words are the expected ones (:func:`mmafm.data.long_context.exact_match`).

- :func:`evaluate_long_context`: accuracy per task and length (a "ladder"), plus the mean over
  tasks per length (the report's single RULER number per length);
- :func:`accuracy_table`: Markdown, one row per model, one column per length (Table 9's shape);
- :func:`plot_accuracy_vs_length`: accuracy against context length, one curve per model (before /
  after context lengthening), the trained length marked;
- :func:`lm_eval_items`: the same examples as lm-eval ``generate_until`` items
  (tasks ``mmafm_passkey``, ``mmafm_needle``, ``mmafm_multikey``, ``mmafm_vartrack`` of
  :mod:`mmafm.eval.tasks`).

    from mmafm.eval.long_context import evaluate_long_context, plot_accuracy_vs_length
    before = evaluate_long_context(model, tokenizer, lengths=(256, 512, 1024, 2048), count=8)
    plot_accuracy_vs_length({"core": before["mean"], "long-context": after["mean"]}, trained_length=512)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mmafm.data.long_context import TASKS, exact_match, haystack_documents, long_context_examples

__all__ = [
    "DEFAULT_TASKS",
    "LM_EVAL_GEN_TOKENS",
    "evaluate_long_context",
    "accuracy_table",
    "plot_accuracy_vs_length",
    "lm_eval_items",
    "greedy_answers",
    "log2_ladder",
]

DEFAULT_TASKS = TASKS  # passkey, needle, multikey, variable_tracking
# lm-eval task suffix -> data task, and the generation budget its items leave room for
LM_EVAL_TASKS = {"passkey": "passkey", "needle": "needle", "multikey": "multikey", "vartrack": "variable_tracking"}
LM_EVAL_GEN_TOKENS = {"passkey": 16, "needle": 16, "multikey": 16, "vartrack": 48}
ANSWER_SLACK = 2  # tokens generated beyond the answer's own (a stray space or period)


def greedy_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: Sequence[int],
                   batch_size: int = 4) -> list[str]:
    """Greedy continuations of ``prompts`` (each up to its own budget) through
    :func:`mmafm.inference.generate`, batched by similar length; EOS ends a row."""
    from mmafm.inference import generate

    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    room = model.config.max_seq_len
    budgets = [max(1, min(budget, room - len(ids))) for ids, budget in zip(encoded, max_new_tokens)]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers = [""] * len(prompts)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        steps = max(budgets[i] for i in chunk)
        longest = max(len(encoded[i]) for i in chunk)
        steps = min(steps, room - longest)
        outputs = generate(model, [encoded[i] for i in chunk], steps, stop_tokens=[tokenizer.eos_id],
                           pad_token_id=tokenizer.pad_id)
        for index, tokens in zip(chunk, outputs):
            answers[index] = tokenizer.decode(tokens[: budgets[index]])
    return answers


def evaluate_long_context(
    model: nn.Module | None,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (256, 512, 1024),
    count: int = 8,
    seed: int = 0,
    documents: Sequence[str] | None = None,
    batch_size: int = 4,
    answer_fn: Callable[[list[str], list[int]], list[str]] | None = None,
    **options: Any,
) -> dict:
    """Accuracy of every task at every length.

    Args:
        model: a text decoder (ignored when ``answer_fn`` is given).
        tokenizer: its tokenizer; lengths are counted in its tokens.
        tasks: names from :data:`mmafm.data.long_context.TASKS`.
        lengths: the ladder, in tokens; each must fit the model's ``max_seq_len``.
        count: examples per task and length.
        seed: which examples.
        documents: haystack texts; default the held-out Wikipedia summaries
            (``haystack_documents(("wikipedia",), split="val")``).
        batch_size: rows per decode batch.
        answer_fn: ``(prompts, max_new_tokens) -> continuations`` instead of the model's greedy
            decode (another system, or a test's oracle).
        options: :func:`~mmafm.data.long_context.make_example` options (``num_needles``, ``hops``...).

    Returns:
        ``{"lengths": [...], "accuracy": {task: {length: acc}}, "mean": {length: mean over tasks},
        "examples": [{"task", "length", "answer", "prediction", "correct", "depths"}]}``.

    Raises:
        ValueError: an empty ladder, an unknown task, or a length beyond the model's context.
    """
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or count < 1:
        raise ValueError(f"need at least one length and count >= 1, got lengths={lengths}, count={count}")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown long-context task(s) {unknown or list(tasks)}; tasks: {list(TASKS)}")
    if answer_fn is None:
        if model is None:
            raise ValueError("evaluate_long_context needs a model or an answer_fn")
        too_long = [n for n in lengths if n > model.config.max_seq_len]
        if too_long:
            raise ValueError(f"lengths {too_long} exceed the model's context (max_seq_len={model.config.max_seq_len})")
        answer_fn = lambda prompts, budgets: greedy_answers(model, tokenizer, prompts, budgets, batch_size)  # noqa: E731
    if documents is None:
        documents = haystack_documents(("wikipedia",), split="val")
    accuracy: dict[str, dict[int, float]] = {}
    records = []
    for task in tasks:
        accuracy[task] = {}
        for length in lengths:
            examples = long_context_examples(task, length, count, documents, tokenizer, seed=seed, **options)
            budgets = [len(tokenizer.encode(" " + ex.answer)) + ANSWER_SLACK for ex in examples]
            with torch.no_grad():
                predictions = answer_fn([ex.prompt for ex in examples], budgets)
            correct = [exact_match(prediction, ex.answer) for prediction, ex in zip(predictions, examples)]
            accuracy[task][length] = sum(correct) / len(correct)
            records += [{"task": task, "length": length, "answer": ex.answer, "prediction": prediction,
                         "correct": ok, "depths": list(ex.depths)}
                        for ex, prediction, ok in zip(examples, predictions, correct)]
    mean = {length: sum(accuracy[task][length] for task in tasks) / len(tasks) for length in lengths}
    return {"lengths": lengths, "accuracy": accuracy, "mean": mean, "examples": records}


def _length_label(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def accuracy_table(curves: Mapping[str, Mapping[int, float]], percent: bool = True) -> str:
    """Markdown: one row per model, one column per length (the report's Table 9 shape)."""
    lengths = sorted({int(n) for curve in curves.values() for n in curve})
    lines = ["| model | " + " | ".join(_length_label(n) for n in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for label, curve in curves.items():
        cells = []
        for n in lengths:
            value = curve.get(n, curve.get(str(n)))
            cells.append("" if value is None else f"{100 * value:.1f}" if percent else f"{value:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_length(
    curves: Mapping[str, Mapping[int, float]],
    trained_length: int | Mapping[str, int] | None = None,
    ax: Any = None,
    title: str = "long-context retrieval (RULER-like)",
):
    """Accuracy against context length, one curve per model, the trained length(s) marked.

    Args:
        curves: ``{label: {length: accuracy}}``, e.g. ``{"before": ..., "after": ...}``.
        trained_length: a vertical dashed line at the sequence length the model(s) trained at;
            a mapping gives one per label (same colour as its curve).
        ax: a matplotlib axis to draw on; default a new figure.

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    else:
        fig = ax.figure
    colours = {}
    for label, curve in curves.items():
        lengths = sorted(int(n) for n in curve)
        values = [curve.get(n, curve.get(str(n))) for n in lengths]
        (line,) = ax.plot(lengths, values, "o-", label=label)
        colours[label] = line.get_color()
    marks = trained_length if isinstance(trained_length, Mapping) else (
        {"": trained_length} if trained_length else {})
    for label, length in marks.items():
        ax.axvline(length, ls="--", c=colours.get(label, "grey"),
                   label=f"trained length {length}" + (f" ({label})" if label else ""))
    all_lengths = sorted({int(n) for curve in curves.values() for n in curve} | set(marks.values()))
    if len(all_lengths) > 1:
        ax.set_xscale("log", base=2)  # a ladder of doublings, evenly spaced
        ax.set_xlim(all_lengths[0] / 1.3, all_lengths[-1] * 1.3)
    ax.set_xticks(all_lengths, [_length_label(n) for n in all_lengths])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel="accuracy", ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lm_eval_items(kind: str, tokenizer: Any, lengths: Sequence[int], count: int, seed: int = 0,
                  documents: Sequence[str] | None = None) -> list[dict]:
    """Items of lm-eval task ``mmafm_<kind>`` (``kind``: passkey, needle, multikey, vartrack):
    ``{"prompt", "answer", "length", "task"}``, ``count`` per length; each prompt plus the task's
    generation budget (:data:`LM_EVAL_GEN_TOKENS`) fits in ``length`` tokens, so lm-eval never
    truncates a haystack at a model whose context is the largest length."""
    if kind not in LM_EVAL_TASKS:
        raise ValueError(f"unknown long-context lm-eval task {kind!r}; kinds: {list(LM_EVAL_TASKS)}")
    if documents is None:
        documents = haystack_documents(("wikipedia",), split="val")
    items = []
    for length in lengths:
        budget = LM_EVAL_GEN_TOKENS[kind]
        for ex in long_context_examples(LM_EVAL_TASKS[kind], length - budget, count, documents, tokenizer, seed=seed):
            items.append({"prompt": ex.prompt, "answer": ex.answer, "length": length, "task": ex.task})
    return items


def log2_ladder(low: int, high: int) -> list[int]:
    """Powers of two from ``low`` to ``high`` (both rounded to powers of two), e.g. 256 .. 4096."""
    return [2**k for k in range(int(math.log2(low)), int(math.log2(high)) + 1)]
