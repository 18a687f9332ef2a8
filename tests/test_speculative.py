"""Speculative decoding: greedy equals plain greedy (many prompts, three drafts), sampling follows the
target's distribution (the acceptance rule alone, and end to end on a tiny vocabulary), guided
speculative equals guided plain, and transformers' assisted generation agrees on the exported pair."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest
import torch

import mmafm
from mmafm.inference import generate
from mmafm.inference.guided import Guide
from mmafm.inference.speculative import accept_proposals, rollback_cache, speculative_generate


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    return mmafm.create_model("afm_2024_device_tiny", init_std=0.3, **overrides).eval()


@pytest.fixture(scope="module")
def pair():
    """A target, a smaller random draft, a near copy of the target (high acceptance), the target itself."""
    target = _model(0, vocab_size=512)
    small = _model(1, vocab_size=512, dim=64, n_layers=2)
    near = _model(0, vocab_size=512)
    with torch.no_grad():
        for param in near.parameters():
            param.add_(0.003 * torch.randn_like(param))
    return target, {"small": small, "near": near, "self": target}


@pytest.mark.parametrize("draft_name", ["small", "near", "self"])
def test_greedy_speculative_equals_plain_greedy(pair, draft_name):
    target, drafts = pair
    draft = drafts[draft_name]
    generator = torch.Generator().manual_seed(0)
    accepted = proposed = 0
    for index in range(8):
        prompt = torch.randint(0, 512, (int(torch.randint(1, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        steps = 20
        plain = generate(target, [prompt], steps)[0]
        result = speculative_generate(target, draft, prompt, steps, k=1 + index % 5)
        assert result.tokens == plain, (draft_name, index)
        accepted, proposed = accepted + result.accepted, proposed + result.proposed
    rate = accepted / proposed
    assert {"small": rate < 0.3, "near": 0.3 < rate < 1.0, "self": rate == 1.0}[draft_name], rate


def test_stop_tokens_and_limits(pair):
    target, drafts = pair
    prompt = [5, 6, 7]
    plain = generate(target, [prompt], 16)[0]
    stop = plain[6]
    got = speculative_generate(target, drafts["near"], prompt, 16, k=4, stop_tokens=[stop]).tokens
    assert got == plain[: plain.index(stop)]
    assert speculative_generate(target, drafts["near"], prompt, 3, k=4).tokens == plain[:3]
    assert speculative_generate(target, drafts["near"], prompt, 0).tokens == []


def test_acceptance_rule_gives_the_target_distribution():
    """First output token of a round, over many rounds with fixed p and q: distributed as p[0]."""
    generator = torch.Generator().manual_seed(0)
    target_logits = torch.randn(3, 5, generator=generator) * 2  # (m + 1, V)
    draft_probs = [torch.randn(5, generator=generator).mul(2).softmax(-1) for _ in range(2)]
    counts = torch.zeros(5)
    trials = 6000
    for _ in range(trials):
        proposals = [int(torch.multinomial(q, 1, generator=generator)) for q in draft_probs]
        accepted, correction = accept_proposals(target_logits, proposals, draft_probs, 1.0, None, None, generator)
        first = proposals[0] if accepted >= 1 else correction
        counts[first] += 1
    want = target_logits[0].softmax(-1)
    assert (counts / trials - want).abs().max() < 0.02
    assert (draft_probs[0] - want).abs().max() > 0.1  # the draft alone would be visibly wrong


@pytest.mark.slow  # ~15 s on an idle machine
def test_speculative_sampling_follows_the_target_end_to_end():
    """Joint distribution of two sampled tokens on a 4-token vocabulary against the target's exact
    one, p(a) p(b | a), computed by enumeration (400 runs: expected total variation ~0.06)."""
    target = _model(0, vocab_size=4, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    draft = _model(5, vocab_size=4, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    prompt = [1, 2]
    with torch.no_grad():
        first = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = torch.zeros(4, 4)
        draft_exact = torch.zeros(4, 4)
        for a in range(4):
            exact[a] = first[a] * target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
            draft_first = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
            draft_exact[a] = draft_first[a] * draft(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    runs = 400
    for _ in range(runs):
        a, b = speculative_generate(target, draft, prompt, 2, k=2, temperature=1.0, generator=generator).tokens
        counts[a, b] += 1
    total_variation = 0.5 * (counts / runs - exact).abs().sum()
    assert total_variation < 0.13, total_variation
    assert 0.5 * (draft_exact - exact).abs().sum() > 0.3  # the draft's own distribution is far off


def test_guided_speculative_equals_guided_plain(tmp_path):
    from mmafm.inference.guided import generable, json_schema, make_engine, stream_object
    from mmafm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([f"the {c} {s} has {n} sides" for c in ("red", "blue") for s in ("box", "disc")
                                 for n in range(3, 9)] * 5, tmp_path / "tok", vocab_size=350)

    @generable
    @dataclass
    class Box:
        colour: Literal["red", "blue", "green"]
        sides: Annotated[int, Guide(minimum=3, maximum=40)]
        label: Annotated[str, Guide(pattern=r"[a-z]{2,8}")]
        tags: Annotated[list[Literal["x", "y"]], Guide(min_items=1, max_items=3)]

    target = _model(0, vocab_size=tokenizer.vocab_size)
    near = _model(0, vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        for param in near.parameters():
            param.add_(0.05 * torch.randn_like(param))
    engine = make_engine(tokenizer)
    for seed, k in itertools.product(range(4), (2, 5)):
        prompt = [tokenizer.bos_id, 10 + seed]
        plain = list(stream_object(target, tokenizer, Box, prompt, max_new_tokens=120))[-1]
        matcher = engine.matcher(json_schema(Box))
        result = speculative_generate(target, near, prompt, 120, k=k, matcher=matcher,
                                      table_size=engine.table.vocab_size, stop_tokens=engine.table.eos_ids)
        assert result.tokens == list(plain.token_ids)
        assert matcher.is_accepting()  # the real matcher saw exactly the accepted tokens
        assert result.proposed > result.accepted > 0
    # a self-draft sharing the target's K/V (share_kv) under the grammar: the batched loop's copy
    from mmafm.inference.speculative import self_draft

    draft = self_draft(target, 8)
    for seed, k in itertools.product(range(2), (2, 4)):
        prompt = [tokenizer.bos_id, 20 + seed]
        plain = list(stream_object(target, tokenizer, Box, prompt, max_new_tokens=120))[-1]
        matcher = engine.matcher(json_schema(Box))
        result = speculative_generate(target, draft, prompt, 120, k=k, matcher=matcher, share_kv=True,
                                      table_size=engine.table.vocab_size, stop_tokens=engine.table.eos_ids)
        assert result.tokens == list(plain.token_ids) and matcher.is_accepting()
        assert result.accepted > 0.5 * result.proposed


def test_rollback_refuses_ring_caches_and_restores_positions():
    model = mmafm.create_model("afm_2024_device_tiny")
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
    rollback_cache(cache, 3)
    assert cache.length == 3 and cache.next_position.tolist() == [3] and cache.valid[0, :5].tolist() == [True] * 3 + [False] * 2
    with pytest.raises(ValueError, match="cannot roll back a cache of 3 columns to 4"):
        rollback_cache(cache, 4)
    server = mmafm.create_model("afm_2024_device_tiny", local_global_pattern=(1, 1), sliding_window=4)
    with pytest.raises(ValueError, match="sliding-window"):
        speculative_generate(server, server, [1, 2], 4)


@pytest.mark.slow  # ~15 s on an idle machine
def test_transformers_assisted_generation_agrees(pair):
    """Our speculative greedy on the pair = transformers' assisted generation on the same pair
    exported to transformers (mmafm.interop.hf)."""
    from mmafm.interop.hf import to_hf

    target, drafts = pair
    hf_target, hf_draft = to_hf(target), to_hf(drafts["near"])
    for model in (hf_target, hf_draft):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    hf_draft.generation_config.num_assistant_tokens = 4
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    for prompt in ([3, 9, 27], [100, 200, 300, 400, 5], [7]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            assisted = hf_target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=hf_draft,
                                          do_sample=False, max_new_tokens=16, min_new_tokens=16)[0, len(prompt):]
        ours = speculative_generate(target, drafts["near"], prompt, 16, k=4).tokens
        assert ours == assisted.tolist()


def test_verify_chunk_is_bit_identical_to_steps():
    """DecodePlan.chunk (the target's verification forward: T tokens per row in one native call)
    gives, row by row, exactly the logits of feeding the tokens one decode step at a time, also
    with left padding and a width that is not a multiple of the kernels' 16 lanes."""
    from mmafm.inference import build_plan, prefill

    model = _model(3, vocab_size=300, dim=72, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=18, ffn_dim=100)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    ids, mask = generate_left_pad(prompts)
    new = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])  # (B, T)
    with torch.no_grad():
        stepped, chunked = model.new_cache(2, 16), model.new_cache(2, 16)
        for cache in (stepped, chunked):
            prefill(model, cache, ids, attention_mask=mask)
        plan_steps, plan_chunk = build_plan(model, stepped), build_plan(model, chunked)
        assert plan_chunk.whole_step
        want = torch.stack([plan_steps.step(new[:, t]) for t in range(new.shape[1])], dim=1)  # (B, T, V)
        got = plan_chunk.chunk(new)
        reference = model(torch.cat([ids, new], dim=1), attention_mask=torch.cat([mask, torch.ones_like(new)], 1))
    assert torch.equal(got, want)
    assert chunked.length == stepped.length and torch.equal(chunked.next_position, stepped.next_position)
    torch.testing.assert_close(got, reference[:, -new.shape[1]:].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8])
