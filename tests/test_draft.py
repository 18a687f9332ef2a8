"""Drafts for speculative decoding (mmafm.train.draft): the fitted exit is the least-squares
solution numpy finds independently and decodes in the native kernels; fresh drafts keep the
target's embedding and head; distillation lowers the KL to the target; the tokens-per-round
formula against its sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmafm
from mmafm.inference.speculative import expected_tokens_per_round, speculative_generate
from mmafm.train.draft import distill_draft, fit_exit_draft, make_draft, text_windows


def _target():
    torch.manual_seed(0)
    return mmafm.create_model("afm_2024_device_tiny", vocab_size=200, dim=48, n_layers=3, n_heads=3, n_kv_heads=1,
                              head_dim=16, ffn_dim=64, init_std=0.2).eval()


def test_fitted_exit_is_the_least_squares_map():
    target = _target()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 200, (2, 40), generator=generator),) for _ in range(3)]
    held_out = [(torch.randint(0, 200, (2, 40), generator=generator),)]
    drafts, agreement = fit_exit_draft(target, [1, 2], batches, held_out, ridge=0.0)
    draft = drafts[1]
    assert draft.config.n_layers == 1 and not draft.config.tie_embeddings
    # reference: numpy lstsq from the residual stream after layer 1 to the final normed hidden state
    captured = []
    hook = target.layers[0].register_forward_hook(lambda m, i, o: captured.append(o[0]))
    with torch.no_grad():
        finals = [target(ids, return_hidden=True).flatten(0, 1) for ids, in batches]
    hook.remove()
    h = torch.cat([c.flatten(0, 1) for c in captured]).double().numpy()
    u = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + target.norm.eps)
    w = np.linalg.lstsq(u, torch.cat(finals).double().numpy(), rcond=None)[0]  # (dim, dim)
    ids = held_out[0][0]
    with torch.no_grad():
        got = draft(ids).double()
        hidden = []
        hook = target.layers[0].register_forward_hook(lambda m, i, o: hidden.append(o[0]))
        target(ids)
        hook.remove()
    x = hidden[0].double().numpy()
    x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + target.norm.eps)
    want = x @ w @ target.output_weight().detach().double().numpy().T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-3)
    assert set(agreement) == {"fitted", "truncated"} and 0.0 <= agreement["fitted"][1] <= 1.0
    # it is a plain model: speculative decoding with it (native kernels) equals plain greedy
    from mmafm.inference import build_plan, generate

    cache = draft.new_cache(1, 8)
    with torch.no_grad():
        draft(torch.tensor([[1, 2]]), cache=cache)
        assert build_plan(draft, cache).whole_step  # the untied head too
    prompt = [3, 4, 5]
    assert speculative_generate(target, draft, prompt, 12, k=3).tokens == generate(target, [prompt], 12)[0]


def test_fresh_draft_keeps_embedding_and_head_and_distillation_lowers_the_kl():
    target = _target()
    draft = make_draft(target, 1, "fresh", seed=1)
    assert torch.equal(draft.embed.weight, target.embed.weight) and torch.equal(draft.norm.weight, target.norm.weight)
    assert not torch.equal(draft.layers[0].attn.q_proj.weight, target.layers[0].attn.q_proj.weight)
    with pytest.raises(ValueError, match="draft init"):
        make_draft(target, 1, "random")
    stream = torch.randint(0, 200, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    records = distill_draft(draft, target, text_windows(stream, 24, 4), 30, lr=3e-3, log_every=5)
    kl = [r["distill"] for r in records if "distill" in r]
    assert kl[-1] < 0.8 * kl[0]
    assert torch.equal(target.embed.weight, _target().embed.weight)


def test_expected_tokens_per_round_is_the_sum_of_acceptance_powers():
    for a, k in ((0.0, 3), (0.5, 4), (0.9, 2), (1.0, 5)):
        assert expected_tokens_per_round(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)))
    with pytest.raises(ValueError):
        expected_tokens_per_round(1.5, 2)


def test_greedy_continuations_are_plain_greedy_rows_and_batches_draw_whole_rows():
    """Each continued row is its prompt followed by the target's greedy decoding of that prompt
    alone (batched in parts smaller than the prompt count); batches are rows of the sequences,
    inputs and targets shifted by one."""
    from mmafm.inference.generate import generate
    from mmafm.train.draft import greedy_continuations, sequence_batches

    target = _target()
    prompts = torch.randint(0, 200, (5, 4), generator=torch.Generator().manual_seed(2))  # (N, P)
    sequences = greedy_continuations(target, prompts, 6, batch_size=2)  # (5, 10)
    assert sequences.shape == (5, 10)
    for row, prompt in enumerate(prompts.tolist()):
        assert sequences[row].tolist() == prompt + generate(target, [prompt], 6)[0]
    ids, targets = next(iter(sequence_batches(sequences, 8, seed=0)))  # (8, 9) each
    assert ids.shape == targets.shape == (8, 9)
    rows = {tuple(row) for row in sequences.tolist()}
    for x, y in zip(ids.tolist(), targets.tolist()):
        assert tuple(x + y[-1:]) in rows and x[1:] == y[:-1]
    with pytest.raises(ValueError, match="new_tokens"):
        greedy_continuations(target, prompts, 0)
