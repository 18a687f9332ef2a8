"""Guided generation: a Python type in, an instance of it out (the 2025 framework's ``@Generable``).

The 2025 report's framework lets a developer annotate a type; it injects the type's format into
the prompt and guarantees, through constrained decoding, that the model's output parses into the
type. Here, the Python way:

- :func:`generable` on a dataclass (or a pydantic model) builds its JSON schema: one property per
  field, **in declaration order** (the model generates the fields in that order), all required,
  no others. Guides come from ``Annotated[T, Guide(...)]``: a description, a numeric range, a
  list length, a regex pattern, a set of choices; ``Literal[...]`` and ``enum.Enum`` are choices;
  a field whose type is another dataclass nests; ``T | None`` may be null.
- :func:`format_instructions` is the text injected into the prompt: what to produce, field by
  field, and the schema.
- Decoding is constrained by an established engine over *our* tokenizers: **llguidance**
  (default; measured faster per token here, ``docs/guided_generation.md``) or **xgrammar** (kept
  as the tests' oracle: both must allow the same tokens after the same prefix). The engines see
  each token as the bytes it adds to the text: :func:`token_table` builds that table *from the
  tokenizer's decoder* — not from SentencePiece pieces, whose ``▁`` is a space and whose
  ``<0xHH>`` pieces are single bytes (passing pieces as bytes breaks every space).
- The decode loop is :func:`mmafm.inference.generate.decode_steps` with a :class:`GrammarConstraint`
  as its :class:`~mmafm.inference.generate.Constraint` hook: before each choice the engine's token
  bitmask sets forbidden logits to ``-inf``; each chosen token advances the row's matcher, and
  the row ends when the grammar is complete.
- :func:`generate_object` returns an instance of the type, or raises :class:`TokenLimitError`
  if the token limit came first (the partial text in the message); a schema the engine cannot
  compile raises :class:`SchemaError` naming the type. :func:`stream_object` yields
  :class:`Snapshot` s of the partially generated object as it grows (the framework's snapshot
  streaming), the last one holding the instance.

>>> @generable
... @dataclass
... class Person:
...     name: Annotated[str, Guide("first name", pattern=r"[A-Z][a-z]{1,9}")]
...     age: Annotated[int, Guide(minimum=0, maximum=120)]
>>> person = generate_object(model, tokenizer, Person, "Invent a person.")  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
import re
import time
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from mmafm.inference.generate import decode_steps

__all__ = [
    "Guide",
    "generable",
    "json_schema",
    "instance_from_json",
    "format_instructions",
    "TokenTable",
    "token_table",
    "ENGINES",
    "Engine",
    "LLGuidanceEngine",
    "XGrammarEngine",
    "make_engine",
    "GrammarConstraint",
    "GuidedError",
    "SchemaError",
    "TokenLimitError",
    "Snapshot",
    "parse_partial_json",
    "guided_prompt",
    "generate_object",
    "stream_object",
    "unpack_bitmask",
]

ENGINES = ("llguidance", "xgrammar")


class GuidedError(ValueError):
    """Guided generation could not produce an instance."""


class SchemaError(GuidedError):
    """A type that cannot become a schema, or a schema the engine cannot compile."""


class TokenLimitError(GuidedError):
    """The token limit came before the object was complete."""


# ------------------------------------------------------------------------------ types -> schema


@dataclass(frozen=True)
class Guide:
    """What a field may hold, beyond its type (the framework's ``@Guide``), for ``Annotated[T, Guide(...)]``.

    Args:
        description: what the field means (into the schema and the prompt).
        minimum, maximum: inclusive range of an ``int`` / ``float``.
        min_items, max_items: length range of a ``list``.
        pattern: regex a ``str`` must match in full.
        min_length, max_length: length range of a ``str`` (xgrammar's masks slow down for long
            maxima; prefer a pattern).
        choices: the only values allowed (strings or numbers).
    """

    description: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_items: int | None = None
    max_items: int | None = None
    pattern: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    choices: tuple | None = None

    def __post_init__(self):
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"Guide minimum {self.minimum} > maximum {self.maximum}")
        if self.min_items is not None and self.min_items < 0:
            raise ValueError(f"Guide min_items must be >= 0, got {self.min_items}")
        if self.min_items is not None and self.max_items is not None and self.min_items > self.max_items:
            raise ValueError(f"Guide min_items {self.min_items} > max_items {self.max_items}")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"Guide min_length {self.min_length} > max_length {self.max_length}")
        if self.pattern is not None:
            re.compile(self.pattern)  # a bad regex fails here, naming itself
        if self.choices is not None and not self.choices:
            raise ValueError("Guide choices must not be empty")


def _is_pydantic(cls: Any) -> bool:
    return isinstance(cls, type) and hasattr(cls, "model_json_schema") and hasattr(cls, "model_validate")


def generable(cls: type) -> type:
    """Mark a dataclass (or pydantic model) as generable: its schema is built now (a type that
    cannot be generated fails here, naming the field) and kept as ``cls.__generable_schema__``."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)) and not _is_pydantic(cls):
        raise SchemaError(f"@generable needs a dataclass or a pydantic model, got {cls!r}")
    cls.__generable_schema__ = _build_schema(cls)
    return cls


def json_schema(cls: type) -> dict:
    """The JSON schema of a generable type (built on first use for a plain dataclass)."""
    schema = cls.__dict__.get("__generable_schema__") if isinstance(cls, type) else None
    return schema if schema is not None else _build_schema(cls)


def _build_schema(cls: type) -> dict:
    if _is_pydantic(cls):
        return cls.model_json_schema()
    return _type_schema(cls, None, cls.__name__)


def _user_doc(cls: type) -> str | None:
    doc = (cls.__doc__ or "").strip()
    return None if not doc or doc.startswith(f"{cls.__name__}(") else doc  # dataclass's own doc: skip


def _type_schema(tp: Any, guide: Guide | None, where: str) -> dict:
    """JSON schema of type ``tp`` with ``guide`` applied; ``where`` names the field in errors."""
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        guides = [extra for extra in extras if isinstance(extra, Guide)]
        return _type_schema(base, guides[-1] if guides else guide, where)
    guide = guide or Guide()
    schema: dict[str, Any]
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp, include_extras=True)
        properties = {f.name: _type_schema(hints[f.name], None, f"{where}.{f.name}")
                      for f in dataclasses.fields(tp)}
        schema = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}
        description = guide.description or _user_doc(tp)
        if description:
            schema["description"] = description
        return schema
    if origin is Literal:
        values = list(typing.get_args(tp))
        schema = {"enum": values}
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        schema = {"enum": [member.value for member in tp]}
    elif origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        rest = [option for option in options if option is not type(None)]
        if len(rest) != 1 or len(options) != 2:
            raise SchemaError(f"{where}: only `T | None` unions can be generated, got {tp}")
        schema = {"anyOf": [_type_schema(rest[0], guide, where), {"type": "null"}]}
        return schema
    elif origin is list or tp is list:
        args = typing.get_args(tp)
        if not args:
            raise SchemaError(f"{where}: a list needs its item type (list[int], list[Item])")
        schema = {"type": "array", "items": _type_schema(args[0], None, f"{where}[]")}
        if guide.min_items is not None:
            schema["minItems"] = guide.min_items
        if guide.max_items is not None:
            schema["maxItems"] = guide.max_items
    elif tp is bool:
        schema = {"type": "boolean"}
    elif tp in (int, float):
        schema = {"type": "integer" if tp is int else "number"}
        if guide.minimum is not None:
            schema["minimum"] = int(guide.minimum) if tp is int else guide.minimum
        if guide.maximum is not None:
            schema["maximum"] = int(guide.maximum) if tp is int else guide.maximum
    elif tp is str:
        schema = {"type": "string"}
        if guide.pattern is not None:  # JSON Schema patterns search; anchored, they match in full
            schema["pattern"] = f"^(?:{guide.pattern})$"
        if guide.min_length is not None:
            schema["minLength"] = guide.min_length
        if guide.max_length is not None:
            schema["maxLength"] = guide.max_length
    else:
        raise SchemaError(f"{where}: type {tp!r} cannot be generated (str, int, float, bool, Literal, Enum, "
                          f"list[T], T | None and dataclasses can)")
    if guide.choices is not None:
        schema = {"enum": list(guide.choices)}
    if guide.description:
        schema["description"] = guide.description
    return schema


