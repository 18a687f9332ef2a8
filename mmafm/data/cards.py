"""Write the counts of a data-stage run into the data cards (``data_cards/<source>.md``).

Counts on a card are never typed by hand: the data stage writes ``data_card_stats.json`` and

    .venv/bin/python -m mmafm.data.cards runs/<run-id>/00_data/data_card_stats.json data_cards

replaces the block between ``<!-- counts:begin -->`` and ``<!-- counts:end -->`` of each card
with that run's numbers (the cards in the repo hold those of ``configs/stages/00_data_real.yaml``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mmafm.io import atomic_write_text

__all__ = ["counts_block", "update_cards", "write_counts", "main"]

BEGIN, END = "<!-- counts:begin -->", "<!-- counts:end -->"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)


def counts_block(entry: dict, config: dict | None) -> str:
    """Markdown for one source's stats entry (image, text or Fashion-MNIST)."""
    lines = [BEGIN, "", "| count | value |", "| --- | ---: |"]
    if "test" in entry and "classes" in entry:  # Fashion-MNIST
        lines += [f"| train images | {entry['train']:,} |", f"| test images | {entry['test']:,} |"]
        lines.append(f"| test images per class | {', '.join(map(str, entry['test_per_class']))} |")
    else:
        lines += [f"| kept | {entry['kept']:,} |", f"| train split | {entry.get('train', 0):,} |",
                  f"| val split | {entry.get('val', 0):,} |", f"| corrupt (skipped) | {entry['corrupt']:,} |"]
        for reason, count in entry.get("skipped", {}).items():
            lines.append(f"| skipped: {reason} | {count:,} |")
    if config:
        keys = ("seed", "real_cap", "text_cap", "synthetic_pairs", "image_size", "val_fraction")
        settings = ", ".join(f"{key}={config[key]}" for key in keys if key in config)
        lines += ["", f"Written by code from a data-stage run with {settings}."]
    lines += ["", END]
    return "\n".join(lines)


def write_counts(card: str | Path, counts: dict[str, int], note: str) -> Path:
    """Replace ``card``'s counts block with a ``| count | value |`` table and a line saying which
    code wrote it (for generated data sets, whose counts come from code rather than a data-stage
    run).

    Raises:
        ValueError: the card has no counts block.
    """
    card = Path(card)
    text = card.read_text()
    if not _BLOCK.search(text):
        raise ValueError(f"{card} has no counts block ({BEGIN} ... {END})")
    lines = [BEGIN, "", "| count | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value:,} |" for name, value in counts.items()]
    lines += ["", note, "", END]
    atomic_write_text(card, _BLOCK.sub(lambda _: "\n".join(lines), text))
    return card


def update_cards(stats: dict | str | Path, cards_dir: str | Path) -> list[Path]:
    """Replace the counts block of every card that has a source in ``stats``; returns them.

    Raises:
        FileNotFoundError: a source has no card.
        ValueError: a card has no counts block.
    """
    if not isinstance(stats, dict):
        path = Path(stats)
        stats = json.loads(path.read_text())
        manifest = path.with_name("manifest.json")
        if "config" not in stats and manifest.is_file():
            stats["config"] = json.loads(manifest.read_text()).get("config")
    cards_dir = Path(cards_dir)
    entries = dict(stats.get("image_sources", {})) | dict(stats.get("text_sources", {}))
    entries.pop("captions", None)  # derived from the image sources, described on their cards
    if stats.get("fashion_mnist"):
        entries["fashion_mnist"] = stats["fashion_mnist"]
    written = []
    for name, entry in entries.items():
        card = cards_dir / f"{name}.md"
        if not card.is_file():
            raise FileNotFoundError(f"no data card for source {name!r}: expected {card}")
        text = card.read_text()
        if not _BLOCK.search(text):
            raise ValueError(f"{card} has no counts block ({BEGIN} ... {END})")
        atomic_write_text(card, _BLOCK.sub(lambda _: counts_block(entry, stats.get("config")), text))
        written.append(card)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stats", help="data_card_stats.json of a data-stage run")
    parser.add_argument("cards_dir", nargs="?", default="data_cards")
    args = parser.parse_args(argv)
    for card in update_cards(args.stats, args.cards_dir):
        print(f"updated {card}")


if __name__ == "__main__":
    main()
