"""Stages 04_continued_pretrain and 05_long_context and what they stand on: the RoPE base rule
(against the report's integer), the generated math and code text (every equation and every
printed output checked), the source mixture (draw shares against the weights), the long-context
rows and the teacher-forced answer likelihood (against a token-by-token loop), and both
notebooks executed by papermill on a tiny data stage and core checkpoint made here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from _stage_helpers import epoch_batches, write_data_stage, write_text_stage
from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.stages.base import read_manifest
from mmafm.layers.rope import rope_base_for_context

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- RoPE base
def test_rope_base_rule_gives_the_reports_number():
    assert round(rope_base_for_context(500_000, 8192, 32768)) == 6_315_089  # 2024 report, section 3
    at_65k = rope_base_for_context(500_000, 8192, 65536)
    assert 2.24e7 <= at_65k < 2.25e7
    # the rule keeps ln(base) / ln(T / 2 pi) constant, so lengthening in two steps = in one
    assert rope_base_for_context(rope_base_for_context(500_000, 8192, 32768), 32768, 65536) == pytest.approx(at_65k)
    assert rope_base_for_context(10_000, 4096, 4096) == pytest.approx(10_000)
    with pytest.raises(ValueError, match="trained_len must be > 2\\*pi"):
        rope_base_for_context(500_000, 4, 8192)
    with pytest.raises(ValueError, match="base must be > 1"):
        rope_base_for_context(1.0, 8192, 32768)


# ------------------------------------------------------------------------------ generated text
def test_arithmetic_text_is_right():
    from mmafm.data.synthetic_text import arithmetic_documents

    equations = 0
    docs = list(arithmetic_documents(200, seed=3))
    assert docs == list(arithmetic_documents(200, seed=3)) and docs != list(arithmetic_documents(200, seed=4))
    for _, text in docs:
        for left, op, right, result in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", text):
            value = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right),
                     "/": int(left) / int(right)}[op]
            assert value == int(result), (left, op, right, result)
            equations += 1
    assert equations > 600


def test_code_text_prints_what_it_says(capsys):
    from mmafm.data.synthetic_text import code_documents

    for _, text in code_documents(60, seed=1):
        program = "\n".join(line for line in text.splitlines() if not line.startswith("# output: "))
        claimed = [line[len("# output: "):] for line in text.splitlines() if line.startswith("# output: ")]
        exec(compile(program, "<test>", "exec"), {})  # the document's own code, run by the test
        assert capsys.readouterr().out.splitlines() == claimed


# ---------------------------------------------------------------------------------- mixture
def test_parse_mixture():
    from mmafm.data.mixture import parse_mixture

    assert parse_mixture("a=3, b=1,c=0", ["a", "b", "c"]) == {"a": 0.75, "b": 0.25}
    assert parse_mixture("a:3, b:1,c=0", ["a", "b", "c"]) == {"a": 0.75, "b": 0.25}  # ':' as the defaults write it
    for bad, message in (("a=x", "SOURCE=WEIGHT"), ("z=1", "unknown source 'z'"), ("a=1,a=2", "twice"),
                         ("a=0", "no source a positive"), ("a=-1", "SOURCE=WEIGHT")):
        with pytest.raises(ValueError, match=message):
            parse_mixture(bad, ["a", "b", "c"])


def test_mixture_draws_rows_by_weight_and_resumes():
    from mmafm.data.mixture import MixtureShards, stream_batches

    streams = {"low": np.arange(0, 1000, dtype=np.uint32), "high": np.arange(5000, 9000, dtype=np.uint32)}
    data = MixtureShards(streams, {"low": 0.2, "high": 0.8}, seq_len=16, batch_size=10, seed=1, batches_per_epoch=200)
    batches = list(data)
    assert len(batches) == len(data) == 200
    rows = torch.cat([inputs for inputs, _ in batches])  # (2000, 16)
    assert (rows[:, 0] >= 5000).float().mean().item() == pytest.approx(0.8, abs=0.03)
    inputs, targets = batches[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.all(torch.diff(inputs, dim=1) == 1)  # windows of one stream
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, MixtureShards(streams, {"low": 0.2, "high": 0.8}, 16, 10, seed=1,
                                                                           batches_per_epoch=200)))
    assert data.row_sources(0) == ["high" if v >= 5000 else "low" for v in batches[0][0][:, 0].tolist()]
    data.set_epoch(1)
    assert not torch.equal(next(iter(data))[0], batches[0][0])
    held = stream_batches(np.arange(100, dtype=np.uint32), seq_len=10, batch_size=4, count=2)
    assert [b[0].shape[0] for b in held] == [4, 4]
    assert held[1][0][0].tolist() == list(range(40, 50)) and held[1][1][0].tolist() == list(range(41, 51))
    with pytest.raises(ValueError, match="shorter than one row"):
        MixtureShards({"low": np.arange(5, dtype=np.uint32)}, {"low": 1.0}, seq_len=16, batch_size=2)


# ---------------------------------------------------------------------- long-context pieces
def test_answer_nll_equals_a_token_by_token_loop(text_checkpoint):
    from mmafm.data.long_context import make_example
    from mmafm.stages.long_context import answer_nll

    model, tokenizer = text_checkpoint["model"], text_checkpoint["tokenizer"]
    docs = ["a red circle on the left. a blue square on the right."] * 4
    examples = [make_example("passkey", 120, docs, tokenizer, seed=s, digits=4) for s in range(3)]
    got = answer_nll(model, tokenizer, examples, batch_size=2)
    for example, value in zip(examples, got):
        prompt, full = tokenizer.encode(example.prompt), tokenizer.encode(example.text)
        assert full[: len(prompt)] == prompt
        losses = []
        with torch.no_grad():
            for position in range(len(prompt), len(full)):
                logits = model(torch.tensor([full[:position]]))[0, -1]
                losses.append(-torch.log_softmax(logits, -1)[full[position]].item())
        assert value == pytest.approx(float(np.mean(losses)), abs=1e-4)


def test_long_context_rows_mix_tasks_into_document_windows():
    from mmafm.data.mixture import MixtureShards
    from mmafm.stages.long_context import LongContextRows

    documents = MixtureShards({"d": np.arange(0, 3000, dtype=np.uint32)}, {"d": 1.0}, 32, 8, seed=0, batches_per_epoch=50)
    task_rows = np.full((3, 33), -7, dtype=np.int64) + np.arange(3)[:, None] * -10  # rows -7, -17, -27
    data = LongContextRows(documents, task_rows, task_share=0.25, seed=0)
    inputs = torch.cat([batch[0] for batch in data])
    tasks = inputs[:, 0] < 0
    assert tasks.float().mean().item() == pytest.approx(0.25, abs=0.06)
    assert set(inputs[tasks, 0].tolist()) <= {-7, -17, -27}
    assert torch.all(inputs[~tasks] >= 0)
    assert torch.equal(torch.cat([b[0] for b in data]), inputs)  # the same draws again (exact resume)


def test_answer_only_rows_score_exactly_the_answer_span():
    """Each task row's targets keep exactly the positions predicting its answer tokens (found by
    hand: the tokens after the encoded prompt), and the task's loss is the documents' mean
    cross-entropy plus the answers' mean, each checked against F.cross_entropy on its own."""
    import torch.nn.functional as F

    from mmafm.data.long_context import haystack_documents, make_example
    from mmafm.data.mixture import MixtureShards
    from mmafm.stages.long_context import IGNORE, LongContextRows, LongContextTask, task_rows

    class Chars:  # a character tokenizer: the answer span is visible by eye
        eos_id, pad_id = 1, 0

        def encode(self, text):
            return [2 + ord(c) % 250 for c in text]

    tokenizer = Chars()
    documents = haystack_documents(("fortunes",), limit=40)
    examples = [make_example("passkey", 300, documents, unit="chars", seed=0, index=i, digits=4) for i in range(3)]
    filler = np.arange(5000, 9000, dtype=np.uint32)
    rows, spans = task_rows(examples, tokenizer, filler, 320, seed=0)
    for row, (first, end), example in zip(rows, spans, examples):
        assert first == len(example.prompt) and end == len(example.text) + 1  # the space, the digits, EOS
        assert rows.shape[1] == 321 and row[end - 1] == tokenizer.eos_id
        assert "".join(chr(t - 2) for t in row[first : end - 1]) == " " + example.answer
    data = LongContextRows(MixtureShards({"d": filler}, {"d": 1.0}, 320, 6, seed=0, batches_per_epoch=8), rows, 0.5,
                           seed=0, answer_spans=spans)
    seen = 0
    for inputs, targets, is_task in data:
        for row in np.flatnonzero(is_task.numpy()):
            pick = next(i for i in range(3) if torch.equal(inputs[row], torch.from_numpy(rows[i, :-1])))
            first, end = spans[pick]
            kept = torch.nonzero(targets[row] != IGNORE)[:, 0].tolist()
            assert kept == list(range(first - 1, end - 1))  # target p predicts row token p + 1
            assert targets[row, first - 1 : end - 1].tolist() == rows[pick, first:end].tolist()
            seen += 1
        assert torch.all(targets[~is_task] != IGNORE)  # document rows: every token
    assert seen > 5

    class Logits(torch.nn.Module):  # a fixed random "model" with the text model's loss
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(9000, 11))

        def forward(self, ids):
            return self.table[ids]

        def loss(self, logits, targets, ignore_index=-100):
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                                 ignore_index=ignore_index)
            count = (targets != ignore_index).sum()
            return ce / count, {"ce": float(ce.detach() / count)}

    model = Logits()
    task = LongContextTask(model, [])
    inputs, targets, is_task = next(iter(data))
    targets = torch.where(targets == IGNORE, targets, targets % 11)
    losses, metrics = task.training_forward((inputs, targets, is_task))
    logits = model(inputs)
    docs = F.cross_entropy(logits[~is_task].reshape(-1, 11), targets[~is_task].reshape(-1))
    answers = F.cross_entropy(logits[is_task].reshape(-1, 11), targets[is_task].reshape(-1), ignore_index=IGNORE)
    assert losses["lm"].item() == pytest.approx(docs.item(), rel=1e-5)
    assert losses["answer"].item() == pytest.approx(answers.item(), rel=1e-5)
    assert metrics["task_rows"] == float(is_task.sum()) and metrics["ce_answer"] == pytest.approx(answers.item(), rel=1e-5)


