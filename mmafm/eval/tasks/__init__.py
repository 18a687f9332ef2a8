"""Local lm-eval tasks over bundled and generated data: nothing downloads.

lm-eval's stock tasks fetch their data from a hub; these read JSON Lines files that
:func:`prepare_tasks` writes from the data the project already has (WAVE2.md, "Evaluation"):

| task | data | lm-eval output type | metrics |
| --- | --- | --- | --- |
| ``mmafm_cloze`` | held-out Wikipedia summaries (the data stage's val split), last word to predict | ``loglikelihood`` | ``acc`` (greedy = target), ``perplexity`` |
| ``mmafm_wordnet`` | held-out WordNet glosses: which of 4 words the gloss defines | ``multiple_choice`` | ``acc``, ``acc_norm`` (chance 0.25) |
| ``mmafm_arith`` | GSM-lite: generated one- and two-step word problems with integer answers | ``generate_until`` | ``exact_match`` |
| ``mmafm_passkey`` / ``mmafm_needle`` / ``mmafm_multikey`` / ``mmafm_vartrack`` | RULER-like retrieval in held-out Wikipedia haystacks (:mod:`mmafm.eval.long_context`), ``size`` items at each of ``lengths`` | ``generate_until`` | ``exact_match`` |

Each task is a YAML next to this file (package data) whose ``dataset_kwargs.data_files`` name
files relative to the data folder; :func:`prepare_tasks` generates the data into a cache folder,
writes the YAMLs there with absolute paths, and returns that folder: the ``include_path`` of an
``lm_eval.tasks.TaskManager`` (or ``lm_eval --include_path``). Held-out means the data stage's
own split (:func:`mmafm.data.shards.split_of` on ``"<source>/<doc_id>"`` with its
``val_fraction``), so a model trained by ``02_text_pretrain`` never saw a test document. The
generated sets are described in ``data_cards/eval_*.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import yaml

from mmafm.io import atomic_write_json, atomic_write_text

__all__ = [
    "TASK_NAMES",
    "CORE_TASKS",
    "LONG_CONTEXT_TASKS",
    "TASKS_DIR",
    "DEFAULT_LENGTHS",
    "cloze_item",
    "cloze_items",
    "parse_wordnet_document",
    "wordnet_items",
    "arithmetic_items",
    "task_template",
    "prepare_tasks",
    "check_task_names",
    "iter_task_files",
    "card_counts",
    "write_card_counts",
    "default_cache_dir",
]

TASKS_DIR = Path(__file__).resolve().parent
CORE_TASKS = ("mmafm_cloze", "mmafm_wordnet", "mmafm_arith")
LONG_CONTEXT_TASKS = ("mmafm_passkey", "mmafm_needle", "mmafm_multikey", "mmafm_vartrack")
TASK_NAMES = CORE_TASKS + LONG_CONTEXT_TASKS
DEFAULT_LENGTHS = (256, 512, 1024)  # long-context tasks: context lengths (tokens) unless told
FEWSHOT_POOL = 16  # train-split items per task, the pool few-shot examples are drawn from
DATA_VERSION = 1  # bump when a builder changes what it writes: the cache key includes it


def _held_out(source: str, doc_id: str, val_fraction: float) -> bool:
    from mmafm.data.shards import split_of

    return split_of(f"{source}/{doc_id}", val_fraction) == "val"


def _rng(*parts: object) -> random.Random:
    return random.Random("-".join(map(str, parts)))


# ------------------------------------------------------------------------------ cloze (Wikipedia)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLOZE_WORD = re.compile(r"[A-Za-z]{3,}")


def cloze_item(title: str, extract: str, max_words: int = 48, min_words: int = 12) -> dict | None:
    """A LAMBADA-shaped item from one summary: the opening sentences (at most ``max_words``
    words, whole sentences, the first always kept), the last word removed as the target.

    Returns ``{"context": "<title>\\n<passage without its last word>", "target": " <word>"}``, or
    None when the passage is shorter than ``min_words`` words or does not end in a plain word
    followed by a full stop (abbreviations, numbers and quotes are not fair targets).
    """
    paragraph = extract.strip().split("\n")[0]
    sentences = [s for s in _SENTENCE_END.split(paragraph) if s]
    if not sentences:
        return None
    passage = sentences[0]
    for sentence in sentences[1:]:
        if len((passage + " " + sentence).split()) > max_words:
            break
        passage += " " + sentence
    words = passage.split()
    if not min_words <= len(words) <= max_words or not passage.endswith("."):
        return None
    last = words[-1][:-1]
    if not _CLOZE_WORD.fullmatch(last):
        return None
    context = " ".join(words[:-1])
    return {"context": f"{title}\n{context}", "target": f" {last}"}


@functools.lru_cache(maxsize=2)
def _documents(source: str) -> tuple[tuple[str, str], ...]:
    """Every document of a text source, read once per process (both splits come from it)."""
    from mmafm.data.text_sources import TEXT_SOURCES

    return tuple(TEXT_SOURCES[source].documents())


def cloze_items(count: int, seed: int, val_fraction: float, split: str = "test") -> list[dict]:
    """``count`` cloze items from the Wikipedia summaries of the data stage's val split
    (``split="test"``) or train split (``split="train"``, the few-shot pool), seeded."""
    items = []
    for doc_id, text in _documents("wikipedia"):
        if _held_out("wikipedia", doc_id, val_fraction) != (split == "test"):
            continue
        title, _, extract = text.partition("\n")
        item = cloze_item(title, extract)
        if item is not None:
            items.append({"id": doc_id, **item})
    _rng("cloze", seed, split).shuffle(items)
    return items[:count]


# ---------------------------------------------------------------------------- WordNet (gloss -> word)
_WORDNET_DOC = re.compile(r"^(?P<lemmas>.+?) \((?P<pos>noun|verb|adjective|adverb)\): (?P<gloss>.+)$", re.S)
_PLAIN_WORD = re.compile(r"[a-z]{3,}")


def parse_wordnet_document(text: str) -> dict | None:
    """``"dog, domestic dog (noun): a member of ...; \\"example\\""`` -> lemmas, part of speech
    and the definition (the gloss before its first ``;``, examples dropped)."""
    match = _WORDNET_DOC.match(text)
    if match is None:
        return None
    definition = match["gloss"].split(";")[0].strip()
    return {"lemmas": match["lemmas"].split(", "), "pos": match["pos"], "definition": definition}


def wordnet_items(count: int, seed: int, val_fraction: float, split: str = "test", choices: int = 4) -> list[dict]:
    """``count`` multiple-choice items: the definition of a held-out synset (val split for
    ``"test"``), its first lemma and ``choices - 1`` distractors, the first lemmas of other
    synsets of the same part of speech; all answers plain lowercase words of 3+ letters that do
    not occur in their definition. The answer's position is drawn per item (seeded)."""
    pool: dict[str, list[str]] = {}
    candidates = []
    for doc_id, text in _documents("wordnet"):
        parsed = parse_wordnet_document(text)
        if parsed is None:
            continue
        word = parsed["lemmas"][0]
        if not _PLAIN_WORD.fullmatch(word):
            continue
        pool.setdefault(parsed["pos"], []).append(word)
        if _held_out("wordnet", doc_id, val_fraction) != (split == "test"):
            continue
        if word in parsed["definition"].lower() or len(parsed["definition"].split()) < 3:
            continue
        candidates.append((doc_id, parsed))
    rng = _rng("wordnet", seed, split)
    rng.shuffle(candidates)
    items = []
    for doc_id, parsed in candidates[:count]:
        distractors: list[str] = []
        while len(distractors) < choices - 1:  # every part of speech has thousands of words
            word = rng.choice(pool[parsed["pos"]])
            if word not in parsed["lemmas"] and word not in distractors:
                distractors.append(word)
        label = rng.randrange(choices)
        options = distractors[:label] + [parsed["lemmas"][0]] + distractors[label:]
        items.append({"id": doc_id, "pos": parsed["pos"], "definition": parsed["definition"],
                      "choices": options, "label": label})
    return items


