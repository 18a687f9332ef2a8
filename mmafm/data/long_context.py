"""Long-context tasks generated from the bundled text (RULER-like: Hsieh et al., 2024).

The 2024 AFM report lengthens the context with "synthetic long-context Q&A data" and measures it
with RULER (its Table 9: 91.7 at 4k falling to 43.3 at 32k; ``../shared/WAVE2.md``). RULER's
retrieval and tracing tasks need no labelled data: a *haystack* of ordinary text with *needles*
hidden in it, and a question whose answer only a needle holds. This module builds them from the
text the data stage bundles (:mod:`mmafm.data.text_sources`), at an exact length, deterministic
by seed. It is used for training data (stage ``05_long_context``) and for evaluation.

Tasks (:data:`TASKS`):

- ``passkey``: one unkeyed number, "The pass key is 4821937. Remember it." (Mohtashami & Jaggi,
  2023, in a real-text haystack as RULER's NIAH does); question "What is the pass key?".
- ``needle``: one keyed number, "One of the special magic numbers for silver-lantern is:
  4821937." (RULER ``niah_single``); the question names the key.
- ``multikey``: ``num_needles`` keyed numbers with distinct keys; the question asks for one of
  them, the others are distractors (RULER ``niah_multikey``).
- ``variable_tracking``: ``chains`` chains of ``hops`` assignments "VAR QKXHA = 58361." then
  "VAR BZTWE = VAR QKXHA." ...; the question asks for every variable holding the first chain's
  value (RULER ``vt``); the answer is the chain's names in order, space-separated.

API::

    docs = haystack_documents(("wikipedia",), split="val")          # the data stage's val split
    ex = make_example("needle", 512, docs, tokenizer=tok, seed=0, index=3)
    ex.prompt            # context + "\\n" + question (the question ends with the answer prefix)
    ex.answer            # what follows the prompt after one space, e.g. "4821937"
    ex.text              # prompt + " " + answer: the training text; measures <= 512 tokens
    examples = long_context_examples("passkey", 1024, 16, docs, tokenizer=tok, seed=1)
    exact_match(generated_continuation, ex.answer)

Lengths: ``ex.text`` measures at most ``length`` in the requested unit (``tokens`` by
``tokenizer.encode`` without BOS/EOS, or ``chars``) and as close to it as whole words of filler
allow (the filler is cut at a word boundary found by bisection). Exactly-once guarantee: every
number a question asks about, every key and every variable name occurs in the context exactly
where the needles put it (values and names are redrawn if the haystack happens to contain them),
so ``context.count(answer) == 1`` for the three retrieval tasks and ``"VAR NAME ="`` occurs once
per name for ``variable_tracking``. Determinism: an example is a function of ``(task, length,
unit, seed, index)``, the options and the documents; :func:`haystack_documents` returns a fixed
order.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

__all__ = [
    "TASKS",
    "UNITS",
    "LongContextExample",
    "haystack_documents",
    "make_example",
    "long_context_examples",
    "exact_match",
]

TASKS = ("passkey", "needle", "multikey", "variable_tracking")
UNITS = ("tokens", "chars")
MAX_REDRAWS = 100  # attempts at values / keys the haystack does not already contain
# two-word keys: unlikely in any bundled text, checked anyway
KEY_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
    "lucky", "mellow", "nimble", "olive", "plain", "quiet", "rusty", "silver", "tidy", "upper",
    "vivid", "windy", "young", "zesty",
)
KEY_NOUNS = (
    "anchor", "basket", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river",
    "saddle", "tunnel", "umbrella", "valley", "walnut", "yarn", "zebra",
)


@dataclass(frozen=True)
class LongContextExample:
    """One generated example; :attr:`text` is what a model trains on, :attr:`prompt` what it
    is asked, :attr:`answer` what it should continue with (after one space)."""

    task: str  # one of TASKS
    context: str  # the haystack with the needles in it
    question: str  # ends with the answer's prefix ("... The pass key is")
    answer: str  # the expected continuation, without its leading space
    length: int  # the requested length of `text`
    unit: str  # "tokens" or "chars"
    measured: int  # the length of `text` in `unit` (<= length)
    depths: tuple[float, ...] = field(default=())  # each needle's drawn depth, fraction of the haystack words (placed at the next sentence end)
    seed: int = 0
    index: int = 0

    @property
    def prompt(self) -> str:
        """The context and the question: what a model is given."""
        return f"{self.context}\n{self.question}"

    @property
    def text(self) -> str:
        """The prompt followed by the answer: a training document."""
        return f"{self.prompt} {self.answer}"


# ------------------------------------------------------------------------------- haystack
@lru_cache(maxsize=8)
def _source_documents(source: str, limit: int, seed: int) -> tuple[tuple[str, str], ...]:
    from mmafm.data.text_sources import TEXT_SOURCES

    return tuple(TEXT_SOURCES[source].documents(limit, seed))


def haystack_documents(
    sources: Sequence[str] = ("wikipedia",),
    limit: int = 0,
    seed: int = 0,
    split: str | None = None,
    val_fraction: float = 0.05,
) -> list[str]:
    """Documents of the bundled text sources, in a fixed order, to hide needles in.

    Args:
        sources: names in :data:`mmafm.data.text_sources.TEXT_SOURCES`.
        limit: documents per source (a seeded subset, as the data stage draws it); 0 = all.
        seed: the subset's seed.
        split: ``"train"`` or ``"val"`` keeps the documents the data stage puts in that split
            (:func:`mmafm.data.shards.split_of` of ``"<source>/<doc_id>"``), so training and
            evaluation haystacks never share a document; ``None`` keeps all.
        val_fraction: the data stage's ``val_fraction``.
    """
    from mmafm.data.shards import split_of
    from mmafm.data.text_sources import TEXT_SOURCES

    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    unknown = [name for name in sources if name not in TEXT_SOURCES]
    if unknown or not sources:
        raise ValueError(f"haystack sources {list(sources)}: expected names from {sorted(TEXT_SOURCES)}")
    documents = []
    for name in sources:
        for doc_id, text in _source_documents(name, limit, seed):
            if split is None or split_of(f"{name}/{doc_id}", val_fraction) == split:
                documents.append(text)
    if not documents:
        raise ValueError(f"no {split or ''} documents in sources {list(sources)} (limit {limit})")
    return documents


def _filler_pieces(documents: Sequence[str], start: int, needed: int) -> list[str]:
    """Words with their trailing whitespace, from document ``start`` on (cycling), >= ``needed``."""
    pieces: list[str] = []
    position = start
    while len(pieces) < needed:
        words = re.findall(r"\S+\s*", documents[position % len(documents)])
        if words:
            words[-1] = words[-1].rstrip() + "\n\n"  # documents separated by a blank line
            pieces.extend(words)
        position += 1
        if position - start > len(documents) and not pieces:
            raise ValueError("the haystack documents hold no words")
    return pieces


def _insert(pieces: Sequence[str], needles: Sequence[tuple[float, str]]) -> str:
    """The words with each needle sentence placed at the first sentence end at or after word
    ``round(depth * len(words))`` (at that word when no sentence ends after it)."""
    out: list[str] = []
    ordered = sorted(needles, key=lambda item: item[0])  # stable: a chain keeps its order
    # a needle goes at the first sentence end at or after its depth (as RULER places them)
    ends = [i + 1 for i, piece in enumerate(pieces) if piece.rstrip()[-1:] in ".!?" or piece.endswith("\n")]
    slots = []
    for depth, _ in ordered:
        wanted = round(depth * len(pieces))
        slots.append(next((end for end in ends if end >= wanted), wanted))
    cursor = 0
    for slot, (_, sentence) in zip(slots, ordered):
        out.extend(pieces[cursor:slot])
        cursor = slot
        if out and not out[-1][-1:].isspace():
            out.append(" ")
        out.append(sentence + " ")
    out.extend(pieces[cursor:])
    return "".join(out).strip()


# -------------------------------------------------------------------------------- needles
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _needles(task: str, rng: random.Random, digits: int, num_needles: int, hops: int, chains: int):
    """``(sentences, question, answer, protected strings)`` of one draw."""
    if task == "passkey":
        value = _number(rng, digits)
        return ([f"The pass key is {value}. Remember it."], "What is the pass key? The pass key is", value, [value])
    if task in ("needle", "multikey"):
        count = 1 if task == "needle" else num_needles
        keys: list[str] = []
        while len(keys) < count:
            key = _key(rng)
            if key not in keys:
                keys.append(key)
        values: list[str] = []
        while len(values) < count:
            value = _number(rng, digits)
            if value not in values:
                values.append(value)
        sentences = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        asked = rng.randrange(count)
        question = (f"What is the special magic number for {keys[asked]} mentioned in the text? "
                    f"The special magic number for {keys[asked]} is:")
        return sentences, question, values[asked], keys + values
    if task == "variable_tracking":
        names: list[str] = []
        while len(names) < chains * (hops + 1):
            name = _name(rng)
            if name not in names:
                names.append(name)
        values = []
        while len(values) < chains:
            value = _number(rng, digits)
            if value not in values:
                values.append(value)
        sentences = []
        for chain in range(chains):
            chain_names = names[chain * (hops + 1) : (chain + 1) * (hops + 1)]
            sentences.append([f"VAR {chain_names[0]} = {values[chain]}."]
                             + [f"VAR {new} = VAR {old}." for old, new in zip(chain_names, chain_names[1:])])
        question = f"Which variables are assigned the value {values[0]}? They are:"
        return sentences, question, " ".join(names[: hops + 1]), names + values
    raise ValueError(f"unknown long-context task {task!r}; tasks: {', '.join(TASKS)}")


def _protected_ok(context: str, protected: Sequence[str], sentences: Sequence[str]) -> bool:
    """Every protected string occurs in the context only where a needle sentence put it."""
    return all(context.count(item) == sum(sentence.count(item) for sentence in sentences) for item in protected)


def _measure_fn(unit: str, tokenizer: Any) -> Callable[[str], int]:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "chars":
        return len
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError("unit='tokens' needs a tokenizer with encode(text) -> ids")
    return lambda text: len(tokenizer.encode(text))


def make_example(
    task: str,
    length: int,
    documents: Sequence[str],
    tokenizer: Any = None,
    unit: str = "tokens",
    seed: int = 0,
    index: int = 0,
    depth: float | None = None,
    digits: int = 7,
    num_needles: int = 4,
    hops: int = 4,
    chains: int = 1,
) -> LongContextExample:
    """One example whose :attr:`~LongContextExample.text` measures at most ``length``.

    Args:
        task: one of :data:`TASKS`.
        length: the length of the whole text (context, question and answer) in ``unit``.
        documents: haystack texts (:func:`haystack_documents`); the haystack starts at a
            seeded document and runs on through the following ones.
        tokenizer: anything with ``encode(text) -> list`` when ``unit == "tokens"``.
        unit: ``"tokens"`` or ``"chars"``.
        seed, index: the example's identity; same arguments, same example.
        depth: where the (first) needle goes, as a fraction of the haystack; ``None`` draws it
            uniformly (every needle of ``multikey`` / ``variable_tracking`` is drawn).
        digits: digits of every number (RULER: 7).
        num_needles: needles of ``multikey`` (RULER: 4).
        hops: assignments after the first of each ``variable_tracking`` chain (RULER: 4).
        chains: ``variable_tracking`` chains; all but the first are distractors (RULER: 1).

    Raises:
        ValueError: an unknown task or unit, or a ``length`` too short for the needles and the
            question alone (the message gives the minimum).
    """
    if task not in TASKS:
        raise ValueError(f"unknown long-context task {task!r}; tasks: {', '.join(TASKS)}")
    if not documents:
        raise ValueError("make_example: documents is empty; pass haystack_documents(...)")
    if digits < 2 or num_needles < 1 or hops < 1 or chains < 1:
        raise ValueError(f"make_example: digits >= 2, num_needles, hops, chains >= 1 expected, got "
                         f"{digits}, {num_needles}, {hops}, {chains}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_example: depth must be in [0, 1], got {depth}")
    measure = _measure_fn(unit, tokenizer)
    rng = random.Random(f"{task}|{length}|{unit}|{seed}|{index}")
    pieces = _filler_pieces(documents, rng.randrange(len(documents)), max(length, 1) + 1)
    for _ in range(MAX_REDRAWS):
        sentences, question, answer, protected = _needles(task, rng, digits, num_needles, hops, chains)
        if task == "variable_tracking":
            needles = []
            for chain in sentences:
                chain_depths = sorted(rng.random() for _ in chain)
                if depth is not None and not needles:
                    chain_depths[0] = depth
                    chain_depths = [chain_depths[0]] + sorted(max(d, depth) for d in chain_depths[1:])
                needles += list(zip(chain_depths, chain))
        else:
            depths = [rng.random() for _ in sentences]
            if depth is not None:
                depths[0] = depth
            needles = list(zip(depths, sentences))

        def compose(count: int) -> tuple[str, str]:
            context = _insert(pieces[:count], needles)
            return context, f"{context}\n{question} {answer}"

        context, text = compose(0)
        if measure(text) > length:
            raise ValueError(f"{task}: length {length} {unit} is too short for the needles and the question "
                             f"alone ({measure(text)} {unit}); ask for at least that")
        low, high = 0, len(pieces)  # the largest filler that fits: low fits, high + 1 does not
        while low < high:
            middle = (low + high + 1) // 2
            if measure(compose(middle)[1]) <= length:
                low = middle
            else:
                high = middle - 1
        context, text = compose(low)
        if _protected_ok(context, protected, [sentence for _, sentence in needles]):
            return LongContextExample(
                task=task, context=context, question=question, answer=answer, length=length, unit=unit,
                measured=measure(text), depths=tuple(sorted(d for d, _ in needles)), seed=seed, index=index,
            )
    raise ValueError(f"{task}: no needle values absent from the haystack after {MAX_REDRAWS} draws "
                     f"(length {length}, seed {seed}, index {index}); use more digits")


def long_context_examples(
    task: str,
    length: int,
    count: int,
    documents: Sequence[str],
    tokenizer: Any = None,
    unit: str = "tokens",
    seed: int = 0,
    **options: Any,
) -> list[LongContextExample]:
    """``count`` examples (``index`` 0 .. count - 1) of one task at one length; ``options`` as
    :func:`make_example` (``depth``, ``digits``, ``num_needles``, ``hops``, ``chains``)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [make_example(task, length, documents, tokenizer, unit, seed, index, **options) for index in range(count)]


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the first words of ``prediction`` are ``answer``'s words (a trailing period and
    whatever the model writes after the answer are ignored)."""
    expected = answer.split()
    words = [word.rstrip(".,;:") for word in prediction.split()[: len(expected)]]
    return words == expected
