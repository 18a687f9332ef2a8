"""Packing with per-document attention reset (07_sft): the text model's ``document_ids``.

References: each conversation run alone through the unchanged model (a packed row's logits must
equal them); the model's default path before the change (no ids: the plain causal kernel, bit for
bit); the unpacked, padded batch (same loss); ``encode_chat``'s own targets (the loss mask stays
exactly the assistant spans); a brute-force loop for the block-diagonal mask and the positions.
"""

from __future__ import annotations

import pytest
import torch

import mmafm
from mmafm.config import ConfigError
from mmafm.data.chat import encode_chat
from mmafm.models.text import document_mask, document_positions
from mmafm.posttrain import tasks
from mmafm.posttrain.packing import SftBatches, collate_packed, collate_padded, pack_rows

PRESETS = [
    ("afm_2024_device_tiny", {}),
    ("afm_2025_device_tiny", {}),  # KV sharing (5 + 3 layers), 4:1 GQA
    ("afm_2024_device_tiny", {"local_global_pattern": (1, 1), "sliding_window": 5}),  # windows inside documents
    ("afm_2025_server_tiny", {}),  # PT-MoE: tracks, MoE layers, local / global (NoPE) layers
]


def _docs(lengths, vocab=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("preset,overrides", PRESETS)
def test_packed_row_logits_equal_each_document_alone(preset, overrides):
    torch.manual_seed(0)
    model = mmafm.create_model(preset, **overrides).eval()
    rows = [[7, 12, 5], [20, 3, 1]]  # two packed rows of three documents, one of them a single token
    with torch.no_grad():
        for lengths in rows:
            docs = _docs(lengths, seed=len(lengths) + lengths[0])
            row = torch.cat(docs)[None]  # (1, T)
            ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
            packed = model(row, document_ids=ids)
            alone = torch.cat([model(d[None]) for d in docs], dim=1)
            torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
            assert (model(row) - alone).abs().max() > 1e-2  # without ids the documents do see each other


def test_default_path_is_unchanged_and_one_document_is_the_plain_path():
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny").eval()
    ids = torch.randint(10, 2048, (2, 9))
    with torch.no_grad():
        plain = model(ids)
        # the pre-change computation, spelled out: the model's own context with no document ids
        ctx = model.attention_context(model.embed(ids))
        assert ctx.document_ids is None and ctx.mask(ctx.query_time, None) == (None, True)
        one = model(ids, document_ids=torch.zeros_like(ids))
    torch.testing.assert_close(one, plain, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="document_ids"):
        model(ids, document_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="without cache and without attention_mask"):
        model(ids, document_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))


def test_document_mask_and_positions_by_brute_force():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5, 9]])  # a repeated id further on is a new run
    positions = document_positions(ids)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]]
    for window in (None, 2):
        mask = document_mask(ids, window)[:, 0]
        for b in range(2):
            for q in range(8):
                for k in range(8):
                    same_run = all(ids[b, t] == ids[b, q] for t in range(min(k, q), q + 1))
                    want = k <= q and same_run and (window is None or q - k < window)
                    assert bool(mask[b, q, k]) == want, (b, q, k, window)


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]  # 6+2, 5+3, 4 (indices in input order)
    with pytest.raises(ValueError, match="row_len=4"):
        pack_rows([5], 4)


def test_packed_batch_keeps_the_assistant_spans_and_the_padded_loss(text_checkpoint):
    tokenizer = text_checkpoint["tokenizer"]
    conversations = [c for name in ("arithmetic", "format_list", "tool_call")
                     for c in tasks.family_conversations(name, 3, seed=1)]
    examples = [encode_chat(turns, tokenizer) for turns in conversations]
    row_len = max(len(ids) for ids, _ in examples) + 20
    packed = collate_packed(examples, tokenizer.pad_id, row_len)
    assert packed.input_ids.shape[0] < len(examples)  # several conversations per row
    rows = pack_rows([len(ids) for ids, _ in examples], row_len)
    for r, row in enumerate(rows):  # each conversation's slice holds exactly its ids and its own targets
        start = 0
        for doc, index in enumerate(row):
            ids, targets = examples[index]
            stop = start + len(ids)
            assert packed.input_ids[r, start:stop].tolist() == ids
            assert packed.targets[r, start:stop].tolist() == targets
            assert set(packed.document_ids[r, start:stop].tolist()) == {doc}
            start = stop
        assert (packed.targets[r, start:] == -100).all()
    assert int((packed.targets != -100).sum()) == sum(sum(t != -100 for t in tg) for _, tg in examples)

    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size).eval()
    padded = collate_padded(examples, tokenizer.pad_id)
    with torch.no_grad():
        loss_packed, _ = model.loss(model(packed.input_ids, document_ids=packed.document_ids), packed.targets)
        loss_padded, _ = model.loss(model(padded.input_ids), padded.targets)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)

    batches = SftBatches(examples, 4, tokenizer.pad_id, row_len)
    seen = sorted(int((b.targets != -100).sum()) for b in batches)
    assert sum(seen) == sum(sum(t != -100 for t in tg) for _, tg in examples)  # every target once per epoch
    assert 0 <= batches.padding_share() < SftBatches(examples, 4, tokenizer.pad_id, 0).padding_share()


# ----------------------------------------------------------------------------- multimodal SFT