def test_copy_rows_repeat_a_window_and_score_the_copy():
    from mmafm.stages.long_context import copy_rows

    filler = np.arange(10_000, 14_000, dtype=np.uint32)  # every token distinct: windows are findable
    rows, spans = copy_rows(filler, 20, 64, seed=3)
    assert rows.shape == (20, 65) and spans.shape == (20, 2)
    for row, (first, end) in zip(rows, spans):
        length = end // 2
        assert first == length + 1 and 8 <= length <= 32
        assert np.array_equal(row[:length], row[length : 2 * length])  # the window, then itself
        assert np.all(np.diff(row[:length]) == 1) and np.all(np.diff(row[2 * length :]) == 1)  # filler windows
    assert np.array_equal(copy_rows(filler, 20, 64, seed=3)[0], rows)
    with pytest.raises(ValueError, match="filler of at least 130"):
        copy_rows(filler[:100], 2, 64)


def test_curriculum_pool_holds_the_task_share_in_a_seeded_order():
    from mmafm.stages.long_context import curriculum_pool

    tasks = (np.full((3, 9), -1, dtype=np.int64) * np.arange(1, 4)[:, None], np.tile([[2, 4]], (3, 1)))  # rows -1, -2, -3
    copies = (np.arange(5 * 9, dtype=np.int64).reshape(5, 9), np.tile([[5, 8]], (5, 1)))
    rows, spans = curriculum_pool(tasks, copies, 0.3, 20, seed=1)
    is_task = rows[:, 0] < 0
    assert rows.shape == (20, 9) and int(is_task.sum()) == 6  # round(0.3 * 20)
    assert sorted(rows[is_task, 0].tolist()) == [-3, -3, -2, -2, -1, -1]  # the task pool, cycled
    assert sorted(rows[~is_task, 0].tolist()) == sorted([0, 9, 18, 27, 36] * 2 + [0, 9, 18, 27])  # the copies, cycled
    assert np.all(spans[is_task] == [2, 4]) and np.all(spans[~is_task] == [5, 8])  # each row keeps its own span
    again = curriculum_pool(tasks, copies, 0.3, 20, seed=1)
    assert np.array_equal(again[0], rows) and not np.array_equal(curriculum_pool(tasks, copies, 0.3, 20, seed=2)[0], rows)
    assert np.all(curriculum_pool(tasks, copies, 1.0, 4)[0][:, 0] < 0)
    empty = (np.zeros((0, 9), dtype=np.int64), np.zeros((0, 2), dtype=np.int64))
    assert np.all(curriculum_pool(empty, copies, 0.0, 4)[0][:, 0] >= 0)
    with pytest.raises(ValueError, match="tasks pool is empty"):
        curriculum_pool(empty, copies, 0.5, 4)
    with pytest.raises(ValueError, match="differ in length"):
        curriculum_pool(tasks, (copies[0][:, :5], copies[1]), 0.5, 4)


