"""Stage 10_adapter and its chat data: the JSONL format and its loss mask, the two generated
features and their checkers (against hand-worked answers), the stage's batches and errors, and
the notebook run end to end by papermill on a tiny base.

References: hand-written conversations and answers with known scores; the tokenizer's own
encoding of each turn; the checkpoint's tensors (the base must come out bitwise unchanged).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.data.chat import (
    ChatFormatError,
    date_place_score,
    encode_chat,
    flyer_conversations,
    parse_date,
    prompt_ids,
    read_chat_jsonl,
    reference_answer,
    rouge1_f1,
    summary_conversations,
    validate_conversation,
    write_chat_jsonl,
)
from mmafm.stages.adapter import AdapterStageConfig, ChatBatches, encode_conversations, parse_feature_steps, run

ROOT = Path(__file__).resolve().parents[1]

TOOL_CHAT = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "name": "weather", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C."},
]


def test_yaml_holds_the_config_defaults():
    values = load_yaml(ROOT / "configs" / "stages" / "10_adapter.yaml")
    assert from_dict(AdapterStageConfig, values) == AdapterStageConfig()
    assert set(values) == {f.name for f in dataclasses.fields(AdapterStageConfig)} - {"out_dir"}
    assert (AdapterStageConfig.rank, AdapterStageConfig.alpha) == (32, 16.0)  # the 2025 toolkit's


def test_chat_tokens_learn_only_the_assistant_turns(text_checkpoint):
    tokenizer = text_checkpoint["tokenizer"]
    ids, targets = encode_chat(TOOL_CHAT, tokenizer)
    assert len(ids) == len(targets) and ids[0] == tokenizer.bos_id
    end = tokenizer.token_id("<|end|>")
    # the learned tokens are exactly both assistant turns' bodies and their <|end|>
    call = '[call] {"name": "weather", "arguments": {"city": "Paris"}}'
    want = tokenizer.encode(call) + [end] + tokenizer.encode("Sunny and 21 C.") + [end]
    assert [t for t in targets if t != -100] == want
    # targets are the next token where learned
    assert all(t == -100 or t == ids[i + 1] for i, t in enumerate(targets[:-1]))
    prompt = prompt_ids(TOOL_CHAT, tokenizer)
    assert prompt[-1] == tokenizer.token_id("<|assistant|>") and ids[: len(prompt)] == prompt
    assert tokenizer.decode(ids).count("[tool weather] sunny, 21 C") == 1
    assert reference_answer(TOOL_CHAT) == "Sunny and 21 C."


def test_chat_format_errors_name_the_line(tmp_path):
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [TOOL_CHAT, [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]])
    assert read_chat_jsonl(path)[1][1]["content"] == "hello"
    assert validate_conversation({"messages": TOOL_CHAT}) == TOOL_CHAT
    path.write_text(path.read_text() + '[{"role": "narrator", "content": "x"}]\n')
    with pytest.raises(ChatFormatError, match=r"chat.jsonl:3: turn 0 has role 'narrator'"):
        read_chat_jsonl(path)
    path.write_text('[{"role": "user", "content": "no answer"}]\n')
    with pytest.raises(ChatFormatError, match="no assistant turn"):
        read_chat_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(ChatFormatError, match=r"chat.jsonl:1: not JSON"):
        read_chat_jsonl(path)
    with pytest.raises(ChatFormatError, match="only assistant turns call tools"):
        validate_conversation([{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]},
                               {"role": "assistant", "content": "y"}])


def test_checkers_against_hand_worked_answers():
    # ROUGE-1: 3 of 3 answer words in a 6-word reference: P = 1, R = 1/2, F1 = 2/3
    assert rouge1_f1("the cat sat", "The cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge1_f1("", "anything") == 0.0 and rouge1_f1("a b", "a b") == 1.0
    # clipped counts: "the the the" vs "the cat": overlap 1, P = 1/3, R = 1/2
    assert rouge1_f1("the the the", "the cat") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    reference = "Date: 14 March 2026\nPlace: Oakwood Community Hall"
    assert date_place_score("Date: March 14, 2026\nPlace: oakwood  community hall.", reference) == 1.0
    assert date_place_score("Date: 14 March 2026\nPlace: Riverside Park", reference) == 0.5
    assert date_place_score("Place: Oakwood Community Hall", reference) == 0.5
    assert date_place_score("no idea", reference) == 0.0
    assert parse_date("Saturday 3 January 2026 at noon") == (2026, 1, 3) and parse_date("soon") is None


def test_generated_features_are_well_formed_and_answerable():
    flyers = flyer_conversations(40, seed=3)
    assert flyers == flyer_conversations(40, seed=3) and flyers != flyer_conversations(40, seed=4)
    for turns in flyers:
        validate_conversation(turns)
        answer, flyer = reference_answer(turns), turns[1]["content"]
        place = answer.split("Place: ")[1]
        assert place in flyer and parse_date(flyer) is not None
        assert date_place_score(answer, answer) == 1.0
    # the event's own date comes first in every flyer; a distractor closes booking before it
    assert any("Booking closes" in turns[1]["content"] for turns in flyers)
    summaries = summary_conversations(30, seed=0, max_chars=300)
    assert len({turns[0]["content"] for turns in summaries}) == 30
    for turns in summaries:
        lead, text = reference_answer(turns), turns[0]["content"]
        assert text.startswith("Summarise in one sentence.") and lead in text and len(text) <= 300 + 30
        assert rouge1_f1(lead, lead) == 1.0


def test_batches_pad_right_and_never_learn_padding(text_checkpoint):
    tokenizer = text_checkpoint["tokenizer"]
    conversations = [[{"role": "user", "content": "hi" * n}, {"role": "assistant", "content": "ok"}] for n in (1, 5, 9)]
    examples, dropped = encode_conversations(conversations, tokenizer, max_tokens=10_000)
    assert dropped == 0
    short, dropped = encode_conversations(conversations, tokenizer, max_tokens=len(examples[1][0]))
    assert dropped == 1 and len(short) == 2
    batches = list(ChatBatches(examples, batch_size=2, pad_id=tokenizer.pad_id))
    assert [len(ids) for ids, _ in batches] == [2, 1]
    rows = sorted((ids[row].tolist(), targets[row].tolist()) for ids, targets in batches for row in range(len(ids)))
    for (ids, targets), (want_ids, want_targets) in zip(rows, sorted(examples)):
        assert ids[: len(want_ids)] == want_ids and targets[: len(want_targets)] == want_targets
        assert set(ids[len(want_ids):]) <= {tokenizer.pad_id} and set(targets[len(want_targets):]) <= {-100}


def test_inputs_are_checked(tmp_path, text_checkpoint):
    base = dict(out_dir=str(tmp_path / "out"), checkpoint=str(text_checkpoint["checkpoint"]),
                tokenizer=str(text_checkpoint["tokenizer"].path))
    with pytest.raises(ConfigError, match="checkpoint is empty"):
        run(AdapterStageConfig(out_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match=r"features \['poems'\] are not generated features"):
        run(AdapterStageConfig(**base, features="poems"))
    with pytest.raises(ConfigError, match="no feature to train"):
        run(AdapterStageConfig(**base, features=""))
    with pytest.raises(ConfigError, match=r"feature_steps names \['poems'\]"):
        run(AdapterStageConfig(**base, feature_steps="date_place:9,poems:3"))
    assert parse_feature_steps("") == {} and parse_feature_steps(" date_place:9, x:2 ") == {"date_place": 9, "x": 2}
    for bad in ("date_place", "date_place:0", "date_place:x", "a:1,a:2", ":3"):
        with pytest.raises(ConfigError, match="not 'name:steps'"):
            parse_feature_steps(bad)
    from mmafm.tokenizer import train_tokenizer

    other = train_tokenizer(["completely different text"] * 50, tmp_path / "other", vocab_size=320)
    with pytest.raises(ConfigError, match="pass the tokenizer the base was trained with"):
        run(AdapterStageConfig(**{**base, "tokenizer": str(other.path)}))


@pytest.mark.slow
def test_stage_notebook_trains_saves_and_serves_adapters(tmp_path, text_checkpoint):
    papermill = pytest.importorskip("papermill")
    from mmafm.checkpoint import load_model
    from mmafm.lora import BaseMismatchError, attach_lora
    from mmafm.stages.base import read_manifest

    custom = write_chat_jsonl(tmp_path / "custom.jsonl", [
        [{"role": "user", "content": f"Say {word} twice."}, {"role": "assistant", "content": f"{word} {word}"}]
        for word in ("red", "blue", "green", "circle", "square", "left", "right", "small", "large", "two")])
    out_dir = tmp_path / "10_adapter"
    params = dict(
        out_dir=str(out_dir), checkpoint=str(text_checkpoint["checkpoint"]), tokenizer=str(text_checkpoint["tokenizer"].path),
        features="date_place", chat_jsonl=str(custom), chat_name="twice", train_examples=24, eval_examples=4,
        max_tokens=320, rank=4, alpha=8.0, batch_size=8, max_steps=3, lr=1e-2, warmup_steps=1, log_every=1,
        eval_every=1, max_new_tokens=6, show_examples=2, feature_steps="twice:4",
    )
    assert set(params) <= {f.name for f in dataclasses.fields(AdapterStageConfig)}
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "10_adapter.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    manifest = read_manifest(out_dir)
    outputs, summary = manifest["outputs"], manifest["summary"]
    assert summary["base_unchanged"] is True
    assert summary["mixed_batch_rows_equal"] == "4/4"
    assert set(summary["scores"]) == {"date_place"} and set(summary["scores"]["date_place"]) == {"base", "date_place", "twice"}
    assert {Path(f).stem for f in manifest["figures"]} == {"loss", "scores"}
    assert json.loads((out_dir / "samples.json").read_text())["date_place"][0]["reference"].startswith("Date: ")
    for name in ("date_place", "twice"):
        records = [json.loads(line) for line in (out_dir / "adapters" / name / "metrics.jsonl").read_text().splitlines()]
        val = [r["eval/val_loss"] for r in records if "eval/val_loss" in r]
        steps = 4 if name == "twice" else 3  # feature_steps overrides max_steps for "twice"
        assert len(val) == steps and (name != "date_place" or val[-1] < val[0]), (name, val)  # it learns its feature
        record = json.loads(Path(outputs[f"adapter_{name}"]).with_suffix(".json").read_text())
        assert record["rank"] == 4 and record["dtype"] == "bfloat16" and record["metadata"]["feature"] == name

    # the files serve on the base they were trained on, and only there
    served = attach_lora(load_model(outputs["base_checkpoint"], family="text"), 4, slots=2, name=None)
    served.load(outputs["adapter_date_place"])
    stranger = load_model(outputs["base_checkpoint"], family="text")
    with torch.no_grad():
        stranger.layers[0].ffn.w_up.weight.add_(1e-2)
    with pytest.raises(BaseMismatchError):
        attach_lora(stranger, 4, name=None).load(outputs["adapter_date_place"])
