"""Evaluation as a library: pure functions the stages call, each checked by tests against an
independent reference (tests/test_eval.py).

- :mod:`mmafm.eval.clip`: zero-shot classification from prompt templates and image<->text
  retrieval recall@k with exact chance levels (contrastive models, stage ``01_clip_pretrain``);
- :mod:`mmafm.eval.captions`: caption log-likelihoods and perplexity, "pick the right caption",
  greedy caption generation (vision-language models, stage ``03_vl_alignment``);
- :mod:`mmafm.eval.perplexity`: held-out next-token perplexity (text models, stage
  ``02_text_pretrain``).

    from mmafm.eval import held_out_perplexity, retrieval_metrics, zero_shot_classification
"""

from mmafm.eval.captions import (
    caption_candidates,
    caption_ids,
    caption_log_likelihoods,
    caption_perplexity,
    collate_captions,
    evaluate_captions,
    generate_captions,
)
from mmafm.eval.clip import (
    FASHION_MNIST_PROMPT_NAMES,
    FASHION_MNIST_TEMPLATES,
    ZeroShotResult,
    chance_recall,
    class_embeddings,
    embed_images,
    embed_texts,
    evaluate_clip,
    fashion_mnist_tensor,
    retrieval_metrics,
    zero_shot_classification,
)
from mmafm.eval.perplexity import MAX_LOG_PERPLEXITY, held_out_perplexity, perplexity, token_nll

__all__ = [
    # contrastive (CLIP)
    "FASHION_MNIST_TEMPLATES",
    "FASHION_MNIST_PROMPT_NAMES",
    "ZeroShotResult",
    "class_embeddings",
    "zero_shot_classification",
    "embed_images",
    "embed_texts",
    "retrieval_metrics",
    "chance_recall",
    "fashion_mnist_tensor",
    "evaluate_clip",
    # captioning (vision-language)
    "caption_ids",
    "collate_captions",
    "caption_log_likelihoods",
    "caption_perplexity",
    "caption_candidates",
    "evaluate_captions",
    "generate_captions",
    # next-token (text)
    "MAX_LOG_PERPLEXITY",
    "perplexity",
    "token_nll",
    "held_out_perplexity",
]