def instance_from_json(cls: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as an instance of ``cls``: dataclasses and enums rebuilt,
    recursively; a pydantic model validates it."""
    if _is_pydantic(cls):
        return cls.model_validate(value)
    if typing.get_origin(cls) is Annotated:
        return instance_from_json(typing.get_args(cls)[0], value)
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        hints = typing.get_type_hints(cls, include_extras=True)
        return cls(**{f.name: instance_from_json(hints[f.name], value[f.name]) for f in dataclasses.fields(cls)})
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return instance_from_json(next(a for a in typing.get_args(cls) if a is not type(None)), value)
    if origin is list:
        return [instance_from_json(typing.get_args(cls)[0], item) for item in value]
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return cls(value)
    if cls is float and isinstance(value, int):
        return float(value)
    return value


def _describe_fields(schema: dict, indent: str = "- ") -> list[str]:
    lines = []
    for name, prop in schema.get("properties", {}).items():
        notes = []
        if "description" in prop:
            notes.append(prop["description"])
        if "enum" in prop:
            notes.append("one of " + ", ".join(json.dumps(v) for v in prop["enum"]))
        if "minimum" in prop or "maximum" in prop:
            notes.append(f"from {prop.get('minimum', '-inf')} to {prop.get('maximum', 'inf')}")
        if "pattern" in prop:
            notes.append(f"matching the regex {prop['pattern']}")
        if "minLength" in prop or "maxLength" in prop:
            notes.append(f"{prop.get('minLength', 0)} to {prop.get('maxLength', 'any number of')} characters")
        if "minItems" in prop or "maxItems" in prop:
            notes.append(f"{prop.get('minItems', 0)} to {prop.get('maxItems', 'any number of')} items")
        kind = prop.get("type", "value")
        lines.append(f"{indent}{name} ({kind})" + (": " + "; ".join(notes) if notes else ""))
        if prop.get("type") == "object":
            lines += _describe_fields(prop, "  " + indent)
    return lines


def format_instructions(cls: type) -> str:
    """The format instructions injected into the prompt: the fields in order with their guides,
    then the JSON schema."""
    schema = json_schema(cls)
    name = getattr(cls, "__name__", "object")
    lines = [f"Respond with one JSON object (a {name}) with these fields, in this order:"]
    lines += _describe_fields(schema)
    lines.append("JSON schema: " + json.dumps(schema, separators=(",", ":")))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ token-byte table


@dataclass(frozen=True)
class TokenTable:
    """What each token id adds to the text, as bytes (what a grammar engine matches).

    Attributes:
        tokens: per token id, its bytes (``b""`` for special tokens).
        special: ids that are not text (control tokens, role markers, added special tokens):
            never allowed inside guided output.
        eos_ids: the end-of-sequence ids (allowed once the grammar is complete).
        duplicates: ids whose bytes a preferred token spells too (a SentencePiece byte piece
            ``<0x63>`` next to the piece ``c``): the engines never allow them, so the model writes
            text the way its tokenizer does (and llguidance, which keeps one token per byte
            string, and xgrammar, which keeps all, allow the same tokens).
        vocab_size: the tokenizer's vocabulary size (``len(tokens)``).
    """

    tokens: tuple[bytes, ...]
    special: frozenset[int]
    eos_ids: tuple[int, ...]
    duplicates: frozenset[int] = frozenset()

    def engine_tokens(self) -> list[bytes]:
        """The vocabulary the engines see: special and duplicate tokens as ``b""``."""
        hidden = self.special | self.duplicates
        return [b"" if i in hidden else t for i, t in enumerate(self.tokens)]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def text(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` as the engine saw it (specials dropped)."""
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", errors="replace")


def _sentencepiece_table(tokenizer: Any) -> TokenTable:
    """Bytes of every piece of a SentencePiece model, from its decoder: token ``t``'s bytes are
    ``decode([anchor, t]) - decode([anchor])`` (a lone piece would lose the leading space that
    SentencePiece strips at the start of a text); a byte piece ``<0xHH>`` is its one byte (the
    decoder only yields bytes >= 0x80 within a complete UTF-8 sequence; the tests check the pairs)."""
    sp = tokenizer.sp
    size = sp.get_piece_size()
    anchor = next(i for i in range(size) if sp.is_byte(i) and sp.id_to_piece(i) == "<0x41>")  # "A"
    anchor_bytes = sp.decode([anchor], out_type=bytes)
    tokens, special = [], set()
    for token in range(size):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            tokens.append(b"")
            special.add(token)
        elif sp.is_byte(token):  # alone, the decoder turns a byte >= 0x80 into U+FFFD: read its piece
            tokens.append(bytes([int(sp.id_to_piece(token)[3:5], 16)]))
        else:
            text = sp.decode([anchor, token], out_type=bytes)
            if not text.startswith(anchor_bytes):
                raise ValueError(f"token {token} ({sp.id_to_piece(token)!r}) changes the text before it when decoded")
            piece = text[len(anchor_bytes):]
            if re.fullmatch(rb"<\|?[a-z_]+\|?>", piece):  # role markers / <image>: user-defined specials
                tokens.append(b"")
                special.add(token)
            else:
                tokens.append(piece)
    preferred = {t: i for i, t in enumerate(tokens) if t and i not in special and not sp.is_byte(i)}
    duplicates = {i for i, t in enumerate(tokens) if sp.is_byte(i) and t in preferred}
    return TokenTable(tuple(tokens), frozenset(special), (sp.eos_id(),), frozenset(duplicates))


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _hf_table(tokenizer: Any) -> TokenTable:
    """Bytes of every token of a transformers fast tokenizer with a byte-level decoder (GPT-2,
    SmolLM2): the decoder maps each character of a token to one byte through GPT-2's alphabet."""
    backend = tokenizer.backend_tokenizer
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ValueError(f"token_table supports byte-level transformers tokenizers; this one's decoder is "
                         f"{decoder.get('type')!r}")
    alphabet = _byte_level_alphabet()
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens = []
    for token, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if token in special or piece is None:
            tokens.append(b"")
            special.add(token)
        else:
            tokens.append(bytes(alphabet[c] for c in piece))
    eos = tokenizer.eos_token_id
    first: dict[bytes, int] = {}
    duplicates = {i for i, t in enumerate(tokens) if t and i not in special and first.setdefault(t, i) != i}
    return TokenTable(tuple(tokens), frozenset(special), (eos,) if eos is not None else (), frozenset(duplicates))


_TABLES: dict[int, TokenTable] = {}


def token_table(tokenizer: Any) -> TokenTable:
    """The :class:`TokenTable` of an mmafm SentencePiece :class:`~mmafm.tokenizer.Tokenizer` or
    a transformers byte-level tokenizer (built once per tokenizer object)."""
    key = id(tokenizer)
    if key not in _TABLES:
        if hasattr(tokenizer, "sp"):
            table = _sentencepiece_table(tokenizer)
        elif hasattr(tokenizer, "backend_tokenizer"):
            table = _hf_table(tokenizer)
        else:
            raise TypeError(f"token_table needs an mmafm Tokenizer or a transformers fast tokenizer, got "
                            f"{type(tokenizer).__name__}")
        _TABLES[key] = table
    return _TABLES[key]


# ------------------------------------------------------------------------------ engines


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:  # (B, W) int32 -> (B, V) bool
    """An engine's token bitmask (bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed)
    as one bool per token."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # (B, 32 W)
    return torch.from_numpy(bits[:, :vocab_size].astype(bool))


class Engine(abc.ABC):
    """A grammar engine over one :class:`TokenTable`: compiles schemas (cached) into matchers.

    A matcher (what :meth:`matcher` returns) has ``fill(bitmask, row)`` (write the allowed
    tokens of its state into row ``row`` of an int32 bitmask), ``accept(token) -> bool``,
    ``rollback(count)``, ``fork()``, ``is_accepting()``, ``is_stopped()``.
    """

    name = ""

    def __init__(self, table: TokenTable):
        self.table = table
        self._compiled: dict[str, Any] = {}

    def bitmask(self, rows: int) -> torch.Tensor:  # (rows, ceil(V / 32)) int32
        return torch.full((rows, (self.table.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def matcher(self, schema: dict, what: str = "schema"):
        key = json.dumps(schema, sort_keys=False)
        if key not in self._compiled:
            self._compiled[key] = self._compile(schema, what)
        return self._new_matcher(self._compiled[key], what)

    @abc.abstractmethod
    def _compile(self, schema: dict, what: str) -> Any:
        """The engine's compiled grammar of ``schema`` (a clear error naming ``what`` if it cannot)."""

    @abc.abstractmethod
    def _new_matcher(self, compiled: Any, what: str):
        """A fresh matcher at the start of ``compiled``."""


class _TableTokenizer:
    """What llguidance's ``TokenizerWrapper`` reads: the token bytes (specials as ``0xFF`` + a
    name, llguidance's convention) and a tokenize function over the table (greedy longest match:
    llguidance only uses it to re-tokenize forced text, never to check a mask)."""

    def __init__(self, table: TokenTable):
        hidden = table.special | table.duplicates
        self.tokens = [b"\xff<special_%d>" % i if i in hidden else t for i, t in enumerate(table.tokens)]
        self.eos_token_id = table.eos_ids[0] if table.eos_ids else 0
        self.bos_token_id = None
        self.special_token_ids = sorted(table.special)
        self._by_bytes = {t: i for i, t in enumerate(table.tokens) if t and i not in hidden}
        self._longest = max(map(len, self._by_bytes), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                token = self._by_bytes.get(data[start:end])
                if token is not None:
                    ids.append(token)
                    start = end
                    break
            else:
                raise ValueError(f"no token spells byte {data[start]:#x}")
        return ids


class _LLGuidanceMatcher:
    def __init__(self, matcher: Any):
        self.inner = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        # the pointer call of llguidance.torch.fill_next_token_bitmask, without importing that
        # module (its torch.compile decorator costs seconds at import)
        words = bitmask[row]
        self.inner.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token: int) -> bool:
        return self.inner.consume_token(token)

    def rollback(self, count: int) -> None:
        self.inner.rollback(count)

    def fork(self) -> "_LLGuidanceMatcher":
        return _LLGuidanceMatcher(self.inner.deep_copy())

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def is_stopped(self) -> bool:
        return self.inner.is_stopped()

    def error(self) -> str:
        return self.inner.get_error() if self.inner.is_error() else ""


class LLGuidanceEngine(Engine):
    """llguidance (``LLMatcher``): compact JSON (``,`` and ``:`` separators, no free whitespace)."""

    name = "llguidance"

    def __init__(self, table: TokenTable):
        super().__init__(table)
        import llguidance

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TableTokenizer(table)),
                                                eos_token=list(table.eos_ids) or None)

    def _compile(self, schema: dict, what: str) -> str:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"})
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise SchemaError(f"llguidance cannot compile the schema of {what}: {messages[0]}")
        return grammar

    def _new_matcher(self, compiled: str, what: str) -> _LLGuidanceMatcher:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise SchemaError(f"llguidance cannot compile the schema of {what}: {matcher.get_error()}")
        return _LLGuidanceMatcher(matcher)


