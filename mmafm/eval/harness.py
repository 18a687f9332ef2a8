"""mmafm as an lm-evaluation-harness model: ``lm_eval`` model name ``mmafm``.

Importing this module registers :class:`MMAFMLM` with lm-eval (``lm_eval 0.4.13``), so any
lm-eval task, and the local tasks of :mod:`mmafm.eval.tasks` (nothing downloads), can score any
mmafm text checkpoint or ``02_text_pretrain``-style stage folder:

    from mmafm.eval.harness import evaluate_tasks
    results = evaluate_tasks("runs/tiny/02_text_pretrain", ["mmafm_cloze", "mmafm_arith"])

or on the command line ``mmafm eval runs/tiny/02_text_pretrain --tasks mmafm_cloze,mmafm_arith``.

How each request type is answered (the contract of ``lm_eval.api.model.LM``):

- ``loglikelihood`` (context, continuation): lm-eval's own tokenization of the pair
  (``TemplateLM``: the whole string and the context are encoded, the continuation is the
  difference; an empty context is conditioned on EOS, the token every training document of
  ``00_data`` ends with, so the one that precedes a document start), then one forward per batch
  of right-padded rows, logits only at the continuation positions, summed float32
  log-probabilities and whether greedy argmax reproduces the continuation;
- ``loglikelihood_rolling`` (text): lm-eval's disjoint rolling windows of ``max_length`` tokens,
  each scored like the above, summed per text;
- ``generate_until`` (context, gen_kwargs): left-padded batches through the inference wing's
  decode loop (:func:`mmafm.inference.generate`, KV cache, the decode plan's kernels), greedy
  unless ``do_sample``, EOS stops a row, the text is cut at the first ``until`` string.

The forwards run under :func:`mmafm.inference.kernel_linears` (the prefill's matmul dispatch).
A test (``tests/test_eval_harness.py``) checks the log-likelihoods against lm-eval's ``hf``
backend on the same weights exported to transformers (:mod:`mmafm.interop.hf`).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import nn
from tqdm import tqdm

from mmafm.eval.tasks import CORE_TASKS, LONG_CONTEXT_TASKS, TASK_NAMES, prepare_tasks

__all__ = ["MMAFMLM", "evaluate_tasks", "results_table", "task_scores", "save_results", "stage_task_scores", "summary_key"]

MODEL_NAME = "mmafm"


def _is_text_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "vocab_size") and hasattr(config, "max_seq_len") \
        and hasattr(model, "new_cache")


@register_model(MODEL_NAME)
class MMAFMLM(TemplateLM):
    """An mmafm text decoder behind lm-eval's model interface.

    Args:
        pretrained: a text checkpoint (``.safetensors``/``.json`` path), a finished stage folder
            (its manifest names checkpoint and tokenizer), or an already built model (then
            ``tokenizer`` is required).
        tokenizer: a :class:`~mmafm.tokenizer.Tokenizer` or a ``tokenizer.model`` path; default
            the one the source names (:func:`mmafm.checkpoint.load_tokenizer_for`).
        batch_size: rows per forward / decode batch (lm-eval passes its ``--batch_size``).
        max_length: context window; default the model's ``max_seq_len``.
        max_gen_toks: generation budget when a task does not set one.
        device: where the model runs (default cpu).
        dtype: ``"float32"`` / ``"bfloat16"`` to cast the weights; default as saved.
        threads: ``torch.set_num_threads`` if given.
    """

    def __init__(
        self,
        pretrained: str | Path | nn.Module,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        **unused: Any,  # lm-eval passes max_batch_size etc. to every backend
    ) -> None:
        super().__init__()
        from mmafm.checkpoint import load_model, load_tokenizer_for
        from mmafm.registry import TEXT_FAMILIES
        from mmafm.tokenizer import Tokenizer

        if threads:
            torch.set_num_threads(int(threads))
        device = device or "cpu"
        if isinstance(pretrained, nn.Module):
            if tokenizer is None:
                raise ValueError("a model passed as an object needs its tokenizer (tokenizer=...)")
            model = pretrained
        else:
            source = Path(pretrained)
            if not source.exists() and not source.with_suffix(".safetensors").exists():
                raise FileNotFoundError(f"mmafm eval: model source {str(source)!r} not found; pass a text "
                                        "checkpoint or a finished 02_text_pretrain stage folder")
            model = load_model(source, device=device, dtype=getattr(torch, dtype) if dtype else None,
                               family=TEXT_FAMILIES)
            if tokenizer is None or isinstance(tokenizer, (str, Path)):
                tokenizer = load_tokenizer_for(source, tokenizer, vocab_size=model.config.vocab_size)
        if not _is_text_decoder(model):
            raise ValueError(f"mmafm eval needs a text decoder (families text, ptmoe); got {type(model).__name__}")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.load(tokenizer)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}: "
                             "pass the tokenizer it was trained with")
        if dtype and isinstance(pretrained, nn.Module):
            model = model.to(getattr(torch, dtype))
        self.model = model.eval()
        self.mmafm_tokenizer = tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)  # no auto-sizing on CPU
        self._max_length = int(max_length) if max_length else int(model.config.max_seq_len)
        if not 1 < self._max_length <= model.config.max_seq_len:
            raise ValueError(f"max_length={self._max_length} must be in [2, the model's max_seq_len="
                             f"{model.config.max_seq_len}]")
        self._max_gen_toks = int(max_gen_toks)
        self._device = torch.device(next(model.parameters()).device)

    # ------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.mmafm_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.mmafm_tokenizer, "path", "mmafm-sentencepiece"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; no BOS (the data stage's documents have none)."""
        return self.mmafm_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.mmafm_tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(context, continuation)`` token rows -> (sum log p(continuation), greedy match)."""
        from mmafm.inference import kernel_linears

        inputs, spans = [], []
        for context, continuation in rows:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored in a "
                                 f"{self.max_length}-token context")
            whole = (context + continuation)[-(self.max_length + 1):][:-1]  # left-truncated like lm-eval's hf
            inputs.append(whole)
            spans.append((len(whole) - len(continuation), len(continuation)))
        longest = max(len(row) for row in inputs)
        ids = torch.full((len(inputs), longest), self.mmafm_tokenizer.pad_id, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.as_tensor(tokens)  # right padding: causal rows never see it
        with kernel_linears():
            hidden = self.model(ids.to(self._device), return_hidden=True)  # (B, T, dim)
        results = []
        for row, ((start, length), (_, continuation)) in enumerate(zip(spans, rows)):
            logits = self.model.logits(hidden[row, start : start + length])  # (L, V) float32
            log_probs = F.log_softmax(logits.float(), dim=-1)
            target = torch.as_tensor(continuation, device=log_probs.device)
            score = log_probs.gather(-1, target[:, None]).sum().item()
            results.append((score, bool((log_probs.argmax(-1) == target).all())))
        return results

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Score ``((context, continuation), context_ids, continuation_ids)`` requests in
        batches of similar length (longest first), returned in the requests' order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="mmafm loglikelihood", disable=disable_tqdm, mininterval=5)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin : begin + self.batch_size]
            for index, result in zip(chunk, self._score_batch([(requests[i][1], requests[i][2]) for i in chunk])):
                results[index] = result
                key = requests[index][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            progress.update(len(chunk))
        progress.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods over lm-eval's disjoint rolling windows (EOS first)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---------------------------------------------------------------------------- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations through :func:`mmafm.inference.generate`,
        batched per identical ``gen_kwargs``, cut at the first ``until`` string."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from mmafm.inference import generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), desc="mmafm generate_until", disable=disable_tqdm, mininterval=5)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in a {self.max_length}-token context")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or [self.eot_token_id]
                        for i in indices}
            ordered = sorted(indices, key=lambda i: -len(contexts[i]))
            for begin in range(0, len(ordered), self.batch_size):
                chunk = ordered[begin : begin + self.batch_size]
                outputs = generate(self.model, [contexts[i] for i in chunk], max_new, temperature=temperature,
                                   top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                                   stop_tokens=[self.eot_token_id], pad_token_id=self.mmafm_tokenizer.pad_id,
                                   seed=0 if temperature > 0 else None)
                for index, tokens in zip(chunk, outputs):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(chunk))
        progress.close()
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- running
def evaluate_tasks(
    source: str | Path | nn.Module,
    tasks: Sequence[str] = CORE_TASKS,
    *,
    tokenizer: Any = None,
    size: int = 200,
    seed: int = 0,
    lengths: Sequence[int] = (256, 512, 1024),
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
) -> dict:
    """Run mmafm's local tasks (and any other registered lm-eval task names given) with lm-eval.

    Args:
        source: a checkpoint, a stage folder, a built model (with ``tokenizer``) or an
            :class:`MMAFMLM`.
        tasks: task names; :data:`mmafm.eval.tasks.TASK_NAMES` are generated locally.
        tokenizer: the model's tokenizer (default: the one the source names).
        size: test items per local task (per length for the long-context ones).
        seed: data seed of the local tasks and lm-eval's seeds.
        lengths: context lengths of the long-context tasks (tokens).
        num_fewshot: overrides the tasks' own (``mmafm_arith`` is 3-shot, the others 0).
        limit: at most this many items per task.
        batch_size: rows per forward / decode batch.
        cache_dir: where the generated data and YAMLs go (:func:`mmafm.eval.tasks.prepare_tasks`).
        log_samples: keep lm-eval's per-sample records in the result.
        bootstrap_iters: lm-eval's standard errors (0 = none; mean metrics get a closed form,
            others such as perplexity a bootstrap in a process pool).

    Returns:
        lm-eval's result dict (``results``, ``configs``, ``versions``, ``n-shot``, ...) plus
        ``"mmafm": {"seconds", "tasks_dir"}``.

    Raises:
        ValueError: a task name neither local nor known to lm-eval (listing the local ones).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _collect_env_once()
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError(f"no task given; the local tasks are {list(TASK_NAMES)}")
    misspelt = [name for name in tasks if name.startswith("mmafm_") and name not in TASK_NAMES]
    if misspelt:  # checked before anything loads: the prefix is ours
        raise ValueError(f"unknown task(s) {misspelt}; mmafm's local tasks are {list(TASK_NAMES)}")
    lm = source if isinstance(source, MMAFMLM) else MMAFMLM(source, tokenizer=tokenizer, batch_size=batch_size)
    local = [name for name in tasks if name in TASK_NAMES]
    other = [name for name in tasks if name not in TASK_NAMES]
    include = []
    if local:
        long_context = [name for name in local if name in LONG_CONTEXT_TASKS]
        lengths = [n for n in lengths if n <= lm.max_length] if long_context else lengths
        if long_context and not lengths:
            raise ValueError(f"every long-context length exceeds the model's context ({lm.max_length} tokens)")
        include.append(prepare_tasks(local, cache_dir, size=size, seed=seed, lengths=lengths,
                                     tokenizer=lm.mmafm_tokenizer if long_context else None))
    manager = TaskManager(include_path=include or None, include_defaults=bool(other))
    unknown = [name for name in other if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; mmafm's local tasks are {list(TASK_NAMES)} "
                         "(any lm-eval task name also works, if its data is available offline)")
    start = time.time()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters)
    results["mmafm"] = {"seconds": round(time.time() - start, 2), "tasks_dir": str(include[0]) if include else ""}
    return results