def test_document_rows_are_filler_windows_scored_whole():
    from mmafm.stages.long_context import document_rows

    filler = np.arange(7000, 9000, dtype=np.uint32)
    rows, spans = document_rows(filler, 5, 32, seed=4)
    assert rows.shape == (5, 33) and np.all(spans == [1, 33])
    assert np.all(np.diff(rows, axis=1) == 1) and rows.min() >= 7000  # contiguous windows of the filler
    assert np.array_equal(document_rows(filler, 5, 32, seed=4)[0], rows)
    with pytest.raises(ValueError, match="at least 34"):
        document_rows(filler[:20], 1, 32)


def test_curriculum_schedule_holds_the_peak_then_decays_over_the_rest():
    """Through the curriculum: linear warm-up then the peak; after it a cosine from the peak to
    min_lr_ratio over the remaining steps (the closed form, written here); without a curriculum
    the trainer's own schedule."""
    import math
    from types import SimpleNamespace

    from mmafm.stages.long_context import curriculum_batch_size, curriculum_schedule

    def lrs(config, curriculum_steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        scheduler = curriculum_schedule(optimizer, config, curriculum_steps=curriculum_steps)
        values = []
        for _ in range(config.max_steps):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    config = SimpleNamespace(max_steps=30, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    got = lrs(config, 10)
    want = [2.0 * (s + 1) / 4 for s in range(4)] + [2.0] * 6
    want += [2.0 * (k + 1) / 4 for k in range(4)]  # the long rows warm up again
    want += [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 16))) for k in range(16)]
    assert got == pytest.approx(want)
    constant = lrs(SimpleNamespace(**{**vars(config), "schedule": "constant"}), 10)
    assert constant[4:10] + constant[14:] == pytest.approx([2.0] * 22) and constant[10] == pytest.approx(0.5)
    plain = lrs(config, 0)  # no curriculum: warm-up + cosine over all max_steps
    assert plain[4:] == pytest.approx([2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 26))) for s in range(4, 30)])
    assert curriculum_batch_size(4, 512, 128) == 16 and curriculum_batch_size(4, 512, 500) == 4