# --------------------------------------------------------------------------- GSM-lite arithmetic
_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elif", "Femi", "Grace", "Hugo", "Iris", "Jonas", "Kai", "Lena")
_THINGS = ("apple", "marble", "book", "stamp", "shell", "pencil", "card", "coin", "sticker", "egg")


def _problem(rng: random.Random) -> tuple[str, int, str]:
    """One word problem: (question, integer answer, kind)."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    kind = rng.choice(("add", "sub", "mul", "div", "two_step"))
    if kind == "add":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return f"{name} has {a} {thing}s and finds {b} more. How many {thing}s does {name} have now?", a + b, kind
    if kind == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing}s and gives away {b}. How many {thing}s does {name} have left?", a - b, kind
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{name} buys {a} boxes with {b} {thing}s in each box. How many {thing}s is that?", a * b, kind
    if kind == "div":
        b, each = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {b * each} {thing}s equally among {b} friends. How many {thing}s does each "
                f"friend get?", each, kind)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}s, buys {b} more, then gives {c} to a friend. How many {thing}s does "
            f"{name} have now?", a + b - c, kind)


def arithmetic_items(count: int, seed: int, split: str = "test") -> list[dict]:
    """``count`` GSM-lite problems (addition, subtraction, multiplication, exact division and a
    two-step add-then-subtract), numbers up to 100, every answer a non-negative integer computed
    when the question is made; the test and train (few-shot) splits come from different seeds."""
    rng = _rng("arith", seed, split)
    items = []
    for index in range(count):
        question, answer, kind = _problem(rng)
        items.append({"id": f"{split}-{index}", "question": question, "answer": str(answer), "kind": kind})
    return items


# ------------------------------------------------------------------------------------ preparation
def task_template(name: str) -> dict:
    """The packaged YAML of task ``name`` as a dict (``dataset_kwargs.data_files`` relative)."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown mmafm task {name!r}; the tasks are {list(TASK_NAMES)}")
    return yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())


