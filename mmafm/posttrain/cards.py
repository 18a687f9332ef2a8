"""Counts of the generated post-training data for its data cards, written by code.

    .venv/bin/python -m mmafm.posttrain.cards data_cards

replaces the counts block of ``data_cards/instructions.md`` and ``data_cards/preferences.md``
with the numbers the stages' defaults produce (07_sft's conversations per family, 08_reward_model's
oracle-labelled pairs per preference level).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from mmafm.posttrain import oracle, tasks

__all__ = ["instruction_counts", "preference_counts", "write_card_counts"]

def instruction_counts(train_examples: int, eval_examples: int, seed: int) -> dict[str, int]:
    """Distinct conversations per family at 07_sft's sizes (train + held out), and the source
    items the two sourced families draw from."""
    counts: dict[str, int] = {}
    for name in tasks.FAMILIES:
        conversations = tasks.family_conversations(name, train_examples + eval_examples, seed)
        counts[f"{name}: conversations"] = len({repr(turns) for turns in conversations})
    counts["kept"] = sum(counts.values())
    counts["define_word: WordNet entries usable"] = len(tasks._wordnet_entries())
    counts["wiki_cloze: summaries with a blankable number"] = len(tasks._cloze_items(400))
    return counts


def preference_counts(prompts_per_family: int, eval_prompts_per_family: int, pairs_per_prompt: int, noise: float,
                      seed: int) -> dict[str, int]:
    """08_reward_model's oracle-labelled training pairs (its prompt split and seeds), per
    preference level, at ``noise`` and, for comparison, without noise."""
    conversations = {name: tasks.family_conversations(name, eval_prompts_per_family + prompts_per_family, seed + 1)
                     for name in tasks.FAMILIES}
    train = {name: items[eval_prompts_per_family:] for name, items in conversations.items()}
    counts: dict[str, int] = {}
    for label, level_noise in ((f"noise {noise}", noise), ("noise 0", 0.0)):
        pairs = oracle.preference_pairs(train, pairs_per_prompt, level_noise, seed)
        levels = Counter(pair.level for pair in pairs)
        if level_noise == noise:
            counts["kept"] = len(pairs)
        counts[f"{label}: pairs"] = len(pairs)
        counts |= {f"{label}: level {name}": levels.get(level, 0) for level, name in enumerate(oracle.LEVELS)}
        counts[f"{label}: flipped by the noise (gap < 0)"] = sum(pair.gap < 0 for pair in pairs)
    return counts


def write_card_counts(cards_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write both cards' counts blocks at the stages' default sizes."""
    from mmafm.data.cards import write_counts
    from mmafm.stages.reward_model import RewardModelStageConfig
    from mmafm.stages.sft import SftStageConfig

    sft, reward = SftStageConfig(), RewardModelStageConfig()
    command = f"`python -m mmafm.posttrain.cards {cards_dir}`"
    cards_dir = Path(cards_dir)
    return [
        write_counts(cards_dir / "instructions.md", instruction_counts(sft.train_examples, sft.eval_examples, seed),
                     f"Written by code ({command}) at 07_sft's defaults: train_examples={sft.train_examples}, "
                     f"eval_examples={sft.eval_examples}, seed={seed}."),
        write_counts(cards_dir / "preferences.md",
                     preference_counts(reward.prompts_per_family, reward.eval_prompts_per_family, reward.pairs_per_prompt,
                                       reward.noise, seed),
                     f"Written by code ({command}) at 08_reward_model's training defaults: prompts_per_family="
                     f"{reward.prompts_per_family}, eval_prompts_per_family={reward.eval_prompts_per_family}, pairs_per_prompt={reward.pairs_per_prompt}, "
                     f"noise={reward.noise}, seed={seed}."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cards_dir", nargs="?", default="data_cards")
    for card in write_card_counts(parser.parse_args(argv).cards_dir):
        print(f"updated {card}")


if __name__ == "__main__":
    main()
