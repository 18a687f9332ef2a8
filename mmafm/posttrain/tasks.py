"""Instruction data with no human annotators: task families generated from the bundled sources,
each with a programmatic checker.

The reports' SFT mixes human and synthetic data (WAVE2.md "Post-training"); with no annotators
here, every family is generated, and every answer can be checked by code, so a model's pass rate
per family is a number before and after each post-training stage:

============== ============================================ ===========================================
family         prompt -> reference answer                   checker (1 = pass)
============== ============================================ ===========================================
define_word    "Define the word 'X'." (WordNet 3.0 synset)   ``X (pos): <gloss>``; ROUGE-1 recall of the
                                                             gloss >= 0.5 and the word named
wiki_cloze     a Wikipedia summary + a sentence of it with   the first number in the answer is the
               one number blanked                            blanked one (extractive, exact)
arithmetic     "What is 37 + 58?" (+, -, x of 1-2 digits)    the last integer in the answer is the value
format_list    "Write these as a bulleted list: ..."         the ``- item`` lines are the items, in order
format_json    "Give a JSON object with keys ...: <facts>"   ``json.loads`` of the answer equals the object
tool_call      a user request + typed tool signatures        the ``[call] {json}`` line names the right
                                                             tool with the right typed arguments
============== ============================================ ===========================================

``visual_qa`` (:data:`VISUAL_FAMILIES`, kept apart: a text model cannot see the picture) asks how
many, what colour or where about the generated shape scenes, answers known from the scene
generator; its user turn holds ``<image>`` and the scene's ``(seed, index)``.

A tool conversation is system (tool list) / user / assistant (the call) / tool (its result) /
assistant (the answer using it); SFT learns both assistant turns, the checker scores the call
(:func:`eval_turns` cuts the conversation before it). Every family draws conversation ``i`` of a
seed from ``random.Random("<family>-<seed>-<i>")`` (the sources from a seeded shuffle), so the
first ``k`` of a seed are the held-out set and the rest train (disjoint by construction).
Card: ``data_cards/instructions.md``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from mmafm.data.chat import reference_answer

__all__ = [
    "TaskFamily",
    "FAMILIES",
    "VISUAL_FAMILIES",
    "TOOLS",
    "family_conversations",
    "eval_turns",
    "check",
    "parse_call",
    "define_conversations",
    "cloze_conversations",
    "arithmetic_conversations",
    "list_conversations",
    "json_conversations",
    "tool_conversations",
    "visual_conversations",
]

_WORDS = re.compile(r"[a-z0-9]+")
_INT = re.compile(r"-?\d+")


def _rng(family: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{family}-{seed}-{index}")


# ----------------------------------------------------------------------------- define_word


@lru_cache(maxsize=1)
def _wordnet_entries() -> tuple[tuple[str, str, str], ...]:
    """``(word, pos, definition)`` of one-word WordNet lemmas with a short definition (the gloss
    before its first ``;``), the first sense of each word only."""
    from mmafm.data.text_sources import wordnet_documents

    seen, entries = set(), []
    for _, document in wordnet_documents():
        head, _, gloss = document.partition("): ")
        lemmas, _, pos = head.rpartition(" (")
        word = lemmas.split(", ")[0]
        definition = gloss.split(";")[0].strip()
        if " " in word or "-" in word or not word.isalpha() or word in seen or not 12 <= len(definition) <= 70:
            continue
        seen.add(word)
        entries.append((word, pos, definition))
    return tuple(entries)


def define_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """"Define the word 'X'." -> ``X (pos): definition`` over WordNet's short first senses."""
    entries = list(_wordnet_entries())
    random.Random(f"define_word-{seed}").shuffle(entries)
    if count > len(entries):
        raise ValueError(f"define_word: {count} conversations asked, WordNet has {len(entries)} usable words")
    return [[{"role": "user", "content": f"Define the word '{word}'."},
             {"role": "assistant", "content": f"{word} ({pos}): {definition}"}] for word, pos, definition in entries[:count]]


def _check_define(answer: str, turns: Sequence[dict]) -> float:
    reference = reference_answer(turns)
    word, _, definition = reference.partition(" (")
    definition = definition.partition("): ")[2]
    want = _WORDS.findall(definition.lower())
    got = set(_WORDS.findall(answer.lower()))
    recall = sum(w in got for w in want) / max(len(want), 1)
    return float(word.lower() in got and recall >= 0.5)


# ----------------------------------------------------------------------------- wiki_cloze

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_NUMBER = re.compile(r"(?<![\w.,])(\d{1,4})(?![\w.,]\d)")