def _tiny_vl(vocab_size: int):
    return mmafm.create_model(
        "afm_vl_tiny", vision_preset="vit_base_patch16_tiny", text_preset="afm_2024_device_tiny",
        vision={"img_size": 32}, text={"vocab_size": vocab_size}, balanced_size=32, num_image_tokens=4,
        rapid_size=16, rapid_image_tokens=1,
    ).eval()


def test_packed_multimodal_rows_equal_the_model_on_each_conversation(text_checkpoint):
    from mmafm.data.chat import prompt_ids
    from mmafm.stages.sft import scene_images, sft_logits

    tokenizer = text_checkpoint["tokenizer"]
    torch.manual_seed(0)
    model = _tiny_vl(tokenizer.vocab_size)
    conversations = tasks.visual_conversations(3, seed=2)
    images = scene_images(conversations, model.resolution_mode().image_size)
    per_image = model.num_image_tokens()
    examples = [encode_chat(turns, tokenizer, image_tokens=per_image) for turns in conversations]
    batches = SftBatches(examples, 3, tokenizer.pad_id, row_len=200, images=images)
    batch = batches.collate([2, 0, 1])
    assert batch.input_ids.shape[0] == 1 and batch.images.shape[0] == 3
    with torch.no_grad():
        packed = sft_logits(model, batch)[0]  # (T, V)
        order = [i for row in pack_rows([len(examples[i][0]) for i in (2, 0, 1)], 200) for i in row]
        start = 0
        for local in order:
            index = (2, 0, 1)[local]
            ids = examples[index][0]
            # the model's own path: one placeholder per image, expanded by MultimodalModel.forward
            single = encode_chat(conversations[index], tokenizer)[0]
            alone = model(torch.tensor([single]), images[index]).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, atol=1e-5, rtol=0)
            start += len(ids)
        assert prompt_ids(conversations[0], tokenizer).count(tokenizer.image_id) == 1


def test_sft_stage_runs_text_and_multimodal_phases(tmp_path, text_checkpoint):
    from mmafm.checkpoint import load_model
    from mmafm.stages.base import read_manifest
    from mmafm.stages.sft import SftStageConfig, run

    tokenizer = text_checkpoint["tokenizer"]
    torch.manual_seed(0)
    vl = _tiny_vl(tokenizer.vocab_size)
    mm_path = mmafm.save_model(tmp_path / "vl" / "mm_model", vl, {"tokenizer": str(tokenizer.path)})
    cfg = SftStageConfig(out_dir=str(tmp_path / "07"), checkpoint=str(text_checkpoint["checkpoint"]),
                         tokenizer=str(tokenizer.path), families="arithmetic,format_list", train_examples=6,
                         eval_examples=2, batch_size=4, max_steps=2, max_new_tokens=4, log_every=1,
                         multimodal=True, mm_checkpoint=str(mm_path), visual_train_examples=8,
                         visual_eval_examples=3, mm_steps=2)
    outputs = run(cfg)
    manifest = read_manifest(tmp_path / "07")
    summary = manifest["summary"]
    assert summary["packing"].startswith("rows of 256")
    assert {"pass_visual_qa_before", "pass_visual_qa_after", "mm_val_loss"} <= set(summary)
    trained = load_model(outputs["mm_checkpoint"], family="multimodal")
    for name, param in vl.vision.state_dict().items():  # the CLIP tower is frozen
        assert torch.equal(trained.vision.state_dict()[name], param)
    assert not all(torch.equal(trained.text.state_dict()[n], p) for n, p in vl.text.state_dict().items())
    assert {p.split("/")[-1] for p in manifest["figures"]} >= {"pass_rates.png", "mm_pass_rates.png", "loss.png"}
    with pytest.raises(ConfigError, match="needs mm_checkpoint"):
        run(SftStageConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "x"), "mm_checkpoint": ""}))


def test_visual_count_checker_reads_a_as_one_only_before_the_asked_shape():
    turns = [{"role": "user", "content": "<image>\nHow many red circles are there?"}, {"role": "assistant", "content": "1"}]
    assert tasks.check("visual_qa", "a red circle", turns) == 1.0
    assert tasks.check("visual_qa", "There is a small red circle.", turns) == 1.0
    assert tasks.check("visual_qa", "a picture of a small blue jumper", turns) == 0.0  # not a count of circles
    assert tasks.check("visual_qa", "a picture of two circles", turns) == 0.0
    three = [turns[0], {"role": "assistant", "content": "3"}]
    assert tasks.check("visual_qa", "a picture of three red circles", three) == 1.0
    assert tasks.check("visual_qa", "3", three) == 1.0 and tasks.check("visual_qa", "a circle", three) == 0.0


def test_training_never_holds_a_held_out_prompt():
    import json

    from mmafm.stages.sft import held_out_prompt_free

    conversations = tasks.family_conversations("tool_call", 120, seed=0)
    held, train = conversations[:20], conversations[20:]
    kept = held_out_prompt_free(held, train)

    def prompt(turns):  # brute force: the turns before the first assistant turn (the scored call)
        first = next(i for i, t in enumerate(turns) if t["role"] == "assistant")
        return json.dumps(turns[:first], sort_keys=True)

    held_prompts = {prompt(t) for t in held}
    assert kept == [t for t in train if prompt(t) not in held_prompts]
    assert 0 < len(kept) < len(train)  # weather questions repeat (ten cities): some are dropped
