"""05_long_context's staged curriculum: the plan (row length, rows and steps of every stage) against
the rule written out here, and the rows :class:`LongContextRows` yields step by step against that
plan (each step's row length, each row drawn from its own stage's pool and scored on its span),
and the curriculum's document rows, windows of every mixture source by its weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _stage_helpers import epoch_batches
from mmafm.data.mixture import MixtureShards
from mmafm.stages.long_context import (
    IGNORE,
    CurriculumStage,
    LongContextRows,
    curriculum_plan,
    curriculum_long_step,
    curriculum_stage_ends,
    curriculum_stage_of,
    mixture_document_rows,
)


def test_plan_doubles_the_row_length_and_halves_the_steps_stage_by_stage():
    # 700 steps in 3 stages, shares 4 : 2 : 1 -> 400, 200, 100 steps; rows of 64 / 128 / 256
    # tokens, 4 x 512 tokens a step each
    assert curriculum_plan(700, 64, 3, 4, 512) == [
        CurriculumStage(0, 400, 64, 32), CurriculumStage(400, 600, 128, 16), CurriculumStage(600, 700, 256, 8)]
    # steps that do not divide: ends floor(10 * 4 / 7) = 5 and floor(10 * 6 / 7) = 8
    assert curriculum_stage_ends(10, 3) == [5, 8, 10]
    assert [curriculum_stage_of(k, 10, 3) for k in range(10)] == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert curriculum_plan(10, 16, 3, 2, 128) == [
        CurriculumStage(0, 5, 16, 16), CurriculumStage(5, 8, 32, 8), CurriculumStage(8, 10, 64, 4)]
    # the fewest steps that give every stage one: 2**stages - 1, shares exactly 4, 2, 1
    assert curriculum_stage_ends(7, 3) == [4, 6, 7]
    # one stage: the plain curriculum (every step at curriculum_len, a long step's tokens)
    assert curriculum_plan(7, 96, 1, 2, 128) == [CurriculumStage(0, 7, 96, 2)]
    with pytest.raises(ValueError, match="reaches 512, not shorter than target_len 512"):
        curriculum_plan(30, 128, 3, 4, 512)
    with pytest.raises(ValueError, match="curriculum_stages 3 needs at least 7 curriculum_steps, got 6"):
        curriculum_plan(6, 16, 3, 4, 512)
    with pytest.raises(ValueError, match="outside"):
        curriculum_stage_of(10, 10, 3)


def test_rows_lengthen_stage_by_stage_then_the_long_rows():
    """Every curriculum batch has its stage's row length and row count and rows of its stage's pool
    only, scored on their spans; the long rows follow; the draws repeat (exact resume)."""
    plan = curriculum_plan(10, 8, 2, 2, 32)  # stages: 6 steps of 8 rows x 8 tokens, 4 of 4 x 16
    assert [(s.first, s.end, s.length, s.rows) for s in plan] == [(0, 6, 8, 8), (6, 10, 16, 4)]
    pools = []
    for stage, s in enumerate(plan):  # pool rows tagged by stage: values 100_000 * (stage + 1) + row
        rows = np.arange(3 * (s.length + 1), dtype=np.int64).reshape(3, s.length + 1) + 100_000 * (stage + 1)
        spans = np.array([[2, 4], [1, s.length + 1], [3, s.length]])  # row 1: a document window
        pools.append((rows, spans))
    documents = MixtureShards({"d": np.arange(0, 3000, dtype=np.uint32)}, {"d": 1.0}, 32, 2, seed=0, batches_per_epoch=6)
    data = LongContextRows(documents, np.full((2, 33), -7, dtype=np.int64), task_share=0.5, seed=0,
                           curriculum=pools, curriculum_batches=10, curriculum_batch_size=[s.rows for s in plan])


    batches = epoch_batches(data, 3)
    expected = [(8, 8)] * 6 + [(4, 16)] * 4 + [(2, 32)] * 8  # 6 batches an epoch: the plan, then long rows
    assert [tuple(b[0].shape) for b in batches] == expected
    for step, (inputs, targets, is_task) in enumerate(batches[:10]):
        stage = 0 if step < 6 else 1
        rows, spans = pools[stage]
        for row in range(inputs.shape[0]):
            pick = int(inputs[row, 0] - 100_000 * (stage + 1)) // rows.shape[1]
            assert torch.equal(inputs[row], torch.from_numpy(rows[pick, :-1]))  # this stage's pool only
            first, end = spans[pick]
            assert torch.nonzero(targets[row] != IGNORE)[:, 0].tolist() == list(range(first - 1, end - 1))
            assert bool(is_task[row]) == (pick != 1)
    for inputs, _, _ in batches[10:]:
        assert torch.all(inputs < 100_000)  # documents and task rows, no curriculum row
    again = epoch_batches(data, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="2 sizes for 1 curriculum pools"):
        LongContextRows(documents, np.full((2, 33), -7), 0.5, curriculum=pools[:1], curriculum_batches=3,
                        curriculum_batch_size=[8, 4])


def test_curriculum_document_rows_follow_the_mixture():
    # three sources in disjoint token ranges, so each row names its source by its first token;
    # 0.5 / 0.3 / 0.2 of 10 rows -> 5 / 3 / 2, every row a contiguous window of its own stream
    streams = {name: np.arange(base, base + 400, dtype=np.uint32) for name, base in
               (("wiki", 0), ("code", 1000), ("math", 2000))}
    weights = {"wiki": 0.5, "code": 0.3, "math": 0.2}
    rows, spans = mixture_document_rows(streams, weights, 10, 32, seed=3)
    assert rows.shape == (10, 33) and spans.tolist() == [[1, 33]] * 10  # every token scored
    sources = [list(streams)[int(row[0]) // 1000] for row in rows]
    assert {name: sources.count(name) for name in streams} == {"wiki": 5, "code": 3, "math": 2}
    for row, name in zip(rows, sources):
        start = int(row[0]) - int(streams[name][0])
        assert np.array_equal(row, streams[name][start : start + 33].astype(np.int64))
    # weights that do not divide the count: floors 3 / 2 / 1 of 3.15 / 2.45 / 1.4, the one row left to the
    # largest remainder (0.45, code) -> 3 / 3 / 1
    rows, _ = mixture_document_rows(streams, {"wiki": 0.45, "code": 0.35, "math": 0.2}, 7, 16, seed=0)
    assert sorted(int(r[0]) // 1000 for r in rows) == [0, 0, 0, 1, 1, 1, 2]
    again, _ = mixture_document_rows(streams, {"wiki": 0.45, "code": 0.35, "math": 0.2}, 7, 16, seed=0)
    assert np.array_equal(rows, again)  # seeded
    with pytest.raises(ValueError, match="positive weight"):
        mixture_document_rows(streams, {"wiki": 0.0}, 4, 16)


def test_plain_long_rows_evenly_spaced_through_the_curriculum():
    """With ``curriculum_long_share`` 0.25 every 4th curriculum batch (3, 7) is the document batch
    itself (long rows, every token scored, no task row); the others stay curriculum rows; share 0
    leaves the curriculum as it was."""
    assert [k for k in range(12) if curriculum_long_step(k, 0.25)] == [3, 7, 11]
    assert [k for k in range(16) if curriculum_long_step(k, 0.125)] == [7, 15]
    assert not any(curriculum_long_step(k, 0.0) for k in range(100))
    pool = (np.arange(5 * 9, dtype=np.int64).reshape(5, 9) + 100_000, np.tile([[1, 9]], (5, 1)))
    documents = MixtureShards({"d": np.arange(0, 3000, dtype=np.uint32)}, {"d": 1.0}, 32, 2, seed=0, batches_per_epoch=10)
    task = np.full((2, 33), -7, dtype=np.int64)
    plain = list(documents)  # the document batches alone, as MixtureShards draws them

    def batches(share):
        data = LongContextRows(documents, task, task_share=0.5, seed=0, curriculum=pool, curriculum_batches=8,
                               curriculum_batch_size=4, curriculum_long_share=share)
        data.set_epoch(0)
        return list(data)

    mixed = batches(0.25)
    for step, (inputs, targets, is_task) in enumerate(mixed[:8]):
        if step in (3, 7):
            assert torch.equal(inputs, plain[step][0]) and torch.equal(targets, plain[step][1])
            assert not is_task.any()
        else:
            assert inputs.shape == (4, 8) and torch.all(inputs >= 100_000)
    unmixed = batches(0.0)
    assert all(b[0].shape == (4, 8) for b in unmixed[:8])
    assert all(torch.equal(a[0], b[0]) for i, (a, b) in enumerate(zip(mixed[:8], unmixed[:8])) if i not in (3, 7))
