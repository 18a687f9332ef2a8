"""Post-training: instruction data with checkers, the preference oracle, the reward model and RLHF.

- :mod:`.tasks`: instruction task families generated from the bundled sources, each with a
  programmatic checker (define a word, answer from a Wikipedia summary, arithmetic, list / JSON
  formatting, typed tool calls);
- :mod:`.oracle`: the four single-sided grades, the four preference levels, a noise knob;
- :mod:`.reward`: the 2024 report's reward model (linear reward head + four 3-class grade heads)
  and its losses (:func:`soft_label_loss`, ``soft | margin | hard``), ECE;
- :mod:`.rl`: :func:`loo_advantages`, MDLOO and its ablations (``mdloo | ppo_clip |
  reinforce_loo``), rollouts through the inference wing, prompt selection by reward variance;
- :mod:`.itec`: iTeC, the committee's samples picked by the reward model.

Stages: ``07_sft``, ``08_reward_model``, ``09_rlhf`` (:mod:`mmafm.stages.sft`, ``reward_model``,
``rlhf``); guide: ``docs/post_training.md``.
"""

from mmafm.posttrain.oracle import compare, grade, oracle_score, preference_level, preference_pairs
from mmafm.posttrain.reward import (
    RewardModel,
    expected_calibration_error,
    load_reward_model,
    margin_loss,
    preference_loss,
    save_reward_model,
    soft_label_loss,
)
from mmafm.posttrain.rl import ALGORITHMS, loo_advantages, policy_loss, select_by_reward_variance
from mmafm.posttrain.tasks import FAMILIES, check, eval_turns, family_conversations

__all__ = [
    "FAMILIES", "family_conversations", "eval_turns", "check",
    "grade", "oracle_score", "preference_level", "compare", "preference_pairs",
    "soft_label_loss", "margin_loss", "preference_loss", "RewardModel", "save_reward_model", "load_reward_model",
    "expected_calibration_error",
    "ALGORITHMS", "loo_advantages", "policy_loss", "select_by_reward_variance",
]