def _collect_env_once() -> None:
    """lm-eval stores torch's environment report in every result (``add_env_info``), and torch
    builds it by running ``pip list`` and probing compilers: about 4 s per call, most of a small
    evaluation's time. The report cannot change inside one process, so compute it once."""
    import torch.utils.collect_env as collect_env

    if not hasattr(collect_env.get_pretty_env_info, "cache_info"):
        collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)


def task_scores(results: dict) -> dict[str, float]:
    """Flat ``{"<task>/<metric>": value}`` of a result dict (filter suffixes and stderr dropped),
    the shape a stage summary holds."""
    scores = {}
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            scores[f"{task}/{metric}"] = round(float(value), 4)
    return scores


def results_table(results: dict) -> str:
    """lm-eval's own Markdown table of the results (``lm_eval.utils.make_table``)."""
    from lm_eval.utils import make_table

    return make_table(results)


def save_results(results: dict, path: str | Path) -> Path:
    """Write the results (samples dropped, values JSON-safe) atomically; returns the path."""
    from mmafm.io import atomic_write_json

    kept = {key: value for key, value in results.items() if key != "samples"}
    path = Path(path)
    atomic_write_json(path, json.loads(json.dumps(kept, default=str)))
    return path


def summary_key(task_metric: str) -> str:
    """``"mmafm_cloze/acc"`` -> ``"cloze_acc"``: a task score's name in a stage summary."""
    task, metric = task_metric.split("/", 1)
    return f"{task.removeprefix('mmafm_')}_{metric}"


