"""Chat data for adapter training: the JSONL format, its tokenization, and two generated features.

**Format** (the 2025 adapter toolkit's: one conversation per line, a list of turns)::

    [{"role": "system", "content": "You turn flyers into calendar entries."},
     {"role": "user", "content": "Extract the date and place of the event.\\n\\nJazz Night ..."},
     {"role": "assistant", "content": "Date: 14 March 2026\\nPlace: Oakwood Community Hall"}]

``{"messages": [...]}`` per line is accepted too. Roles: ``system``, ``user``, ``assistant``,
``tool``; an assistant turn may carry ``"tool_calls": [{"name": ..., "arguments": {...}}]`` and
a ``tool`` turn (the call's result) a ``"name"``. Every conversation has an assistant turn.

**Tokens** (:func:`encode_chat`): ``<s>`` then per turn its role marker, its content and
``<|end|>`` (the chat tokens every mmafm tokenizer reserves, :data:`mmafm.tokenizer.CHAT_TOKENS`);
a tool result is a ``<|user|>`` turn starting ``[tool <name>]``, a tool call a line ``[call]
{json}`` at the end of the assistant content. The loss covers the assistant turns' content and
their ``<|end|>`` only. :func:`prompt_ids` is everything before the last assistant turn plus its
marker: what a model continues at inference, stopping at ``<|end|>``. :func:`render_chat` is the same
template as text (what the ids spell), :func:`assistant_spans` the token spans the loss covers.

**Images**: a ``user`` or ``system`` turn may hold the placeholder ``<image>`` (one token,
:data:`mmafm.tokenizer.IMAGE_TOKEN`); ``encode_chat(..., image_tokens=N)`` writes it as ``N``
copies of its id, the slots a vision-language model fills with its adapter's tokens. Content may
not spell a chat marker (``<|user|>`` ...): it would forge a turn, so it is refused.

**Features** (:data:`FEATURES`), each a generator of conversations and a checker scoring an answer
against the reference (1 = right, 0 = wrong):

- ``one_sentence_summary``: "Summarise in one sentence" over the Wikipedia summaries of
  :func:`mmafm.data.text_sources.wikipedia_documents` (2 to 6 sentences, <= ``max_chars``); the
  reference is the article's lead sentence (Wikipedia's own one-sentence summary). Checker:
  ROUGE-1 F1 against it (unigram overlap of lower-cased words).
- ``date_place``: "Extract the date and place" over generated event flyers (the 2024 report's
  calendar example): 16 events x 192 venues, dates in three spellings, times, prices, contacts
  and, in a quarter of them, a second "booking closes" date as a distractor. Answer ``Date:
  <the date as the flyer spells it>\\nPlace: <venue>``. Checker: mean of date right (any
  spelling, parsed) and place right (case and spacing folded). Card: ``data_cards/date_place.md``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mmafm.io import atomic_path

__all__ = [
    "ROLES",
    "ChatFormatError",
    "validate_conversation",
    "read_chat_jsonl",
    "write_chat_jsonl",
    "encode_chat",
    "render_chat",
    "assistant_spans",
    "strip_markers",
    "prompt_ids",
    "reference_answer",
    "Feature",
    "FEATURES",
    "summary_conversations",
    "flyer_conversations",
    "rouge1_f1",
    "date_place_score",
    "parse_date",
]

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # target id the loss skips
_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # mmafm.tokenizer.CHAT_TOKENS
_IMAGE = "<image>"  # mmafm.tokenizer.IMAGE_TOKEN


class ChatFormatError(ValueError):
    """A conversation that is not in the chat JSONL format; the message names file and line."""


# ----------------------------------------------------------------------------- the format


def validate_conversation(turns: Any, where: str = "conversation") -> list[dict]:
    """``turns`` as a list of turn dicts, checked against the format (see the module docstring).

    Raises:
        ChatFormatError: naming ``where``, the turn and what is wrong.
    """
    if isinstance(turns, dict) and "messages" in turns:
        turns = turns["messages"]
    if not isinstance(turns, list) or not turns:
        raise ChatFormatError(f"{where}: expected a non-empty list of turns, got {type(turns).__name__}")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ChatFormatError(f"{where}: turn {index} is a {type(turn).__name__}, expected an object")
        role = turn.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: turn {index} has role {role!r}, expected one of {list(ROLES)}")
        if not isinstance(turn.get("content", ""), str):
            raise ChatFormatError(f"{where}: turn {index} content must be a string")
        calls = turn.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ChatFormatError(f"{where}: turn {index} ({role}) has tool_calls; only assistant turns call tools")
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
                raise ChatFormatError(f"{where}: turn {index} tool_calls must be a list of {{'name', 'arguments'}}")
        if role != "assistant" and not turn.get("content"):
            raise ChatFormatError(f"{where}: turn {index} ({role}) has no content")
        forged = [marker for marker in _MARKERS if marker in turn.get("content", "")]
        if forged:
            raise ChatFormatError(f"{where}: turn {index} ({role}) spells the chat marker(s) {forged} in its content")
        if role in ("assistant", "tool") and _IMAGE in turn.get("content", ""):
            raise ChatFormatError(f"{where}: turn {index} ({role}) holds {_IMAGE}; images go in user or system turns")
    if not any(turn["role"] == "assistant" for turn in turns):
        raise ChatFormatError(f"{where}: no assistant turn (nothing to learn)")
    return turns


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """The conversations of a chat JSONL file (blank lines skipped), each validated."""
    path = Path(path)
    if not path.is_file():
        raise ChatFormatError(f"chat data not found: {path}")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)
        except json.JSONDecodeError as err:
            raise ChatFormatError(f"{path}:{number}: not JSON ({err.msg})") from err
        conversations.append(validate_conversation(turns, f"{path}:{number}"))
    if not conversations:
        raise ChatFormatError(f"{path}: no conversations")
    return conversations


def write_chat_jsonl(path: str | Path, conversations: Iterable[list[dict]]) -> Path:
    """Write conversations one per line, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for turns in conversations:
                handle.write(json.dumps(turns, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- tokens


def _turn_text(turn: dict) -> str:
    """The text of a turn after its role marker (tool calls and results spelled out)."""
    content = turn.get("content", "")
    if turn["role"] == "tool":
        return f"[tool {turn.get('name', '')}] {content}".replace("[tool ] ", "[tool] ")
    for call in turn.get("tool_calls") or []:
        payload = json.dumps({"name": call["name"], "arguments": call.get("arguments", {})}, ensure_ascii=False)
        content = f"{content}\n[call] {payload}" if content else f"[call] {payload}"
    return content


def _marker(tokenizer: Any, role: str) -> int:
    return tokenizer.token_id({"system": "<|system|>", "user": "<|user|>", "tool": "<|user|>",
                               "assistant": "<|assistant|>"}[role])


def _expand_images(ids: list[int], image_id: int, image_tokens: int) -> list[int]:
    """``ids`` with every ``image_id`` written ``image_tokens`` times."""
    if image_tokens == 1 or image_id not in ids:
        return ids
    out: list[int] = []
    for token in ids:
        out += [token] * image_tokens if token == image_id else [token]
    return out


def encode_chat(turns: Sequence[dict], tokenizer: Any, image_tokens: int = 1) -> tuple[list[int], list[int]]:
    """``(input_ids, targets)`` of one conversation: ``targets[t]`` is the token after ``t`` where
    that token belongs to an assistant turn's content or its ``<|end|>``, else ``-100``. Each
    ``<image>`` becomes ``image_tokens`` placeholder ids (never targets)."""
    if image_tokens < 1:
        raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
    end = tokenizer.token_id("<|end|>")
    ids, learn = [tokenizer.bos_id], [False]
    for turn in turns:
        body = _expand_images(tokenizer.encode(_turn_text(turn)), tokenizer.image_id, image_tokens) + [end]
        is_answer = turn["role"] == "assistant"
        ids += [_marker(tokenizer, turn["role"])] + body
        learn += [False] + [is_answer] * len(body)
    targets = [ids[t + 1] if learn[t + 1] else IGNORE for t in range(len(ids) - 1)]
    return ids[:-1], targets


_ROLE_MARKER = {"system": "<|system|>", "user": "<|user|>", "tool": "<|user|>", "assistant": "<|assistant|>"}


def render_chat(turns: Sequence[dict], tokenizer: Any | None = None) -> str:
    """The template as text: per turn its role marker, a space and its text (each turn's text is
    tokenized on its own, and SentencePiece's word-start mark on its first piece reads as that
    space), then ``<|end|>``; a tool result is a ``<|user|>`` turn starting ``[tool <name>]``.
    ``tokenizer.decode`` of :func:`encode_chat`'s ids (one token per image, the last ``<|end|>``
    included) is this text (``tokenizer`` unused: the ``apply_chat_template(tokenize=False)``
    habit)."""
    return "".join(f"{_ROLE_MARKER[turn['role']]}{' ' if _turn_text(turn) else ''}{_turn_text(turn)}<|end|>"
                   for turn in turns)


def strip_markers(text: str) -> str:
    """``text`` without chat markers and ``<image>``: a model's sampled answer decoded to text may
    spell them, and written back into a conversation they would forge turns."""
    for marker in _MARKERS + (_IMAGE,):
        text = text.replace(marker, "")
    return text


def assistant_spans(ids: Sequence[int], tokenizer: Any) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the positions of ``ids`` inside assistant turns, found by reading
    the markers (after ``<|assistant|>`` up to and including its ``<|end|>``). The loss of
    :func:`encode_chat` predicts exactly these tokens; a reference for its mask."""
    assistant, end = tokenizer.token_id("<|assistant|>"), tokenizer.token_id("<|end|>")
    spans, start = [], None
    for position, token in enumerate(ids):
        if token == assistant and start is None:
            start = position + 1
        elif token == end and start is not None:
            spans.append((start, position + 1))
            start = None
    if start is not None:  # an unterminated answer (a prompt being continued)
        spans.append((start, len(ids)))
    return spans


def prompt_ids(turns: Sequence[dict], tokenizer: Any) -> list[int]:
    """Token ids a model continues to produce the last assistant turn: every turn before it,
    then the ``<|assistant|>`` marker."""
    last = max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    end = tokenizer.token_id("<|end|>")
    ids = [tokenizer.bos_id]
    for turn in turns[:last]:
        ids += [_marker(tokenizer, turn["role"])] + tokenizer.encode(_turn_text(turn)) + [end]
    return ids + [_marker(tokenizer, "assistant")]


def reference_answer(turns: Sequence[dict]) -> str:
    """The last assistant turn's text (what a checker compares an answer with)."""
    return _turn_text([turn for turn in turns if turn["role"] == "assistant"][-1])


# ----------------------------------------------------------------------------- checkers

_WORD = re.compile(r"[a-z0-9]+")


def rouge1_f1(answer: str, reference: str) -> float:
    """ROUGE-1 F1: harmonic mean of unigram precision and recall (lower-cased words, counts
    clipped), 0 when either side is empty."""
    from collections import Counter

    got, want = Counter(_WORD.findall(answer.lower())), Counter(_WORD.findall(reference.lower()))
    overlap = sum((got & want).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(got.values()), overlap / sum(want.values())
    return 2 * precision * recall / (precision + recall)


_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_name) if name}
_DAY_MONTH_YEAR = re.compile(r"(\d{1,2})\s+([A-Za-z]+)\s+(\d{4})")
_MONTH_DAY_YEAR = re.compile(r"([A-Za-z]+)\s+(\d{1,2}),?\s+(\d{4})")


def parse_date(text: str) -> tuple[int, int, int] | None:
    """``(year, month, day)`` of the first "14 March 2026" or "March 14, 2026" in ``text``."""
    for pattern, order in ((_DAY_MONTH_YEAR, (0, 1, 2)), (_MONTH_DAY_YEAR, (1, 0, 2))):
        for match in pattern.finditer(text):
            groups = match.groups()
            day, month, year = (groups[i] for i in order)
            if month.lower() in _MONTHS:
                return int(year), _MONTHS[month.lower()], int(day)
    return None


def _field(text: str, name: str) -> str:
    match = re.search(rf"^\s*{name}\s*:\s*(.+?)\s*$", text, re.M | re.I)
    return match.group(1) if match else ""


def _fold(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def date_place_score(answer: str, reference: str) -> float:
    """Mean of: the ``Date:`` line names the reference's date (any spelling), the ``Place:``
    line equals the reference's place (case and spacing folded)."""
    want_date = parse_date(_field(reference, "date"))
    date_right = want_date is not None and parse_date(_field(answer, "date")) == want_date
    place_right = bool(_field(answer, "place")) and _fold(_field(answer, "place")) == _fold(_field(reference, "place"))
    return (float(date_right) + float(place_right)) / 2


# ----------------------------------------------------------------------------- generated features

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def summary_conversations(count: int, seed: int = 0, max_chars: int = 400) -> list[list[dict]]:
    """``count`` "summarise in one sentence" conversations over distinct Wikipedia summaries of 2
    to 6 sentences and at most ``max_chars`` characters whose lead sentence has >= 40
    characters, in a seeded order (split the list for disjoint train and held-out sets)."""
    from mmafm.data.text_sources import wikipedia_documents

    items = []
    for _, document in wikipedia_documents():
        extract = document.split("\n", 1)[-1].strip()
        sentences = _SENTENCE_END.split(extract)
        if len(extract) <= max_chars and 2 <= len(sentences) <= 6 and len(sentences[0]) >= 40:
            items.append((extract, sentences[0].strip()))
    random.Random(f"one_sentence_summary-{seed}").shuffle(items)
    if count > len(items):
        raise ValueError(f"one_sentence_summary: {count} conversations asked, only {len(items)} Wikipedia "
                         f"summaries fit max_chars={max_chars}")
    return [[{"role": "user", "content": f"Summarise in one sentence.\n\n{extract}"},
             {"role": "assistant", "content": lead}] for extract, lead in items[:count]]


_EVENTS = ("Bake Sale", "Book Club", "Jazz Night", "Chess Tournament", "Yoga Class", "Plant Swap", "Quiz Night",
           "Film Screening", "Charity Run", "Craft Fair", "Open Mic", "Science Talk", "Farmers Market",
           "Coding Workshop", "Choir Concert", "Board Game Evening")
_PLACE_NAMES = ("Oakwood", "Riverside", "Maple Street", "Harbour", "Elm Grove", "Cedar Lane", "Hilltop", "Westfield",
                "Kingsbridge", "Ashford", "Millbrook", "Fairview", "Brookside", "Stonegate", "Willow Bank", "Northgate")
_PLACE_KINDS = ("Community Hall", "Park", "Library", "School", "Pavilion", "Cafe", "Church Hall", "Sports Centre",
                "Gallery", "Youth Club", "Garden", "Market Square")
_TIMES = ("7 pm", "10:30 am", "2 pm", "6:30 pm", "from 2 to 5 pm", "9 am sharp", "noon", "8 pm")
_EXTRAS = ("Everyone welcome!", "Free entry.", "Tickets £5 at the door.", "Bring a friend!",
           "Refreshments provided.", "Call 01632 960 123 for details.", "Children under 12 go free.",
           "No booking needed.", "Limited places.", "Organised by the Friends of the Arts.")
_FLYERS = (
    "{EVENT}\n{date}, {time}\n{place}\n{extra}",
    "Join us for the {event} on {date}, {time}! Venue: {place}. {extra}",
    "{extra} The {event} takes place at {place} on {date}, {time}.",
    "Come along: {event}. When: {date}, {time}. Where: {place}. {extra}",
    "*** {EVENT} ***\nWhere: {place}\nWhen: {date} ({time})\n{extra}",
)
_DATE_SPELLINGS = ("{weekday} {day} {month} {year}", "{day} {month} {year}", "{month} {day}, {year}")


def _spell_date(date: dt.date, spelling: str) -> str:
    return spelling.format(weekday=calendar.day_name[date.weekday()], day=date.day,
                           month=calendar.month_name[date.month], year=date.year)


def flyer_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` "extract the date and place" conversations over generated flyers; conversation
    ``i`` of a seed is drawn from ``random.Random("flyer-<seed>-<i>")``."""
    conversations = []
    for index in range(count):
        rng = random.Random(f"flyer-{seed}-{index}")
        date = dt.date(rng.choice((2025, 2026, 2027)), rng.randint(1, 12), rng.randint(1, 28))
        place = f"{rng.choice(_PLACE_NAMES)} {rng.choice(_PLACE_KINDS)}"
        event = rng.choice(_EVENTS)
        extra = rng.choice(_EXTRAS)
        if rng.random() < 0.25:  # a second date the answer must not take
            closes = date - dt.timedelta(days=rng.randint(3, 20))
            extra = f"{extra} Booking closes {_spell_date(closes, rng.choice(_DATE_SPELLINGS))}."
        spelled = _spell_date(date, rng.choice(_DATE_SPELLINGS))
        flyer = rng.choice(_FLYERS).format(EVENT=event.upper(), event=event, date=spelled, time=rng.choice(_TIMES),
                                           place=place, extra=extra)
        conversations.append([
            {"role": "system", "content": "You turn event flyers into calendar entries."},
            {"role": "user", "content": f"Extract the date and place of the event.\n\n{flyer}"},
            {"role": "assistant", "content": f"Date: {spelled}\nPlace: {place}"},  # as the flyer spells it
        ])
    return conversations


@dataclass(frozen=True)
class Feature:
    """A generated adapter feature: its conversations and the checker of its answers."""

    name: str
    description: str
    conversations: Callable[[int, int], list[list[dict]]]  # (count, seed) -> distinct conversations
    score: Callable[[str, str], float]  # (answer, reference) -> [0, 1]
    score_name: str


FEATURES = {
    "one_sentence_summary": Feature(
        "one_sentence_summary", "summarise a Wikipedia summary in one sentence",
        summary_conversations, rouge1_f1, "ROUGE-1 F1"),
    "date_place": Feature(
        "date_place", "extract the date and place of an event flyer", flyer_conversations, date_place_score,
        "field accuracy"),
}