@lru_cache(maxsize=4)
def _cloze_items(max_chars: int) -> tuple[tuple[str, str, str], ...]:
    """``(extract, blanked sentence, number)`` over Wikipedia summaries of <= ``max_chars``
    characters holding a sentence with exactly one number that appears once in the extract."""
    from mmafm.data.text_sources import wikipedia_documents

    items = []
    for _, document in wikipedia_documents():
        extract = document.split("\n", 1)[-1].strip()
        if len(extract) > max_chars:
            continue
        for sentence in _SENTENCE_END.split(extract)[1:]:  # not the lead: it often restates the title
            numbers = _NUMBER.findall(sentence)
            if len(numbers) == 1 and extract.count(numbers[0]) == 1 and len(sentence) >= 30:
                items.append((extract, _NUMBER.sub("___", sentence, count=1), numbers[0]))
                break
    return tuple(items)


def cloze_conversations(count: int, seed: int = 0, max_chars: int = 400) -> list[list[dict]]:
    """A Wikipedia summary and one of its sentences with its number blanked -> that number."""
    items = list(_cloze_items(max_chars))
    random.Random(f"wiki_cloze-{seed}").shuffle(items)
    if count > len(items):
        raise ValueError(f"wiki_cloze: {count} conversations asked, only {len(items)} Wikipedia summaries fit "
                         f"max_chars={max_chars}")
    return [[{"role": "user", "content": f"{extract}\n\nFrom the text, which number fills the blank? {blanked}"},
             {"role": "assistant", "content": number}] for extract, blanked, number in items[:count]]


def _first_int(text: str) -> str | None:
    match = _INT.search(text.replace(",", ""))
    return match.group(0) if match else None


def _check_cloze(answer: str, turns: Sequence[dict]) -> float:
    return float(_first_int(answer) == reference_answer(turns).strip())


# ----------------------------------------------------------------------------- arithmetic


def arithmetic_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """"What is a <op> b?" with a, b in 0..99 (x: one factor <= 12) -> the exact value."""
    conversations = []
    for index in range(count):
        rng = _rng("arithmetic", seed, index)
        op = rng.choice("+-x")
        a, b = rng.randint(0, 99), rng.randint(0, 99 if op != "x" else 12)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        conversations.append([{"role": "user", "content": f"What is {a} {op} {b}?"},
                              {"role": "assistant", "content": f"{a} {op} {b} = {value}"}])
    return conversations


def _check_arithmetic(answer: str, turns: Sequence[dict]) -> float:
    found = _INT.findall(answer.replace(",", ""))
    return float(bool(found) and found[-1] == _INT.findall(reference_answer(turns))[-1])


# ----------------------------------------------------------------------------- formatting

_ITEMS = ("apple", "river", "lamp", "guitar", "cloud", "pencil", "tiger", "bridge", "candle", "mirror", "garden",
          "rocket", "violin", "basket", "island", "ladder", "planet", "saddle", "tunnel", "window")
_NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena")
_CITIES = ("Paris", "Lagos", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Dublin", "Hanoi")


def list_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """"Write these as a bulleted list: a, b, c." -> ``- a\\n- b\\n- c``."""
    conversations = []
    for index in range(count):
        rng = _rng("format_list", seed, index)
        items = rng.sample(_ITEMS, rng.randint(2, 4))
        conversations.append([{"role": "user", "content": f"Write these as a bulleted list: {', '.join(items)}."},
                              {"role": "assistant", "content": "\n".join(f"- {item}" for item in items)}])
    return conversations


def _bullets(text: str) -> list[str]:
    return [line.strip()[2:].strip().rstrip(".").lower() for line in text.splitlines() if line.strip().startswith("- ")]


def _check_list(answer: str, turns: Sequence[dict]) -> float:
    return float(_bullets(answer) == _bullets(reference_answer(turns)))


def json_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """"Give a JSON object with keys name, age and city: Bruno is 31 and lives in Lima." ->
    ``{"name": "Bruno", "age": 31, "city": "Lima"}``."""
    conversations = []
    for index in range(count):
        rng = _rng("format_json", seed, index)
        name, age, city = rng.choice(_NAMES), rng.randint(18, 90), rng.choice(_CITIES)
        target = {"name": name, "age": age, "city": city}
        conversations.append([
            {"role": "user", "content": f"Give a JSON object with keys name, age and city: {name} is {age} and lives in {city}."},
            {"role": "assistant", "content": json.dumps(target)}])
    return conversations


def _json_object(text: str) -> dict | None:
    start, stop = text.find("{"), text.rfind("}")
    if start < 0 or stop < start:
        return None
    try:
        value = json.loads(text[start : stop + 1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _check_json(answer: str, turns: Sequence[dict]) -> float:
    got = _json_object(answer)
    return float(got is not None and got == json.loads(reference_answer(turns)))


# ----------------------------------------------------------------------------- tools

TOOLS = {  # name -> (argument name -> type), a typed signature the checker enforces
    "weather": {"city": str},
    "add": {"a": int, "b": int},
    "convert": {"value": int, "unit_from": str, "unit_to": str},
}
_CONDITIONS = ("sunny", "rainy", "cloudy", "windy", "snowy")
_UNITS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("h", "min"): 60}


def _tool_list() -> str:
    def type_name(kind: type) -> str:
        return {str: "string", int: "integer"}[kind]

    return "Tools: " + "; ".join(f"{name}({', '.join(f'{a}: {type_name(t)}' for a, t in args.items())})"
                                 for name, args in TOOLS.items())


def tool_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """A request that one of :data:`TOOLS` answers: the call, its (generated) result, the answer."""
    conversations = []
    for index in range(count):
        rng = _rng("tool_call", seed, index)
        kind = rng.choice(sorted(TOOLS))
        if kind == "weather":
            city, condition, degrees = rng.choice(_CITIES), rng.choice(_CONDITIONS), rng.randint(-5, 35)
            ask, args = f"What is the weather in {city}?", {"city": city}
            result, final = f"{condition}, {degrees} C", f"It is {condition} in {city}, {degrees} C."
        elif kind == "add":
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            ask, args, result, final = f"Use the tool to add {a} and {b}.", {"a": a, "b": b}, str(a + b), f"{a + b}"
        else:
            (unit_from, unit_to), factor = rng.choice(sorted(_UNITS.items()))
            value = rng.randint(2, 50)
            ask = f"Convert {value} {unit_from} to {unit_to}."
            args = {"value": value, "unit_from": unit_from, "unit_to": unit_to}
            result, final = str(value * factor), f"{value} {unit_from} is {value * factor} {unit_to}."
        conversations.append([
            {"role": "system", "content": _tool_list()},
            {"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [{"name": kind, "arguments": args}]},
            {"role": "tool", "name": kind, "content": result},
            {"role": "assistant", "content": final}])
    return conversations


def parse_call(text: str) -> dict | None:
    """The ``{"name", "arguments"}`` of the first ``[call] {json}`` line of ``text`` if it is a
    well-typed call of one of :data:`TOOLS` (every argument present, of its type, no other)."""
    match = re.search(r"\[call\]\s*(\{.*\})", text)
    if not match:
        return None
    try:
        call = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in TOOLS or not isinstance(call.get("arguments"), dict):
        return None
    signature, arguments = TOOLS[call["name"]], call["arguments"]
    if set(arguments) != set(signature):
        return None
    if not all(isinstance(arguments[a], t) and not isinstance(arguments[a], bool) for a, t in signature.items()):
        return None
    return call


def _check_tool(answer: str, turns: Sequence[dict]) -> float:
    call = parse_call(answer)
    want = next(turn for turn in turns if turn["role"] == "assistant")["tool_calls"][0]
    return float(call is not None and call["name"] == want["name"] and call["arguments"] == want["arguments"])


# ----------------------------------------------------------------------------- the families


@dataclass(frozen=True)
class TaskFamily:
    """A generated instruction task: its conversations and the checker of an answer."""

    name: str
    description: str
    source: str  # where the content comes from (the data card's "package")
    conversations: Callable[[int, int], list[list[dict]]]  # (count, seed) -> distinct conversations
    checker: Callable[[str, Sequence[dict]], float]  # (answer, conversation) -> 1 pass / 0 fail


FAMILIES = {family.name: family for family in (
    TaskFamily("define_word", "define a word (WordNet 3.0)", "wordnet-base (Debian)", define_conversations, _check_define),
    TaskFamily("wiki_cloze", "answer from a Wikipedia summary (extractive, a blanked number)",
               "wikipedia summaries (PyPI)", cloze_conversations, _check_cloze),
    TaskFamily("arithmetic", "add, subtract, multiply: exact answers", "generated", arithmetic_conversations,
               _check_arithmetic),
    TaskFamily("format_list", "write items as a bulleted list", "generated", list_conversations, _check_list),
    TaskFamily("format_json", "facts as a JSON object", "generated", json_conversations, _check_json),
    TaskFamily("tool_call", "call a typed tool (weather, add, convert), then answer from its result", "generated",
               tool_conversations, _check_tool),
)}


# ----------------------------------------------------------------------------- visual questions

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}  # "a" / "an": see _count_word


def visual_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Questions about the generated shape scenes (:mod:`mmafm.data.synthetic`) with answers known
    from the scene: how many, what colour, where. Conversation ``i`` of ``seed`` asks about scene
    ``i`` of the synthetic set for that seed (``synthetic_pair(i, seed, size).image`` is its
    picture); its user turn holds ``<image>`` and ``"image": {"source": "synthetic", "seed",
    "index"}`` so a vision-language stage can render it."""
    from mmafm.data.synthetic import SHAPES, sample_scene

    conversations = []
    for index in range(count):
        scene = sample_scene(random.Random(f"mmafm-synthetic-{seed}-{index}"))  # the synthetic set's own draw
        rng = _rng("visual_qa", seed, index)
        group = rng.choice(scene.groups)
        plural = SHAPES[group.shape]
        shape_unique = sum(g.shape == group.shape for g in scene.groups) == 1  # else "what colour" is ambiguous
        kind = rng.choice(("count", "colour", "position") if shape_unique else ("count", "position"))
        if kind == "count":
            question, answer = f"How many {group.colour} {plural} are there?", str(group.count)
        elif kind == "colour":
            question, answer = f"What colour are the {plural}?", group.colour
        else:
            question, answer = f"Where are the {group.colour} {plural}?", group.position
        conversations.append([
            {"role": "user", "content": f"<image>\n{question}", "image": {"source": "synthetic", "seed": seed, "index": index}},
            {"role": "assistant", "content": answer}])
    return conversations


def _asked_shape(turns: Sequence[dict]) -> str | None:
    """The singular shape a "How many <colour> <shapes> are there?" question asks about."""
    from mmafm.data.synthetic import SHAPES

    question = next((t["content"] for t in turns if t["role"] == "user"), "")
    match = re.search(r"How many \w+ (\w+)", question)
    return next((s for s, p in SHAPES.items() if match and p == match.group(1)), None)


def _count_word(words: Sequence[str], index: int, shape: str | None) -> int | None:
    """The count ``words[index]`` states: a digit or a number word; "a" / "an" only as the article
    of the asked shape within the next three words ("a red circle" is 1, "a picture of ..." is not)."""
    word = words[index]
    if word.isdigit():
        return int(word)
    if word in ("a", "an"):
        return 1 if shape is not None and shape in words[index + 1 : index + 4] else None
    return _NUMBER_WORDS.get(word)


def _check_visual(answer: str, turns: Sequence[dict]) -> float:
    from mmafm.data.synthetic import COLOURS, POSITIONS

    reference, text = reference_answer(turns).strip(), answer.lower()
    if reference.isdigit():
        words = _WORDS.findall(text)
        first = next((n for i, w in enumerate(words) if (n := _count_word(words, i, _asked_shape(turns))) is not None), None)
        return float(first == int(reference))
    if reference in COLOURS:
        named = {c for c in COLOURS if re.search(rf"\b{c}\b", text)}
        return float(named == {reference})
    named = {p for p in POSITIONS if p in text}
    return float(named == {reference})


VISUAL_FAMILIES = {"visual_qa": TaskFamily(
    "visual_qa", "count, colour and position questions over the generated shape scenes (needs a vision-language model)",
    "generated (mmafm.data.synthetic)", visual_conversations, _check_visual)}


def family_conversations(name: str, count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` conversations of family ``name`` (see :data:`FAMILIES`)."""
    family = FAMILIES.get(name) or VISUAL_FAMILIES.get(name)
    if family is None:
        raise ValueError(f"unknown task family {name!r}; families are: {', '.join([*FAMILIES, *VISUAL_FAMILIES])}")
    return family.conversations(count, seed)


def eval_turns(turns: Sequence[dict]) -> list[dict]:
    """The conversation up to the assistant turn a checker scores: the first tool call if there is
    one, else the last assistant turn."""
    turns = list(turns)
    for index, turn in enumerate(turns):
        if turn["role"] == "assistant" and turn.get("tool_calls"):
            return turns[: index + 1]
    return turns


def check(family: str, answer: str, turns: Sequence[dict]) -> float:
    """Family ``family``'s checker on ``answer`` to ``turns`` (1 = pass, 0 = fail)."""
    return (FAMILIES.get(family) or VISUAL_FAMILIES[family]).checker(answer, turns)
