"""mmafm as an lm-eval model (mmafm.eval.harness) and the local tasks (mmafm.eval.tasks).

References: lm-eval's own ``hf`` backend (HFLM) on the same weights exported to transformers
(mmafm.interop.hf) with a transformers SentencePiece tokenizer over the same model file; a naive
greedy loop (a full forward per token, no cache) for generation; closed-form checks on the data.
"""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from _stage_helpers import naive_greedy  # noqa: E402
from mmafm.eval.harness import MMAFMLM, evaluate_tasks, results_table, task_scores  # noqa: E402
from mmafm.eval.tasks import (  # noqa: E402
    CORE_TASKS,
    arithmetic_items,
    cloze_item,
    parse_wordnet_document,
    prepare_tasks,
)

SIZE = 6  # test items per task: the comparisons need a few, not many


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return prepare_tasks(CORE_TASKS, tmp_path_factory.mktemp("eval_cache"), size=SIZE)


@pytest.fixture(scope="module")
def hf_lm(text_checkpoint):
    """lm-eval's hf backend on the exported weights and the same SentencePiece model."""
    from lm_eval.models.huggingface import HFLM
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from mmafm.interop.hf import to_hf

    model, tokenizer = text_checkpoint["model"], text_checkpoint["tokenizer"]
    hf_tokenizer = SentencePieceBackend(vocab_file=str(tokenizer.path), legacy=True, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    for text in ("Paris\nThe city of 2024 lights.", " a  b", "Question: 3 + 4?\nAnswer: 7"):
        assert hf_tokenizer.encode(text) == tokenizer.encode(text)  # same tokens on both sides
    return HFLM(pretrained=to_hf(model), tokenizer=hf_tokenizer, backend="causal", batch_size=4, device="cpu",
                add_bos_token=False, prefix_token_id=tokenizer.eos_id, max_length=model.config.max_seq_len,
                logits_cache=False)


@pytest.fixture(scope="module")
def ours(text_checkpoint):
    return MMAFMLM(text_checkpoint["stage_dir"], batch_size=4)


def _loglikelihoods(results: dict, task: str) -> list[float]:
    return [float(resp[0][0]) for sample in results["samples"][task] for resp in sample["resps"]]


@pytest.mark.parametrize("task", ["mmafm_cloze", "mmafm_wordnet"])
def test_loglikelihoods_equal_lm_eval_hf_backend(task, ours, hf_lm, tasks_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    runs = [simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0)
            for lm in (ours, hf_lm)]
    mine, theirs = (_loglikelihoods(run, task) for run in runs)
    assert len(mine) == len(theirs) >= SIZE
    assert max(abs(a - b) for a, b in zip(mine, theirs)) < 1e-4
    for metric, value in runs[1]["results"][task].items():
        if isinstance(value, float) and "stderr" not in metric:
            assert runs[0]["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_loglikelihood_rolling_and_edge_cases_equal_hf_backend(ours, hf_lm, text_checkpoint):
    long_text = " ".join(f"a red circle {i} on the left" for i in range(40))  # several windows
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in (long_text, "a blue square")]
    ours._max_length = hf_lm._max_length = 64  # force the rolling windows
    try:
        mine, theirs = ours.loglikelihood_rolling(requests), hf_lm.loglikelihood_rolling(requests)
    finally:
        ours._max_length = hf_lm._max_length = text_checkpoint["model"].config.max_seq_len
    assert mine == pytest.approx(theirs, abs=1e-4)
    pairs = [("", "a red circle"), ("a red", " circle"), ("a blue square on the ", "left")]  # empty context, trailing space
    requests = [Instance("loglikelihood", {}, pair, 0) for pair in pairs]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), hf_lm.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_generate_until_is_greedy_decode(ours, text_checkpoint):
    model, tokenizer = text_checkpoint["model"], text_checkpoint["tokenizer"]
    contexts = ["a red", "a blue square on the left and", "green"]
    until = ["circle"]
    requests = [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 12, "do_sample": False}), 0)
                for c in contexts]
    outputs = ours.generate_until(requests)
    for context, output in zip(contexts, outputs):
        expected = tokenizer.decode(naive_greedy(model, tokenizer.encode(context), 12, tokenizer.eos_id))
        assert output == expected.split(until[0])[0]


def test_tasks_run_end_to_end(text_checkpoint, tasks_dir):
    # the module's cache folder and size: the data is reused, not generated again
    results = evaluate_tasks(text_checkpoint["stage_dir"], CORE_TASKS, size=SIZE, cache_dir=tasks_dir.parents[1],
                             batch_size=4)
    scores = task_scores(results)
    assert set(scores) == {"mmafm_cloze/acc", "mmafm_cloze/perplexity", "mmafm_wordnet/acc",
                           "mmafm_wordnet/acc_norm", "mmafm_arith/exact_match"}
    assert all(0 <= scores[k] <= 1 for k in scores if not k.endswith("perplexity"))
    table = results_table(results)
    assert "mmafm_wordnet" in table and "exact_match" in table
    assert results["n-shot"]["mmafm_arith"] == 3