def test_chunk_of_every_width_is_bit_identical_to_steps(width):
    """Every verification width the GEMV blocks differently (1-3 rows, 4, 4 + 1..4) gives the bits of
    single steps, with weights of more rows than the prefetch distance and widths off the 16 lanes."""
    from mmafm.inference import build_plan, prefill

    model = _model(4, vocab_size=260, dim=40, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=20, ffn_dim=72)
    new = torch.arange(1, width + 1)[None]  # (1, T)
    with torch.no_grad():
        stepped, chunked = model.new_cache(1, 16), model.new_cache(1, 16)
        for cache in (stepped, chunked):
            prefill(model, cache, torch.tensor([[9, 8, 7]]))
        plan_steps, plan_chunk = build_plan(model, stepped), build_plan(model, chunked)
        want = torch.stack([plan_steps.step(new[:, t]) for t in range(width)], dim=1)  # (1, T, V)
        got = plan_chunk.chunk(new)
    assert torch.equal(got, want)


def test_gemv_rows_do_not_depend_on_the_batch():
    """The GEMV under the decode step and the verification chunk: each input row gets the same bits
    alone or in a batch of up to 8 (float32 and bfloat16 weights, output and input sizes off its
    4-row blocks and 16 lanes), and float32 math within rounding."""
    from mmafm.inference import kernels as native

    if not native.kernels_available():
        pytest.skip(f"native kernel unavailable: {native.kernels_unavailable_reason()}")
    library = native.kernels()
    torch.manual_seed(0)
    for out, inp in [(7, 37), (45, 100), (130, 64), (33, 256), (72, 40), (40, 72)]:  # tails of 5, 4, 0, 0, 8, 8
        x = torch.randn(8, inp)
        for weight in (torch.randn(out, inp), torch.randn(out, inp).to(torch.bfloat16)):
            gemv = library.gemv3_bf16 if weight.dtype == torch.bfloat16 else library.gemv3_f32
            alone = torch.empty(8, out)
            for row in range(8):
                gemv(x[row].data_ptr(), weight.data_ptr(), None, None, alone[row].data_ptr(), 1, out, 0, 0, inp, 1)
            for batch in range(2, 9):
                y = torch.empty(batch, out)
                gemv(x.data_ptr(), weight.data_ptr(), None, None, y.data_ptr(), batch, out, 0, 0, inp, 1)
                assert torch.equal(y, alone[:batch]), (out, inp, weight.dtype, batch)
            torch.testing.assert_close(alone, x @ weight.float().T, rtol=1e-5, atol=1e-4)