class _XGrammarMatcher:
    def __init__(self, matcher: Any):
        self.inner = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.inner.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.inner.accept_token(token)

    def rollback(self, count: int) -> None:
        self.inner.rollback(count)

    def fork(self) -> "_XGrammarMatcher":
        return _XGrammarMatcher(self.inner.fork())

    def is_accepting(self) -> bool:
        return self.inner.is_completed()

    def is_stopped(self) -> bool:
        return self.inner.is_terminated()

    def error(self) -> str:
        return ""


class XGrammarEngine(Engine):
    """xgrammar (``GrammarCompiler.compile_json_schema`` + ``GrammarMatcher``), same JSON layout."""

    name = "xgrammar"

    def __init__(self, table: TokenTable):
        super().__init__(table)
        import xgrammar

        info = xgrammar.TokenizerInfo(table.engine_tokens(), xgrammar.VocabType.RAW, vocab_size=table.vocab_size,
                                      stop_token_ids=list(table.eos_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def _compile(self, schema: dict, what: str) -> Any:
        try:
            return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        except Exception as err:  # xgrammar raises RuntimeError / its own types for bad schemas
            raise SchemaError(f"xgrammar cannot compile the schema of {what}: {err}") from err

    def _new_matcher(self, compiled: Any, what: str) -> _XGrammarMatcher:
        import xgrammar

        return _XGrammarMatcher(xgrammar.GrammarMatcher(compiled))


_ENGINES: dict[tuple[int, str], Engine] = {}


def make_engine(tokenizer_or_table: Any, engine: str = "llguidance") -> Engine:
    """The engine ``engine`` over a tokenizer's :func:`token_table` (one per tokenizer and engine)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    table = tokenizer_or_table if isinstance(tokenizer_or_table, TokenTable) else token_table(tokenizer_or_table)
    key = (id(table), engine)
    if key not in _ENGINES:
        _ENGINES[key] = (LLGuidanceEngine if engine == "llguidance" else XGrammarEngine)(table)
    return _ENGINES[key]


# ------------------------------------------------------------------------------ the decode hook


class GrammarConstraint:
    """One matcher per batch row, as the decode loop's :class:`~mmafm.inference.generate.Constraint`.

    Args:
        matchers: one per row (from :meth:`Engine.matcher`).
        vocab_size: the model's vocabulary (may exceed the tokenizer's: the extra ids are never
            allowed).
        table_size: the tokenizer's vocabulary (the engines' bitmask width).
    """

    def __init__(self, matchers: list, vocab_size: int, table_size: int):
        if table_size > vocab_size:
            raise ValueError(f"the tokenizer has {table_size} tokens but the model only {vocab_size}")
        self.matchers, self.vocab_size, self.table_size = matchers, vocab_size, table_size
        self.bitmask = torch.full((len(matchers), (table_size + 31) // 32), -1, dtype=torch.int32)
        self.done = [False] * len(matchers)
        self.mask_seconds: list[float] = []  # per computed mask (the benchmark reads it)

    def allowed(self, row: int) -> torch.Tensor:  # (V,) bool
        """The tokens row ``row``'s matcher allows now."""
        self.matchers[row].fill(self.bitmask, row)
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[: self.table_size] = unpack_bitmask(self.bitmask[row : row + 1], self.table_size)[0]
        return allowed

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, V)
        start = time.perf_counter()
        for row, matcher in enumerate(self.matchers):
            if self.done[row]:
                self.bitmask[row] = -1  # an ended row: anything (the loop ignores its token)
            else:
                matcher.fill(self.bitmask, row)
        allowed = unpack_bitmask(self.bitmask, self.table_size)  # (B, table)
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy, single-threaded: a torch op this size would open a parallel region and wait
            # for threads the decode kernels' pool keeps busy (measured: ~60 ms a step on 2 cores)
            values = logits.numpy().copy()  # (B, V)
            values[:, : self.table_size][~allowed.numpy()] = -np.inf
            values[:, self.table_size :] = -np.inf  # ids the tokenizer does not have
            masked = torch.from_numpy(values)
        else:
            masked = logits.clone()
            masked[:, : self.table_size].masked_fill_(~allowed.to(logits.device), float("-inf"))
            masked[:, self.table_size :] = float("-inf")
        self.mask_seconds.append(time.perf_counter() - start)
        return masked

    def accept(self, row: int, token: int) -> bool:
        matcher = self.matchers[row]
        if not matcher.accept(token):
            raise GuidedError(f"row {row}: the grammar refused token {token} it had allowed ({matcher.error()})")
        self.done[row] = matcher.is_stopped()
        return self.done[row]


