"""``python -m mmafm.eval.tasks [CARDS_DIR]``: write the counts of the generated evaluation sets
into ``data_cards/eval_*.md`` (counts on a card are never typed by hand)."""

import sys

from mmafm.eval.tasks import write_card_counts

for card in write_card_counts(sys.argv[1] if len(sys.argv) > 1 else "data_cards"):
    print(card)