def default_cache_dir() -> Path:
    """Where :func:`prepare_tasks` writes unless told: ``$MMAFM_CACHE_DIR/eval_tasks`` when that is
    set (a shared or scratch disk), else ``$XDG_CACHE_HOME/mmafm/eval_tasks``, else
    ``~/.cache/mmafm/eval_tasks``. The files are derived data, safe to delete."""
    if os.environ.get("MMAFM_CACHE_DIR"):
        return Path(os.environ["MMAFM_CACHE_DIR"]) / "eval_tasks"
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "mmafm" / "eval_tasks"


def _write_jsonl(path: Path, items: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def _core_builders(size: int, seed: int, val_fraction: float) -> dict[str, Callable[[str], list[dict]]]:
    def sized(split: str) -> int:
        return size if split == "test" else FEWSHOT_POOL

    return {
        "mmafm_cloze": lambda split: cloze_items(sized(split), seed, val_fraction, split),
        "mmafm_wordnet": lambda split: wordnet_items(sized(split), seed, val_fraction, split),
        "mmafm_arith": lambda split: arithmetic_items(sized(split), seed, split),
    }


def _long_context_builders(size: int, seed: int, lengths: Sequence[int], tokenizer) -> dict:
    from mmafm.eval import long_context

    return {name: (lambda split, kind=name.removeprefix("mmafm_"): long_context.lm_eval_items(
        kind, tokenizer, lengths, size, seed)) for name in LONG_CONTEXT_TASKS}


def check_task_names(tasks: Sequence[str]) -> list[str]:
    """``tasks`` without repeats, or ValueError naming the unknown ones and the known ones."""
    unknown = [name for name in tasks if name not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown mmafm task(s) {unknown}; the tasks are {list(TASK_NAMES)}")
    if not tasks:
        raise ValueError(f"no task given; the tasks are {list(TASK_NAMES)}")
    return list(dict.fromkeys(tasks))


def prepare_tasks(
    tasks: Sequence[str] = CORE_TASKS,
    cache_dir: str | Path | None = None,
    size: int = 200,
    seed: int = 0,
    val_fraction: float = 0.05,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    tokenizer=None,
) -> Path:
    """Generate the data of ``tasks`` and their YAMLs; returns the folder to give lm-eval.

    Args:
        tasks: names from :data:`TASK_NAMES`.
        cache_dir: where ``<key>/data/<task>/{test,train}.jsonl`` and ``<key>/tasks/<task>.yaml``
            go; ``key`` hashes every argument, so different sizes never mix and a second call
            with the same arguments reuses the files. Default :func:`default_cache_dir`.
        size: test items per task (at most what the held-out split holds; long-context tasks:
            items per length).
        seed: which items and distractors are drawn.
        val_fraction: the data stage's ``val_fraction`` (its held-out split).
        lengths: context lengths in tokens of the long-context tasks.
        tokenizer: the model's :class:`~mmafm.tokenizer.Tokenizer`, needed by the long-context
            tasks only (their haystacks are measured in its tokens).

    Returns:
        The ``tasks`` folder (an lm-eval ``include_path``) holding one YAML per task.

    Raises:
        ValueError: an unknown task name (listing the known ones), or a long-context task
            without a tokenizer.
    """
    names = check_task_names(tasks)
    if size < 1:
        raise ValueError(f"size must be >= 1 test items per task, got {size}")
    long_names = [n for n in names if n in LONG_CONTEXT_TASKS]
    if long_names and tokenizer is None:
        raise ValueError(f"tasks {long_names} measure their contexts in tokens: pass the model's tokenizer")
    tokenizer_key = hashlib.sha1(tokenizer.to_bytes()).hexdigest()[:12] if long_names else ""
    key_text = json.dumps([DATA_VERSION, sorted(names), size, seed, val_fraction, list(lengths), tokenizer_key])
    root = Path(cache_dir or default_cache_dir()) / hashlib.sha1(key_text.encode()).hexdigest()[:16]
    tasks_dir, data_dir = root / "tasks", root / "data"
    if (root / "meta.json").is_file():
        return tasks_dir
    builders = _core_builders(size, seed, val_fraction)
    if long_names:
        builders |= _long_context_builders(size, seed, lengths, tokenizer)
    counts = {}
    for name in names:
        counts[name] = {}
        config = task_template(name)
        kwargs = config.setdefault("dataset_kwargs", {})
        for split, relative in kwargs["data_files"].items():  # the splits the YAML reads
            items = builders[name](split)
            if not items:
                raise ValueError(f"task {name}: no {split} item could be made (size={size}, seed={seed})")
            _write_jsonl(data_dir / relative, items)
            counts[name][split] = len(items)
        kwargs["data_files"] = {split: str(data_dir / rel) for split, rel in kwargs["data_files"].items()}
        kwargs["cache_dir"] = str(root / "hf_datasets")  # the json builder's Arrow cache, kept beside the data
        atomic_write_text(tasks_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_json(root / "meta.json", {"tasks": names, "size": size, "seed": seed, "val_fraction": val_fraction,
                                           "lengths": list(lengths), "counts": counts})
    return tasks_dir


def iter_task_files(tasks_dir: str | Path) -> Iterator[Path]:
    """The task YAMLs :func:`prepare_tasks` wrote into ``tasks_dir``."""
    yield from sorted(Path(tasks_dir).glob("*.yaml"))


# ------------------------------------------------------------------------------------ data cards
CARDS = {"mmafm_cloze": "eval_cloze", "mmafm_wordnet": "eval_wordnet", "mmafm_arith": "eval_arith",
         "long_context": "eval_long_context"}


def card_counts(size: int = 200, seed: int = 0, val_fraction: float = 0.05) -> dict[str, dict[str, int]]:
    """Per core task: documents in the held-out split, items they make (``kept``), the default
    test size and few-shot pool, as the data cards print them."""
    held_out_wiki = [(d, t) for d, t in _documents("wikipedia") if _held_out("wikipedia", d, val_fraction)]
    cloze_kept = sum(cloze_item(*text.partition("\n")[::2]) is not None for _, text in held_out_wiki)
    held_out_wordnet = sum(_held_out("wordnet", d, val_fraction) for d, _ in _documents("wordnet"))
    wordnet_kept = len(wordnet_items(10**9, seed, val_fraction))
    return {
        "mmafm_cloze": {"source documents (val split)": len(held_out_wiki), "kept": cloze_kept,
                        "test items (default size)": min(size, cloze_kept), "few-shot pool (train split)": FEWSHOT_POOL},
        "mmafm_wordnet": {"source documents (val split)": held_out_wordnet, "kept": wordnet_kept,
                          "test items (default size)": min(size, wordnet_kept), "few-shot pool (train split)": FEWSHOT_POOL},
        "mmafm_arith": {"kept": size, "test items (default size)": size, "few-shot pool (train split)": FEWSHOT_POOL},
        "long_context": {"haystack documents (val split)": len(held_out_wiki),
                         "kept": size * len(DEFAULT_LENGTHS) * len(LONG_CONTEXT_TASKS),
                         "items per task and length (default size)": size,
                         "lengths (default)": len(DEFAULT_LENGTHS), "tasks": len(LONG_CONTEXT_TASKS)},
    }


def write_card_counts(cards_dir: str | Path, size: int = 200, seed: int = 0, val_fraction: float = 0.05) -> list[Path]:
    """Replace the counts block of ``data_cards/eval_*.md`` with :func:`card_counts`."""
    from mmafm.data.cards import write_counts

    written = []
    for task, counts in card_counts(size, seed, val_fraction).items():
        note = (f"Written by code (`python -m mmafm.eval.tasks {cards_dir}`) with size={size}, seed={seed}, "
                f"val_fraction={val_fraction}.")
        written.append(write_counts(Path(cards_dir) / f"{CARDS[task]}.md", counts, note))
    return written