# ------------------------------------------------------------------------------ partial objects


def parse_partial_json(text: str) -> Any:
    """The value a JSON prefix has produced so far: open strings, arrays and objects closed, an
    unfinished key or literal dropped (``'{"a":1,"b":"x'`` -> ``{"a": 1, "b": "x"}``). None when
    nothing complete yet."""
    for end in range(len(text), 0, -1):
        candidate = _close_json(text[:end])
        if candidate is None:
            continue
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def _close_json(prefix: str) -> str | None:
    stack, in_string, escaped = [], False, False
    for char in prefix:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]":
            if not stack:
                return None
            stack.pop()
    if escaped:
        return None
    body = prefix + ('"' if in_string else "")
    if body.rstrip().endswith((",", ":")):
        return None
    return body + "".join(reversed(stack))


@dataclass
class Snapshot:
    """One step of :func:`stream_object`.

    Attributes:
        text: the JSON generated so far.
        partial: what it holds so far (:func:`parse_partial_json`): a dict growing field by field.
        value: the instance of the type, on the last snapshot only (None before).
        token_ids: the tokens generated so far.
    """

    text: str
    partial: Any
    value: Any = None
    token_ids: tuple[int, ...] = ()

    @property
    def done(self) -> bool:
        return self.value is not None


# ------------------------------------------------------------------------------ generation