def test_curriculum_batches_come_first_then_the_document_mix():
    """The first ``curriculum_batches`` batches (counted across epochs) are short rows of the pool
    alone, each scored on its span only; every later batch is the usual document / task mix at full
    length; the same draws come again (exact resume)."""
    from mmafm.data.mixture import MixtureShards
    from mmafm.stages.long_context import IGNORE, LongContextRows

    pool_rows = np.arange(4 * 17, dtype=np.int64).reshape(4, 17) + 50_000  # (M, t + 1), t = 16
    pool_spans = np.array([[3, 6], [2, 9], [1, 17], [1, 2]])  # row 2: the whole row, a document window
    task = np.full((2, 33), -7, dtype=np.int64)
    documents = MixtureShards({"d": np.arange(0, 3000, dtype=np.uint32)}, {"d": 1.0}, 32, 4, seed=0, batches_per_epoch=5)
    data = LongContextRows(documents, task, task_share=0.25, seed=0, curriculum=(pool_rows, pool_spans),
                           curriculum_batches=7, curriculum_batch_size=6)


    batches = epoch_batches(data, 3)
    assert [b[0].shape for b in batches] == [(6, 16)] * 7 + [(4, 32)] * 8  # 7 short batches: epoch 0 and 2 of epoch 1
    for inputs, targets, is_task in batches[:7]:
        for row in range(inputs.shape[0]):
            pick = int((inputs[row, 0] - 50_000) // 17)
            assert bool(is_task[row]) == (pick != 2)  # a document row adds to the documents' loss
            assert torch.equal(inputs[row], torch.from_numpy(pool_rows[pick, :-1]))
            first, end = pool_spans[pick]
            assert torch.nonzero(targets[row] != IGNORE)[:, 0].tolist() == list(range(first - 1, end - 1))
            assert targets[row, first - 1 : end - 1].tolist() == pool_rows[pick, first:end].tolist()
    for inputs, _, _ in batches[7:]:
        assert torch.all((inputs >= 0) | (inputs == -7)) and torch.all(inputs < 50_000)  # documents and task rows
    again = epoch_batches(data, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="curriculum_batches > 0 needs"):
        LongContextRows(documents, task, 0.25, curriculum_batches=3)


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("stage", ["04_continued_pretrain", "05_long_context"])
def test_yaml_holds_the_config_defaults(stage):
    from mmafm.stages import get_stage

    config_cls = get_stage(stage).config_cls
    values = load_yaml(ROOT / "configs" / "stages" / f"{stage}.yaml")
    assert from_dict(config_cls, values) == config_cls()
    from mmafm.train.trainer import TrainSettings

    fields = {f.name for f in dataclasses.fields(config_cls)} - {"out_dir"}
    assert set(values) <= fields and fields - {f.name for f in dataclasses.fields(TrainSettings)} <= set(values)
    full = from_dict(config_cls, load_yaml(ROOT / "configs" / "stages" / "05_long_context_65k.yaml")) \
        if stage == "05_long_context" else None
    if full is not None:
        assert rope_base_for_context(6_315_089, full.trained_len, full.target_len) == pytest.approx(
            rope_base_for_context(500_000, 8192, 65536))


# ------------------------------------------------------------------------ the stages, end to end
@pytest.fixture(scope="module")
def core_run(tmp_path_factory):
    """A tiny data stage (jargon + fortunes + wikipedia, 80 documents each) and a core checkpoint
    trained at seq_len 32, laid out as 00_data and 02_text_pretrain leave them."""
    root = tmp_path_factory.mktemp("core_run")
    tokenizer = write_data_stage(root, text_cap=80)
    write_text_stage(root / "core", "02_text_pretrain", tokenizer, seq_len=32, seed=0)
    return {"root": root, "data_dir": root / "data", "core": root / "core", "tokenizer": tokenizer}


def test_stage_errors_name_the_problem(core_run, tmp_path):
    from mmafm.stages.continued_pretrain import ContinuedPretrainConfig, run as run_continued
    from mmafm.stages.long_context import LongContextConfig, run as run_long

    inputs = dict(init_checkpoint=str(core_run["core"]), tokenizer=str(core_run["tokenizer"].path),
                  data_dir=str(core_run["data_dir"]))
    with pytest.raises(ConfigError, match="unknown source 'wikipedai'.*jargon, fortunes, wikipedia, arithmetic, code"):
        run_continued(ContinuedPretrainConfig(out_dir=str(tmp_path / "a"), mixture="wikipedai=1", **inputs))
    with pytest.raises(ConfigError, match="data_dir is empty"):
        run_continued(ContinuedPretrainConfig(out_dir=str(tmp_path / "b"), **{**inputs, "data_dir": ""}))
    with pytest.raises(ConfigError, match="not a finished 00_data"):
        run_continued(ContinuedPretrainConfig(out_dir=str(tmp_path / "c"), **{**inputs, "data_dir": str(core_run["core"])}))
    with pytest.raises(ConfigError, match="target_len 32 must exceed trained_len 32"):
        run_long(LongContextConfig(out_dir=str(tmp_path / "d"), target_len=32, **inputs))
    with pytest.raises(ConfigError, match="tasks 'haystack'"):
        run_long(LongContextConfig(out_dir=str(tmp_path / "e"), tasks="haystack", **inputs))
    with pytest.raises(ConfigError, match="ladder '40,80': multikey: length 40 tokens is too short"):
        run_long(LongContextConfig(out_dir=str(tmp_path / "f"), ladder="40,80", tasks="multikey", **inputs))
    with pytest.raises(ConfigError, match="ladder 'long'"):
        run_long(LongContextConfig(out_dir=str(tmp_path / "g"), ladder="long", **inputs))
    with pytest.raises(ConfigError, match="curriculum_len 64 must be shorter than target_len 64"):
        run_long(LongContextConfig(out_dir=str(tmp_path / "h"), curriculum_steps=2, curriculum_len=64, **inputs))


def test_vocabulary_extension_grows_the_tokenizer_and_the_model(core_run, tmp_path):
    """extend_vocab_to: the stage writes an extended tokenizer (base ids kept), the checkpoint has
    the new vocabulary and names that tokenizer, and code costs fewer tokens per byte."""
    from mmafm.checkpoint import load_model, read_metadata
    from mmafm.stages.continued_pretrain import ContinuedPretrainConfig, run as run_continued
    from mmafm.tokenizer import Tokenizer

    base = core_run["tokenizer"]
    inputs = dict(init_checkpoint=str(core_run["core"]), tokenizer=str(base.path), data_dir=str(core_run["data_dir"]))
    cfg = ContinuedPretrainConfig(out_dir=str(tmp_path / "04"), generated_documents=60, batch_size=2, max_steps=2,
                                  warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=0, sample_tokens=2,
                                  mixture="jargon=1,code=1", extend_vocab_to=base.vocab_size + 64, **inputs)
    outputs = run_continued(cfg)
    extended = Tokenizer.load(outputs["tokenizer"])
    assert Path(outputs["tokenizer"]).is_relative_to(tmp_path / "04") and extended.vocab_size == base.vocab_size + 64
    assert all(extended.sp.id_to_piece(i) == base.sp.id_to_piece(i) for i in range(base.vocab_size))
    model = load_model(outputs["checkpoint"])
    assert model.config.vocab_size == extended.vocab_size
    assert read_metadata(outputs["checkpoint"])["tokenizer"] == outputs["tokenizer"]
    summary = read_manifest(tmp_path / "04")["summary"]
    assert (summary["vocab_size_before"], summary["vocab_size_after"]) == (base.vocab_size, base.vocab_size + 64)
    assert summary["code_tokens_per_byte_after"] < summary["code_tokens_per_byte_before"]
    with pytest.raises(ConfigError, match="extend_vocab_to=10 must exceed"):
        run_continued(dataclasses.replace(cfg, out_dir=str(tmp_path / "bad"), extend_vocab_to=10))


@pytest.mark.slow
def test_both_notebooks_run_continued_then_long_context(core_run, tmp_path):
    papermill = pytest.importorskip("papermill")
    from mmafm.checkpoint import load_model, read_metadata
    from mmafm.stages.base import read_manifest
    from mmafm.stages.continued_pretrain import ContinuedPretrainConfig
    from mmafm.stages.long_context import LongContextConfig

    inputs = dict(tokenizer=str(core_run["tokenizer"].path), data_dir=str(core_run["data_dir"]))
    continued = dict(out_dir=str(tmp_path / "04"), init_checkpoint=str(core_run["core"]), generated_documents=40,
                     batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=0, log_every=1,
                     sample_tokens=4, mixture="jargon=1,arithmetic=1,code=1", **inputs)
    assert set(continued) <= {f.name for f in dataclasses.fields(ContinuedPretrainConfig)}
    papermill.execute_notebook(str(ROOT / "notebooks" / "04_continued_pretrain.ipynb"), str(tmp_path / "04.ipynb"),
                               parameters=continued, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False)
    manifest = read_manifest(tmp_path / "04")
    summary = manifest["summary"]
    assert summary["seq_len"] == 64 and summary["trained_seq_len"] == 32  # doubled
    assert summary["steps"] == 4 and summary["mixture"] == "jargon=0.3333,arithmetic=0.3333,code=0.3333"
    for name in ("general", "arithmetic", "code"):
        assert summary[f"{name}_ppl_after"] < summary[f"{name}_ppl_before"]  # 4 steps from random weights: all fall
    assert {Path(f).stem for f in manifest["figures"]} == {"perplexity_before_after", "loss"}
    assert read_metadata(manifest["outputs"]["checkpoint"])["stage_config"]["seq_len"] == 64
    stats = json.loads((tmp_path / "04" / "data_card_stats.json").read_text())
    assert set(stats["text_sources"]) == {"arithmetic", "code"} and stats["text_sources"]["code"]["kept"] == 40

    long = dict(out_dir=str(tmp_path / "05"), init_checkpoint=str(tmp_path / "04"), tasks="passkey,needle",
                haystack_sources="jargon,fortunes", task_examples=6, digits=3, batch_size=2, max_steps=3,
                warmup_steps=1, ckpt_every=0, log_every=1, ladder="128,192,256", eval_examples=2, eval_batches=1,
                generated_documents=40, mixture="jargon=1,code=1", curriculum_steps=2, curriculum_len=96, **inputs)
    assert set(long) <= {f.name for f in dataclasses.fields(LongContextConfig)}
    papermill.execute_notebook(str(ROOT / "notebooks" / "05_long_context.ipynb"), str(tmp_path / "05.ipynb"),
                               parameters=long, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False)
    manifest = read_manifest(tmp_path / "05")
    summary = manifest["summary"]
    assert (summary["trained_len"], summary["target_len"]) == (64, 128)
    assert summary["curriculum_steps"] == 2 and summary["curriculum_tasks"] == "passkey,needle"  # both fit 96 tokens at 3 digits
    assert summary["train_tokens"] == 2 * 2 * 96 + 1 * 2 * 128  # 2 curriculum steps of 2 x 96 (128 // 96 = 1), 1 long step
    assert summary["rope_theta"] == pytest.approx(rope_base_for_context(500_000, 64, 128), rel=1e-6)
    assert set(summary["ruler_before"]) == set(summary["ruler_after"]) == {"128", "192", "256"}
    assert all(0.0 <= v <= 1.0 for v in summary["ruler_after"].values())
    assert {Path(f).stem for f in manifest["figures"]} == {"accuracy_vs_length", "accuracy_per_task", "loss"}
    lengthened = load_model(manifest["outputs"]["checkpoint"])
    assert lengthened.config.rope_theta == pytest.approx(summary["rope_theta"], rel=1e-6)
    assert lengthened.config.max_seq_len >= 256
    ladder = json.loads((tmp_path / "05" / "ladder.json").read_text())
    assert math.isfinite(ladder["after"]["nll_mean"]["128"])
