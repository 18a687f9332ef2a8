"""Long-context tasks (mmafm.data.long_context): lengths hit in tokens and characters, the asked
value present in the context exactly once, variable chains that resolve to the answer,
determinism, and clear errors.

References: the tokenizer's own count of the finished text; the context parsed back with plain
regular expressions (the chain of VAR assignments followed by hand in the test).
"""

from __future__ import annotations

import re

import pytest

from mmafm.data import DataPackageMissing
from mmafm.data.long_context import TASKS, exact_match, haystack_documents, long_context_examples, make_example


@pytest.fixture(scope="module")
def documents():
    try:
        return haystack_documents(("wikipedia",), limit=300, split="val", val_fraction=0.2)
    except DataPackageMissing as err:  # pragma: no cover - the data packages are pinned
        pytest.skip(str(err))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [600, 1500])
def test_length_in_tokens_is_hit(task, length, documents, text_checkpoint):
    tokenizer = text_checkpoint["tokenizer"]
    for example in long_context_examples(task, length, 3, documents, tokenizer, seed=5):
        tokens = len(tokenizer.encode(example.text))
        assert tokens == example.measured <= length
        # one more filler word would not fit; a word is at most a few dozen tokens here
        assert tokens >= length - 40, (task, length, tokens)
        assert example.text == f"{example.context}\n{example.question} {example.answer}"
        assert example.prompt + " " + example.answer == example.text


def test_length_in_chars_is_hit(documents):
    for task in TASKS:
        example = make_example(task, 3000, documents, unit="chars", seed=1)
        assert 3000 - 60 <= len(example.text) == example.measured <= 3000


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_the_answer_is_in_the_context_exactly_once(task, documents):
    for example in long_context_examples(task, 2000, 8, documents, unit="chars", seed=2):
        assert example.context.count(example.answer) == 1
        assert example.answer.isdigit() and len(example.answer) == 7
        if task != "passkey":  # the key asked about names exactly one needle, the one holding the answer
            key = re.search(r"number for (\S+) mentioned", example.question).group(1)
            assert example.context.count(key) == 1
            assert f"numbers for {key} is: {example.answer}." in example.context
        needles = re.findall(r"special magic numbers for \S+ is: \d+\.", example.context)
        assert len(needles) == {"passkey": 0, "needle": 1, "multikey": 4}[task]


def test_variable_chains_resolve_to_the_answer(documents):
    for example in long_context_examples("variable_tracking", 2500, 6, documents, unit="chars", seed=3,
                                         hops=3, chains=2):
        value = re.search(r"assigned the value (\d+)\?", example.question).group(1)
        assert example.context.count(value) == 1
        assignments = re.findall(r"VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|\d+)\.", example.context)
        assert len(assignments) == 2 * 4
        holds: dict[str, str] = {}
        for name, source, source_name in assignments:  # in text order: a chain reads before it is used
            holds[name] = holds[source_name] if source_name else source
        expected = [name for name, _, _ in assignments if holds[name] == value]
        assert example.answer.split() == expected and len(expected) == 4
        for name in holds:
            assert example.context.count(f"VAR {name} =") == 1


def test_examples_are_deterministic_and_differ_by_seed(documents, text_checkpoint):
    tokenizer = text_checkpoint["tokenizer"]
    first = long_context_examples("multikey", 600, 4, documents, tokenizer, seed=7)
    again = long_context_examples("multikey", 600, 4, documents, tokenizer, seed=7)
    other = long_context_examples("multikey", 600, 4, documents, tokenizer, seed=8)
    assert first == again
    assert [e.text for e in first] != [e.text for e in other]
    assert len({e.text for e in first}) == 4  # indexes differ
    assert haystack_documents(("wikipedia",), limit=300, split="val", val_fraction=0.2) == documents


def test_depth_places_the_needle(documents):
    early = make_example("passkey", 4000, documents, unit="chars", depth=0.0)
    late = make_example("passkey", 4000, documents, unit="chars", depth=1.0)
    needle = f"The pass key is {early.answer}."
    assert early.context.find(needle) < 400  # at the first sentence end
    assert late.context.rfind(f"The pass key is {late.answer}.") > len(late.context) - 200


def test_train_and_val_haystacks_share_no_document():
    try:
        train = haystack_documents(("jargon",), limit=400, split="train", val_fraction=0.2)
        val = haystack_documents(("jargon",), limit=400, split="val", val_fraction=0.2)
    except DataPackageMissing as err:  # pragma: no cover
        pytest.skip(str(err))
    assert train and val and not set(train) & set(val)
    assert len(train) + len(val) == len(haystack_documents(("jargon",), limit=400))


def test_errors_name_the_problem(documents, text_checkpoint):
    with pytest.raises(ValueError, match="unknown long-context task 'haystack'"):
        make_example("haystack", 100, documents, unit="chars")
    with pytest.raises(ValueError, match="too short .* at least"):
        make_example("multikey", 20, documents, text_checkpoint["tokenizer"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_example("passkey", 100, documents)
    with pytest.raises(ValueError, match="expected names from"):
        haystack_documents(("wikipedai",))


def test_exact_match():
    assert exact_match(" 4821937. Then more text", "4821937")
    assert exact_match("AB CD EF and so on", "AB CD EF")
    assert not exact_match("4821936", "4821937")
    assert not exact_match("AB CD", "AB CD EF")
