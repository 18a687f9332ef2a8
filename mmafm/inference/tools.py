"""Tool calling on guided generation (the 2025 framework's tools, the Python way).

A :class:`Tool` is a name, a description, a generable arguments type and a Python function.
A :class:`ToolSession` runs the model turn by turn; each assistant turn is *guided* (see
:mod:`mmafm.inference.guided`) by one JSON schema, so it always parses:

- ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}``: each call's ``name`` is one of
  the tools and its ``arguments`` follow that tool's schema (``anyOf`` over the tools). Several
  calls in one turn are independent and run **in parallel** (a thread pool); their results come
  back as ``tool`` turns, in call order;
- ``{"answer": "..."}``: the final answer, which ends the session's reply.

A call that needs another's result is made in a later turn, after the model has read that result
(**serial**), as the framework's model does. ``tool_choice`` restricts a turn: ``"auto"`` (either
form), ``"required"`` (calls only), ``"none"`` (the answer only); the last allowed round is always
``"none"``, so a reply always ends in an answer. :class:`Transcript` keeps every turn and prints as
a readable log.

Prompts: a transformers tokenizer's chat template (SmolLM2's ChatML renders the ``tool`` role), or
mmafm's chat format (:func:`mmafm.data.chat.prompt_ids`: a tool result is a ``<|user|>`` turn
starting ``[tool <name>]``). :func:`demo_tools` builds the three demo tools: a calculator, a lookup
in the bundled Wikipedia summaries and a date tool.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import operator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Sequence

from torch import nn

from mmafm.inference.guided import Guide, generate_object, instance_from_json, json_schema

__all__ = ["Tool", "ToolCall", "Turn", "Transcript", "ToolSession", "turn_schema", "run_calls", "demo_tools",
           "calculate"]


@dataclass
class Tool:
    """A function the model may call.

    Args:
        name: what the model writes to call it (letters, digits, ``_``).
        description: what it does (shown to the model).
        arguments: a generable dataclass (or pydantic model): the call's arguments.
        function: called with one instance of ``arguments``; its result is sent back as text.
    """

    name: str
    description: str
    arguments: type
    function: Callable[[Any], Any]

    def __post_init__(self):
        if not self.name.replace("_", "").isalnum():
            raise ValueError(f"tool name {self.name!r} must be letters, digits and _")

    def schema(self) -> dict:
        """One call of this tool: ``{"name": <this name>, "arguments": <its schema>}``."""
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": json_schema(self.arguments)},
                "required": ["name", "arguments"], "additionalProperties": False}


@dataclass
class ToolCall:
    """A call the model made, and what it returned."""

    name: str
    arguments: Any  # an instance of the tool's arguments type
    result: str = ""
    error: bool = False


@dataclass
class Turn:
    """One turn of a conversation: ``system``, ``user``, ``assistant`` (content or calls) or ``tool``."""

    role: str
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    name: str = ""  # the tool, for a tool turn


@dataclass
class Transcript:
    """Every turn of a session, printable."""

    turns: list[Turn] = field(default_factory=list)

    def __str__(self) -> str:
        lines = []
        for turn in self.turns:
            if turn.role == "assistant" and turn.calls:
                calls = ", ".join(f"{c.name}({json.dumps(_to_json(c.arguments))})" for c in turn.calls)
                lines.append(f"[assistant] calls {calls}" + (" in parallel" if len(turn.calls) > 1 else ""))
            elif turn.role == "tool":
                lines.append(f"[tool {turn.name}] {turn.content}")
            else:
                lines.append(f"[{turn.role}] {turn.content}")
        return "\n".join(lines)

    def messages(self) -> list[dict]:
        """The turns as chat messages (``{"role", "content"[, "name"]}``), the assistant's calls
        as the JSON it wrote."""
        out = []
        for turn in self.turns:
            message = {"role": turn.role, "content": turn.content}
            if turn.role == "tool":
                message["name"] = turn.name
            out.append(message)
        return out


def _to_json(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass
    from enum import Enum

    if is_dataclass(value):
        return {k: _to_json(v) for k, v in asdict(value).items()}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def turn_schema(tools: Sequence[Tool], tool_choice: str = "auto", max_calls: int = 4,
                max_answer_chars: int | None = None) -> dict:
    """The schema of one assistant turn: calls (1 to ``max_calls``, each any tool) and/or the answer
    form (at most ``max_answer_chars`` characters if given)."""
    calls = {"type": "object", "properties": {"tool_calls": {
        "type": "array", "items": {"anyOf": [tool.schema() for tool in tools]}, "minItems": 1, "maxItems": max_calls}},
        "required": ["tool_calls"], "additionalProperties": False}
    text = {"type": "string"} if max_answer_chars is None else {"type": "string", "maxLength": max_answer_chars}
    answer = {"type": "object", "properties": {"answer": text}, "required": ["answer"], "additionalProperties": False}
    if tool_choice not in ("auto", "required", "none"):
        raise ValueError(f"tool_choice must be 'auto', 'required' or 'none', got {tool_choice!r}")
    if tool_choice == "none" or not tools:
        return answer
    return calls if tool_choice == "required" else {"anyOf": [calls, answer]}


def run_calls(tools: dict[str, Tool], calls: list[ToolCall]) -> list[ToolCall]:
    """Run ``calls`` (one turn's: independent) in parallel threads; each gets its result, or the
    error it raised as text (``error=True``), so the model can read it."""
    def run(call: ToolCall) -> ToolCall:
        try:
            call.result = str(tools[call.name].function(call.arguments))
        except Exception as err:  # a tool's failure is the model's to read, not the session's end
            call.result, call.error = f"error: {type(err).__name__}: {err}", True
        return call

    if len(calls) <= 1:
        return [run(call) for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def _system_text(tools: Sequence[Tool], system: str | None) -> str:
    lines = [system or "You are a helpful assistant with tools."]
    lines.append("Tools:")
    for tool in tools:
        lines.append(f"- {tool.name}: {tool.description} Arguments: "
                     + json.dumps(json_schema(tool.arguments), separators=(",", ":")))
    lines.append('To call tools reply {"tool_calls":[{"name":...,"arguments":{...}}]} (several calls run in '
                 'parallel); their results come back as tool turns. When you can answer, reply {"answer":"..."}.')
    return "\n".join(lines)


class ToolSession:
    """A conversation with tools: :meth:`respond` runs the model until it answers.

    Args:
        model: a text decoder.
        tokenizer: its tokenizer (a transformers tokenizer with a chat template, or mmafm's).
        tools: the tools it may call.
        system: the system instruction (the tools' descriptions are appended).
        max_rounds: most assistant turns with calls per reply; the next turn must answer.
        max_calls: most calls in one turn.
        max_new_tokens: token limit of one assistant turn.
        max_answer_chars: longest answer (characters), so an answer always fits the token limit.
        engine: grammar engine (``"llguidance"`` / ``"xgrammar"``).
        sampling: ``temperature`` / ``top_k`` / ``top_p`` / ``seed`` for every turn (greedy by default).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, tools: Sequence[Tool], *, system: str | None = None,
                 max_rounds: int = 3, max_calls: int = 4, max_new_tokens: int = 160, max_answer_chars: int = 300,
                 engine: str = "llguidance", **sampling: Any):
        names = [tool.name for tool in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.model, self.tokenizer, self.tools = model, tokenizer, {tool.name: tool for tool in tools}
        self.max_rounds, self.max_calls, self.max_new_tokens = max_rounds, max_calls, max_new_tokens
        self.max_answer_chars = max_answer_chars
        self.engine, self.sampling = engine, sampling
        self.transcript = Transcript([Turn("system", _system_text(tools, system))])

    def _prompt(self) -> list[int]:
        messages = self.transcript.messages()
        if getattr(self.tokenizer, "chat_template", None) is not None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        from mmafm.data.chat import prompt_ids

        return prompt_ids(messages + [{"role": "assistant", "content": ""}], self.tokenizer)

    def _turn(self, tool_choice: str) -> dict:
        schema = turn_schema(list(self.tools.values()), tool_choice, self.max_calls, self.max_answer_chars)
        return generate_object(self.model, self.tokenizer, None, self._prompt(), schema=schema,
                               max_new_tokens=self.max_new_tokens, engine=self.engine, **self.sampling)

    def respond(self, message: str, tool_choice: str = "auto") -> str:
        """Add the user's ``message``, run turns (calling tools) until the model answers; the answer.

        Args:
            message: the user's turn.
            tool_choice: the first turn's restriction (``"auto"``, ``"required"``, ``"none"``);
                later turns are ``"auto"``, the last allowed one ``"none"``.
        """
        self.transcript.turns.append(Turn("user", message))
        for round_index in range(self.max_rounds + 1):
            choice = tool_choice if round_index == 0 else "auto"
            if round_index == self.max_rounds:
                choice = "none"
            reply = self._turn(choice)
            text = json.dumps(reply, separators=(",", ":"))
            if "answer" in reply:
                self.transcript.turns.append(Turn("assistant", reply["answer"]))
                return reply["answer"]
            calls = [ToolCall(call["name"], instance_from_json(self.tools[call["name"]].arguments, call["arguments"]))
                     for call in reply["tool_calls"]]
            self.transcript.turns.append(Turn("assistant", text, calls))
            for call in run_calls(self.tools, calls):
                self.transcript.turns.append(Turn("tool", call.result, name=call.name))
        raise AssertionError("unreachable: the last round only allows an answer")


# ------------------------------------------------------------------------------ demo tools

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression (numbers, + - * / // % **, parentheses); nothing else
    is evaluated."""
    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    return value(ast.parse(expression, mode="eval").body)


@dataclass
class CalculatorArgs:
    expression: Annotated[str, Guide("an arithmetic expression, e.g. 12*(3+4)", pattern=r"[0-9+\-*/(). ]{1,40}")]


@dataclass
class LookupArgs:
    title: Annotated[str, Guide("the title of a Wikipedia article", pattern=r"[A-Za-z0-9 ,()'-]{1,40}")]


@dataclass
class DateArgs:
    operation: Literal["today", "weekday", "days_between"]
    first: Annotated[str, Guide("a date YYYY-MM-DD (ignored for today)", pattern=r"\d{4}-\d{2}-\d{2}")]
    second: Annotated[str, Guide("a second date YYYY-MM-DD (days_between only)", pattern=r"\d{4}-\d{2}-\d{2}")]


def _lookup_function(limit: int) -> Callable[[LookupArgs], str]:
    from mmafm.data.text_sources import wikipedia_documents

    articles = {title.lower(): text.split("\n", 1)[1] for title, text in wikipedia_documents(limit=limit)}

    def lookup(args: LookupArgs) -> str:
        key = args.title.strip().lower()
        if key in articles:
            return articles[key][:400]
        close = [t for t in articles if key and (key in t or t in key)]
        if close:
            return articles[close[0]][:400]
        return f"no article titled {args.title!r}"

    return lookup


def _date(args: DateArgs, today: dt.date) -> str:
    if args.operation == "today":
        return today.isoformat()
    first = dt.date.fromisoformat(args.first)
    if args.operation == "weekday":
        return first.strftime("%A")
    return str((dt.date.fromisoformat(args.second) - first).days)


def demo_tools(today: dt.date | None = None, wikipedia_limit: int = 0) -> list[Tool]:
    """The demo tools: ``calculator``, ``wikipedia`` (lookup in the bundled summaries; needs the
    data package, see ``data_cards/``) and ``date`` (today / weekday / days between)."""
    today = today or dt.date.today()
    return [
        Tool("calculator", "Evaluates an arithmetic expression.", CalculatorArgs,
             lambda args: calculate(args.expression)),
        Tool("wikipedia", "Returns the summary of the Wikipedia article with this title.", LookupArgs,
             _lookup_function(wikipedia_limit)),
        Tool("date", "Date facts: today's date, the weekday of a date, or the days between two dates.", DateArgs,
             lambda args: _date(args, today)),
    ]