def stage_task_scores(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    tasks: str | Sequence[str] = ",".join(CORE_TASKS),
    size: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """What a text stage adds to its summary: the local tasks' scores on ``model``.

    Generates ``size`` items per task into ``cache_dir`` (default
    :func:`mmafm.eval.tasks.default_cache_dir`: deterministic data, keyed by its arguments, so
    every stage run reuses it; ``results.json`` names the folder), writes lm-eval's results to
    ``out_dir/results.json`` and its table to ``out_dir/results.md``, and returns ``{"cloze_acc": ..., "wordnet_acc": ...,
    "arith_exact_match": ..., "tasks_seconds": ...}`` (:func:`summary_key` names). ``tasks`` empty:
    nothing runs, ``{}``.
    """
    from mmafm.io import atomic_write_text

    names = [name.strip() for name in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [name for name in names if name]
    if not names:
        return {}
    out_dir = Path(out_dir)
    was_training = model.training
    try:
        results = evaluate_tasks(MMAFMLM(model, tokenizer=tokenizer, batch_size=batch_size), names, size=size,
                                 seed=seed, cache_dir=cache_dir,
                                 lengths=[n for n in (256, 512, 1024) if n <= model.config.max_seq_len])
    finally:
        model.train(was_training)
    save_results(results, out_dir / "results.json")
    atomic_write_text(out_dir / "results.md", results_table(results))
    scores = {summary_key(key): value for key, value in task_scores(results).items()}
    return scores | {"tasks_seconds": results["mmafm"]["seconds"]}