def test_unknown_task_and_bad_source(text_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown task.*mmafm_cloze"):
        evaluate_tasks(text_checkpoint["stage_dir"], ["mmafm_clozee"], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        MMAFMLM(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown mmafm task"):
        prepare_tasks(["nope"], tmp_path)


# ------------------------------------------------------------------------------- the data itself
def test_task_data_is_held_out_and_exact(tasks_dir):
    from mmafm.data.shards import split_of

    data = tasks_dir.parent / "data"
    read = lambda task, split: [json.loads(line) for line in (data / task / f"{split}.jsonl").read_text().splitlines()]  # noqa: E731
    for item in read("mmafm_cloze", "test"):
        assert split_of(f"wikipedia/{item['id']}", 0.05) == "val"  # never in the training split
        assert re.fullmatch(r" [A-Za-z]{3,}", item["target"])
    for item in read("mmafm_wordnet", "test"):
        assert split_of(f"wordnet/{item['id']}", 0.05) == "val"
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        assert item["choices"][item["label"]] not in item["definition"].lower()
    for item in read("mmafm_arith", "test"):  # the answer recomputed from the question's numbers
        numbers = [int(n) for n in re.findall(r"\d+", item["question"])]
        expected = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                    "div": lambda a, b: a // b, "two_step": lambda a, b, c: a + b - c}[item["kind"]](*numbers)
        assert item["answer"] == str(expected)
    assert arithmetic_items(5, seed=1) == arithmetic_items(5, seed=1) != arithmetic_items(5, seed=2)


def test_cloze_and_wordnet_parsing():
    item = cloze_item("Paris", "Paris is the capital of France. It lies on the Seine river in the north of the country.")
    assert item == {"context": "Paris\nParis is the capital of France. It lies on the Seine river in the north of the",
                    "target": " country"}
    assert cloze_item("X", "Too short.") is None
    assert cloze_item("X", "A sentence that ends with a number such as the year 1999.", min_words=3) is None
    parsed = parse_wordnet_document('dog, domestic dog (noun): a member of the genus Canis; "the dog barked"')
    assert parsed == {"lemmas": ["dog", "domestic dog"], "pos": "noun", "definition": "a member of the genus Canis"}


def test_cli_eval(text_checkpoint, tasks_dir, tmp_path, capsys):
    from mmafm.cli import main

    out = tmp_path / "results.json"
    code = main(["eval", str(text_checkpoint["stage_dir"]), "--tasks", "mmafm_wordnet", "--size", str(SIZE),
                 "--cache-dir", str(tasks_dir.parents[1]), "--out", str(out), "--limit", "3"])
    assert code == 0
    assert "mmafm_wordnet" in capsys.readouterr().out
    assert "mmafm_wordnet" in json.loads(out.read_text())["results"]
    assert main(["eval", str(text_checkpoint["stage_dir"]), "--tasks", "mmafm_wordnett"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", "mmafm_cloze"]) == 2
    assert "no such stage directory" in capsys.readouterr().err


def test_stage_task_scores_and_stage_check(text_checkpoint, tasks_dir, tmp_path):
    from mmafm.config import ConfigError
    from mmafm.eval.harness import stage_task_scores
    from mmafm.stages import make_config
    from mmafm.stages.text_pretrain import run

    scores = stage_task_scores(text_checkpoint["model"], text_checkpoint["tokenizer"], tmp_path / "lm_eval",
                               "mmafm_wordnet, mmafm_arith", size=SIZE, cache_dir=tasks_dir.parents[1])
    assert set(scores) == {"wordnet_acc", "wordnet_acc_norm", "arith_exact_match", "tasks_seconds"}
    assert (tmp_path / "lm_eval" / "results.json").is_file() and (tmp_path / "lm_eval" / "results.md").is_file()
    assert stage_task_scores(text_checkpoint["model"], text_checkpoint["tokenizer"], tmp_path, "") == {}
    with pytest.raises(ConfigError, match="eval_tasks.*mmafm_cloze"):  # refused before any training
        run(make_config("02_text_pretrain", dict(out_dir=str(tmp_path / "stage"), tokens_dir=str(tmp_path),
                                                 tokenizer=str(text_checkpoint["tokenizer"].path),
                                                 eval_tasks="mmafm_cloze,mmafm_typo")))


def test_task_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from mmafm.eval.tasks import default_cache_dir

    monkeypatch.delenv("MMAFM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mmafm" / "eval_tasks"
    monkeypatch.setenv("MMAFM_CACHE_DIR", str(tmp_path / "scratch"))
    assert default_cache_dir() == tmp_path / "scratch" / "eval_tasks"
    monkeypatch.delenv("MMAFM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "mmafm" / "eval_tasks"


def test_environment_report_is_collected_once(monkeypatch):
    """lm-eval asks torch for its environment report (a ``pip list``) on every evaluation."""
    import torch.utils.collect_env as collect_env

    from mmafm.eval.harness import _collect_env_once

    calls = []
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: calls.append(1) or "env")
    _collect_env_once()
    _collect_env_once()  # already cached: not wrapped twice
    assert [collect_env.get_pretty_env_info() for _ in range(3)] == ["env"] * 3
    assert calls == [1]
