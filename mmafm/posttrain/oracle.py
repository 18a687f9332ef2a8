"""A preference oracle: grades responses on the 2024 report's four single-sided axes and turns
pairs into its four preference levels, with label noise as a parameter.

The 2024 report's human graders rate each response on instruction following, verbosity,
truthfulness and harmlessness (3 classes each) and say how much better one response of a pair is:
significantly / better / slightly / negligibly (WAVE2.md "Post-training", appendix E.1 [paper]).
With no graders here, :func:`grade` computes the four classes by code (0 = bad, 1 = partly,
2 = good):

- instruction following: the answer has the form the task asked for (a bare number, a bulleted
  list, a JSON object with the keys, a typed tool call, ``word (pos): ...``, ``a op b = c``);
  1 when it is non-empty but of another form, 0 when empty;
- truthfulness: 2 when the family's checker passes (:mod:`mmafm.posttrain.tasks`), 1 when it
  fails but the answer shares half the reference's words (ROUGE-1 F1 >= 0.5), else 0;
- verbosity: words against the reference's: 2 within [1/2, 2]x, 1 within [1/4, 4]x, else 0;
- harmlessness: 2 clean, 1 holds a rude phrase, 0 holds an unsafe one (:data:`RUDE`,
  :data:`UNSAFE`: generated phrases, not a real safety classifier).

A response's oracle score is the weighted sum of its grades (:data:`AXIS_WEIGHTS`, [open]). A pair
is compared on scores perturbed by Gaussian noise of std ``noise`` (a grader's inconsistency,
so close pairs flip more often than distant ones); the larger perturbed score wins and the gap
sets the level (:data:`LEVEL_GAPS`). With ``noise = 0`` the level is a monotone step function of
the score gap (tested).

:func:`response_variants` makes candidate responses from a reference answer (right, wrong fact,
truncated, padded, rude, unsafe, off-format) so that a reward model has pairs at every level
without a policy to sample from.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from mmafm.data.chat import reference_answer, rouge1_f1
from mmafm.posttrain import tasks

__all__ = [
    "AXES",
    "AXIS_WEIGHTS",
    "LEVELS",
    "LEVEL_GAPS",
    "RUDE",
    "UNSAFE",
    "grade",
    "oracle_score",
    "preference_level",
    "compare",
    "response_variants",
    "Preference",
    "preference_pairs",
]

AXES = ("instruction_following", "verbosity", "truthfulness", "harmlessness")  # [paper] the four single-sided axes
AXIS_WEIGHTS = (1.0, 0.5, 1.5, 2.0)  # [open] a harmful answer costs most, then a wrong one
LEVELS = ("significantly", "better", "slightly", "negligibly")  # [paper] "... better", index 0..3
LEVEL_GAPS = (3.0, 1.5, 1.0)  # [open] score gap >= 3: significantly, >= 1.5: better, >= 1: slightly, else negligibly
RUDE = ("what a silly question", "obviously", "as anyone knows")  # generated stand-ins for rudeness
UNSAFE = ("share your password with me", "ignore the safety rules", "mix the cleaning products")
_WORDS = re.compile(r"[a-z0-9]+")


def _form_ok(family: str, answer: str) -> bool:
    """Whether ``answer`` has the form family ``family`` asks for (not whether it is right)."""
    text = answer.strip()
    if family == "define_word":
        return bool(re.match(r"^[A-Za-z]+ \([a-z ]+\): \S", text))
    if family == "wiki_cloze":
        return bool(re.fullmatch(r"-?\d+\.?", text))
    if family == "arithmetic":
        return bool(re.fullmatch(r"-?\d+ [-+x] -?\d+ = -?\d+", text))
    if family == "format_list":
        lines = [line for line in text.splitlines() if line.strip()]
        return bool(lines) and all(line.startswith("- ") for line in lines)
    if family == "format_json":
        value = tasks._json_object(text)
        return value is not None and set(value) == {"name", "age", "city"} and text.startswith("{")
    if family == "tool_call":
        return tasks.parse_call(text) is not None
    raise ValueError(f"unknown task family {family!r}; families are: {', '.join(tasks.FAMILIES)}")


def grade(family: str, answer: str, turns: Sequence[dict]) -> tuple[int, int, int, int]:
    """The four single-sided grades of ``answer`` (0 bad, 1 partly, 2 good), in :data:`AXES` order;
    ``turns`` is the conversation cut where the answer goes (:func:`tasks.eval_turns`)."""
    reference = reference_answer(turns)
    following = 2 if _form_ok(family, answer) else 1 if answer.strip() else 0
    ratio = len(_WORDS.findall(answer.lower())) / max(len(_WORDS.findall(reference.lower())), 1)
    verbosity = 2 if 0.5 <= ratio <= 2 else 1 if 0.25 <= ratio <= 4 else 0
    truthful = 2 if tasks.check(family, answer, turns) >= 1 else 1 if rouge1_f1(answer, reference) >= 0.5 else 0
    lower = answer.lower()
    harmless = 0 if any(p in lower for p in UNSAFE) else 1 if any(p in lower for p in RUDE) else 2
    return following, verbosity, truthful, harmless


def oracle_score(grades: Sequence[int]) -> float:
    """The weighted sum of the four grades (0 .. 10 with :data:`AXIS_WEIGHTS`)."""
    return float(sum(w * g for w, g in zip(AXIS_WEIGHTS, grades)))


def preference_level(gap: float) -> int:
    """The level index (0 = significantly ... 3 = negligibly better) of a score gap >= 0."""
    if gap < 0:
        raise ValueError(f"gap must be >= 0 (the winner's score minus the loser's), got {gap}")
    return next((level for level, threshold in enumerate(LEVEL_GAPS) if gap >= threshold), len(LEVEL_GAPS))


def compare(score_a: float, score_b: float, noise: float = 0.0, rng: random.Random | None = None
            ) -> tuple[int, int] | None:
    """``(winner, level)``: 0 if ``a`` wins, 1 if ``b``, on scores plus N(0, noise^2) each; None on
    an exact tie (only possible without noise)."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise > 0:
        rng = rng or random.Random(0)
        score_a, score_b = score_a + rng.gauss(0, noise), score_b + rng.gauss(0, noise)
    if score_a == score_b:
        return None
    return (0 if score_a > score_b else 1), preference_level(abs(score_a - score_b))


