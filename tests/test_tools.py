"""Tool calling: the turn schema, parallel execution, the session loop (calls parsed into typed
arguments, results fed back as tool turns, a final answer), the transcript, the demo tools."""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from typing import Annotated

import jsonschema
import pytest
import torch

import mmafm
from mmafm.inference.guided import Guide
from mmafm.inference.tools import (
    DateArgs,
    Tool,
    ToolCall,
    ToolSession,
    calculate,
    demo_tools,
    run_calls,
    turn_schema,
)
from mmafm.tokenizer import train_tokenizer


@dataclass
class AddArgs:
    a: Annotated[int, Guide(minimum=0, maximum=9)]
    b: Annotated[int, Guide(minimum=0, maximum=9)]


@dataclass
class EchoArgs:
    word: Annotated[str, Guide(pattern=r"[a-z]{1,5}")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = [f"add {a} and {b} then echo the word" for a in range(10) for b in range(10)] * 2
    tokenizer = train_tokenizer(texts, tmp_path_factory.mktemp("tools") / "tok", vocab_size=400)
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2,
                               max_seq_len=2048).eval()
    return model, tokenizer


def _tools(log: list):
    return [Tool("add", "Adds two digits.", AddArgs, lambda args: log.append(("add", args)) or args.a + args.b),
            Tool("echo", "Repeats a word.", EchoArgs, lambda args: log.append(("echo", args)) or args.word.upper())]


def test_turn_schema_forms():
    tools = _tools([])
    both = turn_schema(tools)
    calls, answer = both["anyOf"]
    good_call = {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "echo", "arguments": {"word": "hi"}}]}
    jsonschema.validate(good_call, both)
    jsonschema.validate({"answer": "3"}, both)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "add", "arguments": {"word": "hi"}}]}, both)
    assert turn_schema(tools, "required") == calls and turn_schema(tools, "none") == answer
    with pytest.raises(ValueError, match="tool_choice"):
        turn_schema(tools, "always")


def test_calls_in_one_turn_run_in_parallel():
    barrier = threading.Barrier(2, timeout=5)  # passes only if both calls run at the same time

    def wait(args):
        barrier.wait()
        return args.word

    tools = {"wait": Tool("wait", "Waits.", EchoArgs, wait),
             "boom": Tool("boom", "Fails.", EchoArgs, lambda args: 1 / 0)}
    done = run_calls(tools, [ToolCall("wait", EchoArgs("x")), ToolCall("wait", EchoArgs("y"))])
    assert [c.result for c in done] == ["x", "y"]  # in call order
    failed = run_calls(tools, [ToolCall("boom", EchoArgs("x"))])[0]
    assert failed.error and "ZeroDivisionError" in failed.result


def test_session_calls_tools_feeds_results_back_and_answers(setup):
    model, tokenizer = setup
    log: list = []
    session = ToolSession(model, tokenizer, _tools(log), max_rounds=2, max_new_tokens=120, max_answer_chars=12,
                          temperature=1.0, seed=0)
    answer = session.respond("add 3 and 4", tool_choice="required")
    turns = session.transcript.turns
    assert [t.role for t in turns[:3]] == ["system", "user", "assistant"]
    first_calls = turns[2].calls
    assert first_calls and all(isinstance(c.arguments, (AddArgs, EchoArgs)) for c in first_calls)
    assert [name for name, _ in log[: len(first_calls)]] == [c.name for c in first_calls]  # executed, in order
    tool_turns = turns[3 : 3 + len(first_calls)]
    assert [t.role for t in tool_turns] == ["tool"] * len(first_calls)
    for call, turn in zip(first_calls, tool_turns):
        expected = call.arguments.a + call.arguments.b if call.name == "add" else call.arguments.word.upper()
        assert turn.content == str(expected) and turn.name == call.name
    # the next prompt holds the results as tool turns
    prompt = tokenizer.decode(session._prompt())
    assert f"[tool {tool_turns[0].name}] {tool_turns[0].content}" in prompt
    assert turns[-1].role == "assistant" and turns[-1].content == answer and not turns[-1].calls
    assert json.loads(turns[2].content)["tool_calls"][0]["name"] == first_calls[0].name
    printed = str(session.transcript)
    assert "[user] add 3 and 4" in printed and f"[assistant] calls {first_calls[0].name}(" in printed
    assert printed.splitlines()[-1] == f"[assistant] {answer}"


def test_answer_only_turn(setup):
    model, tokenizer = setup
    session = ToolSession(model, tokenizer, _tools([]), max_new_tokens=60, max_answer_chars=12, temperature=1.0,
                          seed=1)
    answer = session.respond("hello", tool_choice="none")
    assert isinstance(answer, str) and len(session.transcript.turns) == 3


def test_demo_tools():
    assert calculate("12*(3+4) - 2**3") == 76 and calculate("-7 / 2") == -3.5
    with pytest.raises(ValueError, match="not arithmetic"):
        calculate("__import__('os')")
    tools = {t.name: t for t in demo_tools(today=dt.date(2026, 11, 30), wikipedia_limit=0)}
    date = tools["date"].function
    assert date(DateArgs("today", "2000-01-01", "2000-01-01")) == "2026-11-30"
    assert date(DateArgs("weekday", "2026-11-30", "2000-01-01")) == "Monday"
    assert date(DateArgs("days_between", "2026-01-01", "2026-11-30")) == "333"
    lookup = tools["wikipedia"]
    title = next(iter(_any_title()))
    assert lookup.function(lookup.arguments(title))[:40] in _article(title)
    assert "no article" in lookup.function(lookup.arguments("Zzzz qqq"))


def _any_title():
    from mmafm.data.text_sources import wikipedia_documents

    for title, _ in wikipedia_documents(limit=5):
        yield title


def _article(title: str) -> str:
    from mmafm.data.text_sources import wikipedia_documents

    return dict(wikipedia_documents())[title]
