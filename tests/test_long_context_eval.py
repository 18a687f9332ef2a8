"""Long-context evaluation (mmafm.eval.long_context): the accuracy ladder, its table and figure,
the lm-eval long-context tasks. References: an oracle that answers right only below a length
(the bookkeeping must give exactly 1 and 0), a naive greedy loop (full forward per token) for
the model's own answers, and the examples' own answers for the lm-eval items."""

import pytest

from _stage_helpers import naive_greedy
from mmafm.data.long_context import haystack_documents
from mmafm.eval.long_context import (
    LM_EVAL_GEN_TOKENS,
    accuracy_table,
    evaluate_long_context,
    lm_eval_items,
    plot_accuracy_vs_length,
)


@pytest.fixture(scope="module")
def documents():
    return haystack_documents(("wikipedia",), split="val")[:60]


def test_ladder_bookkeeping_with_an_oracle(text_checkpoint, documents):
    tokenizer = text_checkpoint["tokenizer"]
    limit = 300

    def oracle(prompts, budgets):  # right below `limit` tokens, wrong above
        return [expected[p] + ". More text" if len(tokenizer.encode(p)) <= limit else "0000000" for p in prompts]

    from mmafm.data.long_context import long_context_examples

    expected = {ex.prompt: ex.answer for n in (256, 512) for task in ("passkey", "needle")
                for ex in long_context_examples(task, n, 3, documents, tokenizer)}
    result = evaluate_long_context(None, tokenizer, ("passkey", "needle"), (512, 256), count=3,
                                   documents=documents, answer_fn=oracle)
    assert result["lengths"] == [256, 512]
    assert result["accuracy"] == {"passkey": {256: 1.0, 512: 0.0}, "needle": {256: 1.0, 512: 0.0}}
    assert result["mean"] == {256: 1.0, 512: 0.0}
    assert len(result["examples"]) == 12 and sum(r["correct"] for r in result["examples"]) == 6
    assert accuracy_table({"before": {256: 0.5, 1024: 0.25}, "after": {256: 1.0, 1024: 0.75}}) == (
        "| model | 256 | 1k |\n| --- | ---: | ---: |\n| before | 50.0 | 25.0 |\n| after | 100.0 | 75.0 |")


def test_model_answers_are_greedy_decodes(text_checkpoint, documents):
    model, tokenizer = text_checkpoint["model"], text_checkpoint["tokenizer"]
    result = evaluate_long_context(model, tokenizer, ("passkey",), (160,), count=2, documents=documents)
    from mmafm.data.long_context import exact_match, long_context_examples

    for ex, record in zip(long_context_examples("passkey", 160, 2, documents, tokenizer), result["examples"]):
        budget = len(tokenizer.encode(" " + ex.answer)) + 2
        expected = tokenizer.decode(naive_greedy(model, tokenizer.encode(ex.prompt), budget, tokenizer.eos_id))
        assert record["prediction"] == expected
        assert record["correct"] == exact_match(expected, ex.answer)
    with pytest.raises(ValueError, match="exceed the model's context"):
        evaluate_long_context(model, tokenizer, ("passkey",), (4096,), documents=documents)
    with pytest.raises(ValueError, match="unknown long-context task"):
        evaluate_long_context(model, tokenizer, ("pass",), (160,), documents=documents)


def test_figure_marks_the_trained_length():
    fig = plot_accuracy_vs_length({"before": {256: 0.9, 512: 0.4}, "after": {256: 0.9, 512: 0.8}},
                                  trained_length=256)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["before", "after", "trained length 256"]
    assert list(ax.lines[2].get_xdata()) == [256, 256]
    assert ax.get_xscale() == "log"


def test_lm_eval_items_fit_and_answer_once(text_checkpoint, documents):
    tokenizer = text_checkpoint["tokenizer"]
    for kind in ("passkey", "multikey"):
        items = lm_eval_items(kind, tokenizer, [512], 2, documents=documents)
        assert len(items) == 2
        for item in items:
            assert len(tokenizer.encode(item["prompt"])) + LM_EVAL_GEN_TOKENS[kind] <= 512
            assert item["prompt"].count(item["answer"]) == 1


def test_long_context_tasks_run_in_lm_eval(text_checkpoint, tmp_path):
    from mmafm.eval.harness import evaluate_tasks, task_scores

    results = evaluate_tasks(text_checkpoint["stage_dir"], ["mmafm_passkey"], size=1, lengths=(256,),
                             cache_dir=tmp_path)
    assert set(task_scores(results)) == {"mmafm_passkey/exact_match"}
    with pytest.raises(ValueError, match="exceeds the model's context"):
        evaluate_tasks(text_checkpoint["stage_dir"], ["mmafm_passkey"], size=1, lengths=(4096,), cache_dir=tmp_path)