def generate_left_pad(prompts):
    from mmafm.inference import left_pad

    return left_pad(prompts)


@pytest.mark.parametrize("max_seq_len", [256, 48])  # 48: the caches fill up and are compacted
def test_batched_greedy_speculative_equals_plain_greedy_per_row(pair, max_seq_len):
    """Rows of different lengths accept different numbers of proposals per round (per-row cache
    lengths); each row's output is plain greedy decoding of that prompt alone."""
    from mmafm.inference.speculative import speculative_generate_batch

    target, drafts = pair
    if max_seq_len != target.config.max_seq_len:
        target = _model(0, vocab_size=512, max_seq_len=max_seq_len)
        target.load_state_dict(pair[0].state_dict())
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (3, 9, 1, 6)]
    steps = 30
    alone = [generate(target, [prompt], steps)[0] for prompt in prompts]
    for k in (2, 4):
        results = speculative_generate_batch(target, drafts["near"], prompts, steps, k=k)
        assert [r.tokens for r in results] == alone, k
        per_row = [tuple(r.per_round) for r in results]
        assert len(set(per_row)) > 1  # the rows did accept different numbers of tokens
    stop = alone[1][5]
    results = speculative_generate_batch(target, drafts["near"], prompts, steps, k=3, stop_tokens=[stop])
    assert [r.tokens for r in results] == [a[: a.index(stop)] if stop in a else a for a in alone]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_one_row_greedy_path_matches_the_batched_path(pair, k):
    """One greedy row takes a lean loop (``_Speculation._run_greedy_row``); the general batched
    loop on two copies of the same prompt is its reference: the same tokens, rounds, proposals
    and accepted counts per round, also with a stop token and a limit that cut a round short."""
    from mmafm.inference.speculative import speculative_generate_batch

    target, drafts = pair
    generator = torch.Generator().manual_seed(7)
    for index in range(4):
        prompt = torch.randint(0, 512, (1 + 3 * index,), generator=generator).tolist()
        plain = generate(target, [prompt], 24)[0]
        for steps, stop in ((24, ()), (13, ()), (24, [plain[9]])):
            one = speculative_generate(target, drafts["near"], prompt, steps, k=k, stop_tokens=stop)
            both = speculative_generate_batch(target, drafts["near"], [prompt, prompt], steps, k=k, stop_tokens=stop)
            for reference in both:
                assert (one.tokens, one.rounds, one.proposed, one.accepted, one.per_round) == (
                    reference.tokens, reference.rounds, reference.proposed, reference.accepted,
                    reference.per_round), (index, steps, stop)


