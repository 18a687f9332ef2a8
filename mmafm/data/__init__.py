"""Data for every mmafm stage: image-caption pairs, text documents, shards, held-out sets.

The data stage (``mmafm/stages/data.py``, notebook ``00_data``) builds:

- image-text pairs from :mod:`mmafm.data.synthetic` (built in, no install) and the Debian-packaged
  sources of :mod:`mmafm.data.sources` (emoji, OpenClipArt, Tux Paint stamps), written as
  WebDataset tar shards by :mod:`mmafm.data.shards`;
- text documents from :mod:`mmafm.data.text_sources` (Wikipedia summaries, WordNet glosses,
  fortunes, the Jargon File), tokenized by :mod:`mmafm.tokenizer` into token shards;
- Fashion-MNIST (:mod:`mmafm.data.fashion_mnist`), held out for zero-shot classification.

Every source is described in ``data_cards/<source>.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

__all__ = [
    "Pair",
    "SourceStats",
    "DataPackageMissing",
    "EmptySourceError",
    "require_path",
    "generated_key",
    "generated_pairs",
]


class DataPackageMissing(FileNotFoundError):
    """A Debian/PyPI package that a real data source reads is not installed."""


class EmptySourceError(RuntimeError):
    """A data source produced no usable item (all files missing, corrupt or filtered out)."""


@dataclass
class Pair:
    """One image-caption pair before it is written to a shard."""

    key: str  # unique, WebDataset-safe (no dots): "<source>-<hash>"
    image: Image.Image  # RGB
    caption: str
    source: str
    license: str
    id: str  # the item's id inside its source (a file path relative to the package, a codepoint)


def generated_key(source: str, seed: int, index: int) -> tuple[str, str]:
    """``(key, item id)`` of item ``index`` of a generated source drawn with ``seed``."""
    item_id = f"{seed}-{index}"
    return f"{source}-{hashlib.sha1(item_id.encode()).hexdigest()[:16]}", item_id


def generated_pairs(
    sample: Callable[[int, int, int], Pair], what: str, n: int, seed: int, image_size: int
) -> Iterator[Pair]:
    """``sample(index, seed, image_size)`` for ``index < n``: a generated set, deterministic by
    ``seed``, each item independent of how many are drawn. Bad sizes fail here, naming ``what``."""
    if n < 0:
        raise ValueError(f"number of {what} pairs must be >= 0, got {n}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    return (sample(index, seed, image_size) for index in range(n))


@dataclass
class SourceStats:
    """What one source produced and what it dropped (written to ``data_card_stats.json``)."""

    source: str
    package: str
    license: str
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (filters, no glyph)
    corrupt: int = 0  # unreadable / undecodable files

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "package": self.package,
            "license": self.license,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "corrupt": self.corrupt,
        }


def require_path(path: str | Path, package: str, kind: str = "Debian") -> Path:
    """Return ``path`` if it exists, else raise :class:`DataPackageMissing` naming the fix.

    Args:
        path: a file or folder the package installs.
        package: the package that installs it.
        kind: "Debian" (installed by ``make data``) or "PyPI" (installed by ``make venv``).
    """
    path = Path(path)
    if not path.exists():
        fix = (
            "run `make data` (apt-get installs the data packages, see scripts/install_data_packages.sh)"
            if kind == "Debian"
            else "run `make venv` (it pip-installs requirements.txt)"
        )
        raise DataPackageMissing(f"{path} not found: the {kind} package {package!r} is not installed; {fix}")
    return path