def response_variants(family: str, turns: Sequence[dict], other: Sequence[dict], rng: random.Random) -> dict[str, str]:
    """Candidate answers to ``turns`` from its reference: ``right``, ``wrong`` (``other``'s
    reference: right form, wrong content), ``truncated``, ``padded``, ``rude``, ``unsafe``,
    ``off_format`` (the reference's words run together on one line)."""
    reference, wrong = reference_answer(turns), reference_answer(other)
    words = reference.split()
    return {
        "right": reference,
        "wrong": wrong,
        "truncated": " ".join(words[: max(1, len(words) // 2)]) if len(words) > 1 else "",
        "padded": reference + " " + " ".join(["I hope this answer helps you with your question."] * rng.randint(2, 4)),
        "rude": f"{rng.choice(RUDE).capitalize()}. {reference}",
        "unsafe": f"{reference} Now {rng.choice(UNSAFE)}.",
        "off_format": "The answer is " + " ".join(_WORDS.findall(reference.lower())),
    }


@dataclass(frozen=True)
class Preference:
    """One labelled pair: prompt turns, the two answers, the oracle's level and both grades."""

    family: str
    turns: list[dict]  # the conversation cut before the answer's turn (its last turn is the reference)
    chosen: str
    rejected: str
    level: int  # 0 significantly ... 3 negligibly better
    chosen_grades: tuple[int, int, int, int]
    rejected_grades: tuple[int, int, int, int]
    gap: float  # the noise-free oracle score gap (chosen - rejected; negative when noise flipped it)


def preference_pairs(conversations: dict[str, list[list[dict]]], pairs_per_prompt: int, noise: float, seed: int
                     ) -> list[Preference]:
    """Labelled pairs over each family's conversations: per prompt, ``pairs_per_prompt`` distinct
    pairs of its :func:`response_variants`, labelled by :func:`compare` with ``noise``. Exact ties
    are skipped."""
    rng = random.Random(f"preferences-{seed}")
    pairs = []
    for family, items in conversations.items():
        for index, full in enumerate(items):
            turns = tasks.eval_turns(full)
            other = tasks.eval_turns(items[(index + 1) % len(items)])
            variants = response_variants(family, turns, other, rng)
            names = sorted(variants)
            candidates = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
            rng.shuffle(candidates)
            taken = 0
            for a, b in candidates:
                if taken == pairs_per_prompt:
                    break
                if variants[a] == variants[b]:
                    continue
                grades = {n: grade(family, variants[n], turns) for n in (a, b)}
                scores = {n: oracle_score(grades[n]) for n in (a, b)}
                outcome = compare(scores[a], scores[b], noise, rng)
                if outcome is None:
                    continue
                winner, loser = (a, b) if outcome[0] == 0 else (b, a)
                pairs.append(Preference(family, turns, variants[winner], variants[loser], outcome[1], grades[winner],
                                        grades[loser], scores[winner] - scores[loser]))
                taken += 1
    return pairs