def guided_prompt(tokenizer: Any, cls: type, prompt: str, *, chat: bool | None = None,
                  system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` with :func:`format_instructions` injected: a chat turn when the
    tokenizer has a chat template (``chat=None``: a transformers tokenizer with one, or mmafm's
    role markers), else the plain text followed by the instructions."""
    instructions = format_instructions(cls)
    content = f"{prompt}\n\n{instructions}"
    has_template = getattr(tokenizer, "chat_template", None) is not None
    chat = (has_template or hasattr(tokenizer, "sp")) if chat is None else chat
    if not chat:
        return list(tokenizer.encode(content + "\n"))
    if has_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    turns = (f"<|system|>{system}<|end|>" if system else "") + f"<|user|>{content}<|end|><|assistant|>"
    return tokenizer.encode(turns, bos=True)


def _prompt_ids(tokenizer: Any, cls: type, prompt: str | Sequence[int], instructions: bool) -> list[int]:
    if isinstance(prompt, str):
        return guided_prompt(tokenizer, cls, prompt) if instructions else list(tokenizer.encode(prompt))
    return [int(t) for t in prompt]


def stream_object(
    model: nn.Module,
    tokenizer: Any,
    cls: type,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    engine: str = "llguidance",
    instructions: bool = True,
    schema: dict | None = None,
) -> Iterator[Snapshot]:
    """Generate an instance of ``cls`` token by token, yielding a :class:`Snapshot` whenever the
    partial object grows; the last snapshot holds the instance (``snapshot.value``).

    Args:
        model: a text decoder (see :func:`~mmafm.inference.generate.decode`).
        tokenizer: its tokenizer (mmafm SentencePiece or transformers byte-level).
        cls: a generable dataclass or pydantic model.
        prompt: the request (format instructions are added, see :func:`guided_prompt`) or
            ready token ids (used as they are).
        max_new_tokens: token limit; reaching it first raises :class:`TokenLimitError`.
        temperature, top_k, top_p, seed: sampling (greedy by default).
        engine: ``"llguidance"`` or ``"xgrammar"``.
        instructions: inject the format instructions into a string prompt.
        schema: a JSON schema to use instead of ``cls``'s (the tool-calling session passes one).

    Raises:
        SchemaError: the engine cannot compile the schema.
        TokenLimitError: the limit came before the object was complete.
    """
    schema = json_schema(cls) if schema is None else schema
    what = getattr(cls, "__name__", "object")
    grammar = make_engine(tokenizer, engine)
    table = grammar.table
    constraint = GrammarConstraint([grammar.matcher(schema, what)], model.config.vocab_size, table.vocab_size)
    ids = _prompt_ids(tokenizer, cls, prompt, instructions)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
    if max_new_tokens < 1:
        raise TokenLimitError(f"the prompt ({len(ids)} tokens) leaves no room in the context of "
                              f"{model.config.max_seq_len} tokens for a {what}")
    tokens: list[int] = []
    last = None
    for step in decode_steps(model, torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=table.eos_ids,
                             generator=generator, constraint=constraint):
        if step.tokens[0] is None:
            break
        tokens.append(step.tokens[0])
        text = table.text(tokens)
        partial = parse_partial_json(text)
        if partial is not None and partial != last:
            last = partial
            yield Snapshot(text, partial, None, tuple(tokens))
    text = table.text(tokens)
    if not constraint.matchers[0].is_accepting():
        raise TokenLimitError(f"the token limit (max_new_tokens={max_new_tokens}) came before the {what} was "
                              f"complete; generated so far: {text[:300]!r}")
    value = json.loads(text)
    yield Snapshot(text, value, instance_from_json(cls, value) if cls is not None else value, tuple(tokens))


def generate_object(model: nn.Module, tokenizer: Any, cls: type, prompt: str | Sequence[int], **options: Any) -> Any:
    """An instance of ``cls`` generated by ``model`` (the options are :func:`stream_object`'s)."""
    snapshot = None
    for snapshot in stream_object(model, tokenizer, cls, prompt, **options):
        pass
    return snapshot.value
