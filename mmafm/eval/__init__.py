"""Evaluation as a library: pure functions the stages call, each checked by tests against an
independent reference (tests/test_eval.py).

- :mod:`mmafm.eval.clip`: zero-shot classification from prompt templates and image<->text
  retrieval recall@k with exact chance levels (contrastive models, stage ``01_clip_pretrain``);
- :mod:`mmafm.eval.captions`: caption log-likelihoods and perplexity, "pick the right caption",
  greedy caption generation (vision-language models, stage ``03_vl_alignment``);
- :mod:`mmafm.eval.perplexity`: held-out next-token perplexity (text models, stage
  ``02_text_pretrain``);
- :mod:`mmafm.eval.harness`: mmafm as the lm-evaluation-harness model ``mmafm``
  (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``), ``evaluate_tasks``, the
  task scores every text stage puts in its summary;
- :mod:`mmafm.eval.tasks`: lm-eval task YAMLs over bundled and generated data (Wikipedia cloze,
  WordNet gloss -> word, GSM-lite arithmetic, long-context retrieval), nothing downloads;
- :mod:`mmafm.eval.long_context`: RULER-like accuracy against context length, its table and
  figure (``docs/evaluation.md``).

The last three are imported by name, not re-exported here: the harness imports lm-eval, which a
stage that only needs perplexity should not pay for.

    from mmafm.eval import held_out_perplexity, retrieval_metrics, zero_shot_classification
"""

# each submodule's __all__ is the public API; the package re-exports all of them
from mmafm.eval import captions as _captions, clip as _clip, perplexity as _perplexity
from mmafm.eval.captions import *  # noqa: F401,F403
from mmafm.eval.clip import *  # noqa: F401,F403
from mmafm.eval.perplexity import *  # noqa: F401,F403

__all__ = [*_clip.__all__, *_captions.__all__, *_perplexity.__all__]