@pytest.mark.parametrize("length", [1, 16, 32, 33])
def test_short_prompts_go_through_the_native_chunk(length, monkeypatch):
    """prefill_and_plan: a prompt of at most NATIVE_PROMPT_TOKENS ids (no padding) is read by the
    plan's native chunk, a longer one by the modules; either way the logits and the cache are the
    modules' (to float32 rounding) and the steps after it give the same tokens."""
    import importlib

    from mmafm.inference import build_plan, prefill
    from mmafm.inference import kernels as native

    gen = importlib.import_module("mmafm.inference.generate")  # the module (the package exports the function)

    if not native.kernels_available():
        pytest.skip(f"native kernel unavailable: {native.kernels_unavailable_reason()}")
    model = _model(5, vocab_size=300, dim=48, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=24, ffn_dim=96)
    ids = torch.randint(1, 300, (1, length), generator=torch.Generator().manual_seed(length))
    used = []
    monkeypatch.setattr(gen, "prefill", lambda *a, **k: used.append("modules") or prefill(*a, **k))
    with torch.no_grad():
        reference_cache, cache = model.new_cache(1, length + 4), model.new_cache(1, length + 4)
        want = prefill(model, reference_cache, ids)  # (1, V)
        got, plan = gen.prefill_and_plan(model, cache, ids)
        assert used == ([] if length <= gen.NATIVE_PROMPT_TOKENS else ["modules"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert cache.length == reference_cache.length == length
        assert torch.equal(cache.next_position, reference_cache.next_position)
        for layer, reference in zip(cache.layers, reference_cache.layers):
            torch.testing.assert_close(layer.read(length)[0], reference.read(length)[0], rtol=1e-4, atol=1e-4)
        next_token = want.argmax(dim=-1)
        torch.testing.assert_close(plan.step(next_token), build_plan(model, reference_cache).step(next_token),
                                   rtol=1e-4, atol=1e-4)


def test_short_prompt_with_sliding_window_layers_uses_the_modules(monkeypatch):
    """The chunk kernel takes linear caches only: a model with windowed (ring) layers reads even a
    short prompt through the modules (prefill, with its linear dispatch), and generates what the
    module path gives step by step."""
    import importlib

    from mmafm.inference import prefill

    gen = importlib.import_module("mmafm.inference.generate")
    used = []
    monkeypatch.setattr(gen, "prefill", lambda *a, **k: used.append("modules") or prefill(*a, **k))
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", local_global_pattern=(1, 1), sliding_window=4).eval()
    prompt = [[5, 6, 7, 8, 9, 10]]
    with torch.no_grad():
        cache = model.new_cache(1, 30)
        assert cache.windows
        logits, plan = gen.prefill_and_plan(model, cache, torch.tensor(prompt))
        assert used == ["modules"]
        reference = prefill(model, model.new_cache(1, 30), torch.tensor(prompt))
    torch.testing.assert_close(logits, reference)
    tokens = generate(model, prompt, 12)[0]
    with torch.no_grad():
        ids = list(prompt[0])
        for _ in range(12):  # greedy by full forwards of the modules
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokens == ids[len(prompt[0]):]


@pytest.mark.parametrize("length", [40, 64, 65])
def test_packed_prompts_go_through_the_native_chunk(length, monkeypatch):
    """A packed model's module path dequantizes every matrix, so prefill_and_plan reads prompts of
    up to PACKED_NATIVE_PROMPT_TOKENS ids through the packed chunk (8 tokens per native call); the
    logits and K/V are the modules' to float32 rounding."""
    import importlib

    from mmafm.compress import compress_model
    from mmafm.inference import kernels as native
    from mmafm.inference import prefill

    gen = importlib.import_module("mmafm.inference.generate")
    if not native.kernels_available():
        pytest.skip(f"native kernel unavailable: {native.kernels_unavailable_reason()}")
    model = _model(5, vocab_size=300)
    compress_model(model, bits=4, embedding_bits=8)
    ids = torch.randint(1, 300, (1, length), generator=torch.Generator().manual_seed(length))
    used = []
    monkeypatch.setattr(gen, "prefill", lambda *a, **k: used.append("modules") or prefill(*a, **k))
    with torch.no_grad():
        reference_cache, cache = model.new_cache(1, length + 2), model.new_cache(1, length + 2)
        want = prefill(model, reference_cache, ids)
        used.clear()
        got, plan = gen.prefill_and_plan(model, cache, ids)
    assert plan.packed and used == ([] if length <= gen.PACKED_NATIVE_PROMPT_TOKENS else ["modules"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for layer, reference in zip(cache.layers, reference_cache.layers):
        torch.testing.assert_close(layer.read(length)[0], reference.read(length)[0], rtol=1e-4, atol=1e-4)


def test_share_kv_copies_the_targets_cache_and_keeps_greedy_exact():
    """A self-draft (the target palettized to 8 bits) taking the target's K/V (share_kv: the
    prompt's, and a fully accepted round's last proposal's): the output is still plain greedy
    decoding, acceptance stays high, the one-row and batched loops agree, and a draft of another
    layout is refused by name."""
    from mmafm.compress.packed import Packed
    from mmafm.inference.speculative import append_column, copy_prompt_kv, self_draft, speculative_generate_batch

    target = _model(0, vocab_size=512)
    before = {name: value.clone() for name, value in target.state_dict().items()}
    draft = self_draft(target, 8)
    assert all(torch.equal(value, before[name]) for name, value in target.state_dict().items())  # untouched
    packed = [m for m in draft.modules() if isinstance(m, Packed)]
    assert len(packed) == 1 + 7 * target.config.n_layers and {m.act_dtype for m in packed} == {"int8"}
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (5, 11, 2)]
    accepted = proposed = 0
    for prompt in prompts:
        plain = generate(target, [prompt], 20)[0]
        result = speculative_generate(target, draft, prompt, 20, k=3, share_kv=True)
        assert result.tokens == plain
        accepted, proposed = accepted + result.accepted, proposed + result.proposed
    assert accepted / proposed > 0.5, accepted / proposed
    # several rows, left-padded: padding and positions are copied with the K/V
    rows = speculative_generate_batch(target, draft, prompts, 12, k=2, share_kv=True)
    assert [r.tokens for r in rows] == [generate(target, [p], 12)[0] for p in prompts]
    # the batched loop's copy of a fully accepted round's last proposal (one column, padding for
    # rows that do not take it) against the one-row loop's: the same rounds on two copies of a prompt
    for k in (1, 2, 4):
        one = speculative_generate(target, draft, prompts[1], 20, k=k, share_kv=True)
        assert sum(n == k for n in one.per_round) > 0  # rounds that take the copy
        for reference in speculative_generate_batch(target, draft, [prompts[1]] * 2, 20, k=k, share_kv=True):
            assert (one.tokens, one.per_round) == (reference.tokens, reference.per_round), k
    # the copy itself: the target's columns, validity and positions
    with torch.no_grad():
        source, dest = target.new_cache(2, 16), draft.new_cache(2, 16)
        target(torch.tensor([[0, 7, 8, 9], [4, 5, 6, 7]]), cache=source,
               attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
        copy_prompt_kv(source, dest)
    assert dest.length == 4 and dest.has_padding and torch.equal(dest.next_position, source.next_position)
    assert torch.equal(dest.valid, source.valid)
    for ours, theirs in zip(dest.layers, source.layers):
        if theirs is not None:
            assert torch.equal(ours.keys[:, :, :4], theirs.keys[:, :, :4])
            assert torch.equal(ours.values[:, :, :4], theirs.values[:, :, :4])
    with pytest.raises(ValueError, match="already holds 4 columns"):
        copy_prompt_kv(source, dest)
    append_column(source, dest, 2, [True, False])  # row 0 takes column 2, row 1 gets padding
    assert dest.length == 5 and dest.valid[:, 4].tolist() == [True, False]
    assert dest.next_position.tolist() == [int(source.next_position[0]) + 1, int(source.next_position[1])]
    for ours, theirs in zip(dest.layers, source.layers):
        if theirs is not None:
            assert torch.equal(ours.keys[:, :, 4], theirs.keys[:, :, 2])
            assert torch.equal(ours.values[:, :, 4], theirs.values[:, :, 2])
    other = _model(1, vocab_size=512, n_kv_heads=1)
    with pytest.raises(ValueError, match="cache layout"):
        speculative_generate(target, other, prompts[0], 4, share_kv=True)


def test_self_draft_is_cached_and_checked(tmp_path):
    """self_draft saves the palettized copy once and loads it back (the same packed weights and
    act_dtype), refuses a bit width the packed kernels do not have and a cache of another width."""
    from mmafm.inference.plan import build_plan
    from mmafm.inference.speculative import self_draft

    target = _model(0, vocab_size=512)
    made = self_draft(target, 4, cache=str(tmp_path / "draft"))
    assert (tmp_path / "draft.json").is_file()
    loaded = self_draft(target, 4, cache=str(tmp_path / "draft"))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        logits = []
        for model in (made, loaded):
            cache = model.new_cache(1, 8)
            plan = build_plan(model, cache)
            assert plan.packed and "int8 activations" in plan.describe()
            logits.append(plan.chunk(ids))
    assert torch.equal(logits[0], logits[1])
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        self_draft(target, 3)
    with pytest.raises(ValueError, match="holds a 4-bit draft"):
        self_draft(target, 8, cache=str(tmp_path / "draft"))
