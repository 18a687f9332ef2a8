"""Generation: cached greedy decoding against a no-cache argmax loop, batching with left padding
against one prompt at a time, stop tokens, sampling filters, and clear errors."""

from __future__ import annotations

import pytest
import torch

import mmafm
from mmafm.inference import generate, left_pad, sample_next_token

TINY_PRESETS = sorted(
    n for n in mmafm.list_models(family="text") + mmafm.list_models(family="ptmoe") if n.endswith("_tiny")
)


def _model(name: str, **overrides):
    torch.manual_seed(0)
    # a large init makes a random model's greedy continuations varied instead of repetitive
    return mmafm.create_model(name, init_std=0.3, **overrides).eval()


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Recompute the whole sequence without a cache at every step and take the argmax."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_greedy_generation_matches_a_no_cache_argmax_loop(name):
    model = _model(name)
    prompt = torch.randint(0, 2048, (9,)).tolist()
    steps = 24 if "server" in name else 10  # the server's windows (16) wrap
    got = generate(model, [prompt], steps)[0]
    assert got == reference_greedy(model, prompt, steps)
    assert len(set(got)) > 3  # a varied continuation, so the comparison means something


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(name):
    model = _model(name)
    prompts = [torch.randint(0, 2048, (n,)).tolist() for n in (3, 11, 7)]
    batched = generate(model, prompts, 8)
    alone = [generate(model, [p], 8)[0] for p in prompts]
    assert batched == alone
    ids, mask = left_pad(prompts, pad_token_id=5)
    assert mask.sum(1).tolist() == [3, 11, 7] and ids[0, :8].tolist() == [5] * 8


def test_stop_tokens_end_a_row_without_being_returned():
    model = _model("afm_2024_device_tiny")
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    free = generate(model, prompts, 12)
    stop = free[0][4]
    stopped = generate(model, prompts, 12, stop_tokens=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]
    want_row1 = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == want_row1
    assert generate(model, prompts, 12, stop_tokens=stop) == stopped  # a single int works too


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits[:3]).tolist() == [0, 0, 0]
    assert (sample_next_token(logits, temperature=1.0, top_k=1, generator=generator) == 0).all()
    assert (sample_next_token(logits, temperature=1.0, top_p=1e-3, generator=generator) == 0).all()
    top2 = sample_next_token(logits, temperature=1.0, top_k=2, generator=generator)
    assert set(top2.tolist()) == {0, 1}
    # top-p keeps the smallest prefix reaching p: probs ~ [0.61, 0.22, 0.14, ...]
    nucleus = sample_next_token(logits, temperature=1.0, top_p=0.7, generator=generator)
    assert set(nucleus.tolist()) == {0, 1}
    # plain temperature sampling follows softmax(logits / T)
    samples = sample_next_token(logits, temperature=2.0, generator=generator)
    frequency = torch.bincount(samples, minlength=5).float() / len(samples)
    assert torch.allclose(frequency, torch.softmax(logits[0] / 2.0, -1), atol=0.03)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, temperature=-1.0)


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    model = _model("afm_2025_device_tiny")
    prompts = [[1, 2, 3], [4, 5]]
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95)
    first = generate(model, prompts, 10, seed=1, **kwargs)
    assert first == generate(model, prompts, 10, seed=1, **kwargs)
    assert first != generate(model, prompts, 10, seed=2, **kwargs)


def test_int8_and_bf16_caches_generate():
    model = _model("afm_2025_server_tiny")
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    exact = generate(model, prompt, 20)
    int8 = generate(model, prompt, 20, quantized_cache=True)
    assert len(int8[0]) == 20 and sum(a == b for a, b in zip(exact[0], int8[0])) >= 5
    assert len(generate(model, prompt, 5, cache_dtype="bfloat16")[0]) == 5


def test_generation_restores_training_mode():
    model = _model("afm_2024_device_tiny")
    model.train()
    generate(model, [[1, 2]], 2)
    assert model.training


def test_bad_prompts_get_clear_errors():
    model = _model("afm_2024_device_tiny", max_seq_len=32)
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate(model, [list(range(40))], 1)
    with pytest.raises(ValueError, match="lower max_new_tokens to <= 2"):
        generate(model, [list(range(30))], 5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 2048\)"):
        generate(model, [[1, 5000]], 3)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], 3)
    assert generate(model, [[1, 2]], 0) == [[]]
