"""Generated math and code text for continued pretraining (more math and code: 2024 AFM report,
section 3.2; ``../shared/WAVE2.md``, "Pretraining recipe").

The bundled text sources (:mod:`mmafm.data.text_sources`) hold almost no arithmetic and no code,
so the continued-pretraining stage mixes in two generated sources. Both follow the text sources'
signature ``<name>_documents(limit, seed, stats)`` yielding ``(doc_id, text)``; ``limit`` is the
number of documents (generated sources have no "all"; 0 means :data:`DEFAULT_DOCUMENTS`).

- ``arithmetic``: each document holds 3-6 worked problems (GSM-lite): the four operations on
  1-3 digit numbers, bracketed expressions evaluated step by step, and short word problems
  solved in steps; every result is computed, never typed.
- ``code``: each document holds 1-3 small Python programs (functions over numbers, lists,
  strings and dicts, a class, a loop), each followed by the output it prints as a comment
  (``# output: ...``): the program is executed here, with :func:`exec` on code this module
  wrote, to get that output.

Document ``i`` of a seed is a function of ``(source, seed, i)`` only (``random.Random``), so any
subset or order of documents can be regenerated. Data cards: ``data_cards/arithmetic.md``,
``data_cards/code.md``.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import random
from typing import Callable, Iterator

from mmafm.data import SourceStats

__all__ = [
    "DEFAULT_DOCUMENTS",
    "GENERATED_TEXT_SOURCES",
    "LICENSE",
    "arithmetic_documents",
    "code_documents",
    "run_program",
]

DEFAULT_DOCUMENTS = 2000
LICENSE = "CC0-1.0 (generated here)"
PACKAGE = "built in (mmafm.data.synthetic_text)"
NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Theo", "Sara", "Kenji")
ITEMS = ("apples", "marbles", "stamps", "pencils", "shells", "cards", "coins", "books", "stickers", "beads")
WORDS = ("river", "stone", "cloud", "maple", "ember", "harbor", "lantern", "meadow", "copper", "violet")


# ------------------------------------------------------------------------------- arithmetic
def _operation(rng: random.Random) -> str:
    kind = rng.choice("+-*/")
    if kind == "+":
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        return f"Question: What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}."
    if kind == "-":
        a, b = sorted((rng.randint(2, 999), rng.randint(2, 999)), reverse=True)
        return f"Question: What is {a} - {b}?\nAnswer: {a} - {b} = {a - b}."
    if kind == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 12)
        return f"Question: What is {a} times {b}?\nAnswer: {a} * {b} = {a * b}."
    b, quotient = rng.randint(2, 12), rng.randint(2, 99)
    return f"Question: What is {b * quotient} divided by {b}?\nAnswer: {b * quotient} / {b} = {quotient}."


def _expression(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 20) for _ in range(4))
    inner = b + c
    product = a * inner
    if rng.random() < 0.5:
        return (f"Question: Compute {a} * ({b} + {c}) - {d}.\nAnswer: {b} + {c} = {inner}. "
                f"{a} * {inner} = {product}. {product} - {d} = {product - d}. The answer is {product - d}.")
    return (f"Question: Compute ({b} + {c}) * {a} + {d}.\nAnswer: {b} + {c} = {inner}. "
            f"{inner} * {a} = {product}. {product} + {d} = {product + d}. The answer is {product + d}.")


def _word_problem(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    start = rng.randint(10, 60)
    given = rng.randint(1, start - 1)
    bought = rng.randint(2, 30)
    left = start - given
    total = left + bought
    if rng.random() < 0.5:
        return (f"Question: {name} has {start} {item}. {name} gives {given} to {friend} and then buys {bought} more. "
                f"How many {item} does {name} have now?\nAnswer: {start} - {given} = {left}. {left} + {bought} = "
                f"{total}. {name} has {total} {item}.")
    boxes, per_box = rng.randint(2, 9), rng.randint(3, 15)
    return (f"Question: {name} packs {boxes} boxes with {per_box} {item} each and keeps {bought} more aside. "
            f"How many {item} is that in all?\nAnswer: {boxes} * {per_box} = {boxes * per_box}. "
            f"{boxes * per_box} + {bought} = {boxes * per_box + bought}. That is {boxes * per_box + bought} {item}.")


def arithmetic_documents(limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """Worked arithmetic: 3-6 problems per document, blank-line separated."""
    stats = stats or SourceStats("arithmetic", PACKAGE, LICENSE)
    makers: tuple[Callable[[random.Random], str], ...] = (_operation, _operation, _expression, _word_problem)
    for index in range(limit or DEFAULT_DOCUMENTS):
        rng = random.Random(f"arithmetic-{seed}-{index}")
        problems = [rng.choice(makers)(rng) for _ in range(rng.randint(3, 6))]
        stats.kept += 1
        yield f"{seed}-{index}", "\n\n".join(problems)


# ------------------------------------------------------------------------------------- code
def _linear_function(rng: random.Random) -> str:
    scale, shift = rng.randint(2, 9), rng.randint(1, 20)
    name = f"scale_{rng.choice(WORDS)}"
    calls = [rng.randint(0, 30) for _ in range(rng.randint(1, 3))]
    lines = [f"def {name}(x):", f'    """Return {scale} * x + {shift}."""', f"    return {scale} * x + {shift}", "", ""]
    lines += [f"print({name}({value}))" for value in calls]
    return "\n".join(lines)


def _list_filter(rng: random.Random) -> str:
    values = [rng.randint(0, 50) for _ in range(rng.randint(4, 8))]
    kind, test = rng.choice([("even", "value % 2 == 0"), ("odd", "value % 2 == 1"),
                             ("large", f"value > {rng.randint(10, 40)}")])
    return "\n".join([
        f"def sum_{kind}(values):",
        "    total = 0",
        "    for value in values:",
        f"        if {test}:",
        "            total += value",
        "    return total",
        "",
        "",
        f"numbers = {values}",
        f"print(sum_{kind}(numbers))",
        f"print([value for value in numbers if {test}])",
    ])


def _string_function(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    times = rng.randint(2, 4)
    return "\n".join([
        "def shout(word, times):",
        '    """The word in capitals, repeated, with a final exclamation mark."""',
        '    return " ".join([word.upper()] * times) + "!"',
        "",
        "",
        f'print(shout("{word}", {times}))',
        f'print(len("{word}"), "{word}"[::-1])',
    ])


def _counter_class(rng: random.Random) -> str:
    start, steps = rng.randint(0, 10), rng.randint(1, 5)
    step = rng.randint(1, 7)
    return "\n".join([
        "class Counter:",
        "    def __init__(self, start):",
        "        self.value = start",
        "",
        "    def add(self, amount):",
        "        self.value += amount",
        "        return self.value",
        "",
        "",
        f"counter = Counter({start})",
        f"for _ in range({steps}):",
        f"    counter.add({step})",
        "print(counter.value)",
    ])


def _loop_sequence(rng: random.Random) -> str:
    count = rng.randint(5, 10)
    if rng.random() < 0.5:
        return "\n".join([
            "def fibonacci(count):",
            "    a, b = 0, 1",
            "    out = []",
            "    for _ in range(count):",
            "        out.append(a)",
            "        a, b = b, a + b",
            "    return out",
            "",
            "",
            f"print(fibonacci({count}))",
        ])
    return "\n".join([
        "def factorial(n):",
        "    result = 1",
        "    for k in range(2, n + 1):",
        "        result *= k",
        "    return result",
        "",
        "",
        f"print(factorial({count}))",
    ])


def _word_count(rng: random.Random) -> str:
    words = [rng.choice(WORDS[:4]) for _ in range(rng.randint(4, 8))]
    return "\n".join([
        "def count_words(text):",
        "    counts = {}",
        "    for word in text.split():",
        "        counts[word] = counts.get(word, 0) + 1",
        "    return counts",
        "",
        "",
        f'print(count_words("{" ".join(words)}"))',
    ])


PROGRAMS = (_linear_function, _list_filter, _string_function, _counter_class, _loop_sequence, _word_count)


def run_program(source: str) -> str:
    """What ``source`` (a program this module generated) prints, in a fresh namespace."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(source, "<generated>", "exec"), {"__builtins__": builtins, "__name__": "__generated__"})
    return buffer.getvalue()


def _with_output(source: str) -> str:
    printed = run_program(source).rstrip("\n").splitlines()
    return source + "\n" + "\n".join(f"# output: {line}" for line in printed)


def code_documents(limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """Small Python programs, each followed by the output it prints (``# output: ...`` lines)."""
    stats = stats or SourceStats("code", PACKAGE, LICENSE)
    for index in range(limit or DEFAULT_DOCUMENTS):
        rng = random.Random(f"code-{seed}-{index}")
        programs = [_with_output(rng.choice(PROGRAMS)(rng)) for _ in range(rng.randint(1, 3))]
        stats.kept += 1
        yield f"{seed}-{index}", "\n\n\n".join(programs)


GENERATED_TEXT_SOURCES: dict[str, Callable[..., Iterator[tuple[str, str]]]] = {
    "arithmetic": arithmetic_documents,
    "code": code_documents,
}
