"""Guided generation: 200 generated types through a tiny random-weight model (every output validates
with jsonschema and parses into its type), llguidance's masks against xgrammar's on the same
prefixes, the token-byte table against the tokenizers' decoders, streaming, instructions, errors."""

from __future__ import annotations

import dataclasses
import enum
import json
import random
import re
from typing import Annotated, Literal

import jsonschema
import pytest
import torch

import mmafm
from mmafm.inference import decode
from mmafm.inference.guided import (
    Guide,
    GrammarConstraint,
    SchemaError,
    TokenLimitError,
    format_instructions,
    generable,
    generate_object,
    guided_prompt,
    json_schema,
    make_engine,
    parse_partial_json,
    stream_object,
    token_table,
    unpack_bitmask,
)
from mmafm.tokenizer import train_tokenizer

WORDS = ["red", "blue", "green", "circle", "square", "left", "right", "small", "large", "über", "naïve"]
PATTERNS = [r"[a-z]{2,5}", r"[A-Z][a-z]{1,4}", r"\d{3}-\d{2}", r"(yes|no|maybe)", r"[a-c]+x?", r"#[0-9a-f]{3}"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided_tok")
    texts = [f"a {c} {s} on the {side} with {n} sides" for c in WORDS[:3] for s in WORDS[3:5]
             for side in ("left", "right") for n in range(3, 9)] * 5
    return train_tokenizer(texts, root / "tok", vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size + 4, dim=64, n_layers=2,
                              max_seq_len=1024).eval()  # 4 ids more than the tokenizer: never allowed


# ---------------------------------------------------------------------------- random types


def random_field_type(rng: random.Random, depth: int, counter: list[int]):
    """A random field type with guides: ranges, enums, Literal, patterns, lengths, lists, nesting."""
    kinds = ["int", "float", "bool", "literal", "enum", "pattern", "string", "list", "optional"]
    if depth < 2:
        kinds += ["nested", "nested_list"]
    kind = rng.choice(kinds)
    if kind == "int":
        low = rng.randint(-50, 50)
        return Annotated[int, Guide("a count", minimum=low, maximum=low + rng.randint(0, 200))]
    if kind == "float":
        low = rng.uniform(-10, 10)
        return Annotated[float, Guide(minimum=round(low, 2), maximum=round(low + rng.uniform(0.5, 20), 2))]
    if kind == "bool":
        return bool
    if kind == "literal":
        return Literal[tuple(rng.sample(WORDS, rng.randint(1, 4)))]
    if kind == "enum":
        counter[0] += 1
        return enum.Enum(f"Choice{counter[0]}", {w.upper(): w for w in rng.sample(WORDS[:9], rng.randint(2, 4))})
    if kind == "pattern":
        return Annotated[str, Guide("a code", pattern=rng.choice(PATTERNS))]
    if kind == "string":
        return Annotated[str, Guide(min_length=rng.randint(0, 2), max_length=rng.randint(3, 8))]
    if kind == "list":
        item = rng.choice([Annotated[int, Guide(minimum=0, maximum=9)], Literal["a", "b"], bool,
                           Annotated[str, Guide(pattern=r"[a-z]{1,3}")]])
        low = rng.randint(0, 2)
        return Annotated[list[item], Guide(min_items=low, max_items=low + rng.randint(0, 2))]
    if kind == "optional":
        return Annotated[int, Guide(minimum=0, maximum=99)] | None
    nested = random_type(rng, depth + 1, counter)
    if kind == "nested":
        return nested
    return Annotated[list[nested], Guide(min_items=0, max_items=2)]


def random_type(rng: random.Random, depth: int = 0, counter: list[int] | None = None) -> type:
    counter = counter if counter is not None else [0]
    counter[0] += 1
    fields = [(f"f{i}_{rng.choice(WORDS[:9])}", random_field_type(rng, depth, counter))
              for i in range(rng.randint(1, 4 if depth == 0 else 2))]
    return dataclasses.make_dataclass(f"Generated{counter[0]}", fields)


def to_json(value):
    """An instance back to JSON values (the reference for 'parses into the type')."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def check_instance(value, tp) -> None:
    """``value`` is an instance of annotated type ``tp`` (recursively)."""
    if getattr(tp, "__metadata__", None):
        tp = tp.__origin__
    origin = getattr(tp, "__origin__", None)
    if dataclasses.is_dataclass(tp):
        assert type(value) is tp
        for f in dataclasses.fields(tp):
            check_instance(getattr(value, f.name), f.type)
    elif origin is list:
        assert isinstance(value, list)
        for item in value:
            check_instance(item, tp.__args__[0])
    elif origin is Literal:
        assert value in tp.__args__
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        assert isinstance(value, tp)
    elif tp in (int, float, bool, str):
        assert type(value) is tp, (value, tp)


def masks_agree(tokenizer, schema: dict, tokens: list[int]) -> int:
    """Replay ``tokens`` through llguidance and xgrammar matchers and compare their masks at every
    prefix (and after the last token). Returns how many masks were compared.

    They must be equal over the tokens of plain text (printable ASCII but backslash), with
    one documented difference: where the grammar forces text (a key, the rest of an enum value),
    llguidance allows only the tokens of its canonical tokenization of that text, xgrammar any
    spelling. So over plain-text tokens llguidance's set is inside xgrammar's, and equal to it
    wherever nothing is forced. Outside them the engines differ in strings, as measured here:
    llguidance refuses a raw DEL; in a string with minLength / maxLength, xgrammar 0.2.9 allows
    raw control characters (invalid JSON) and no escapes, llguidance the reverse (correct), and
    they differ on the bytes of a multi-byte character (which count as one character). Inside
    a number with a range their digit-level rules differ at the edges (llguidance allows ``-0``
    and more than 6 decimals, xgrammar not): prefixes ending inside a number are not compared
    (where a number starts they are; every output's numbers are checked by jsonschema)."""
    engines = [make_engine(tokenizer, name) for name in ("llguidance", "xgrammar")]
    matchers = [engine.matcher(schema) for engine in engines]
    table = engines[0].table
    plain = torch.tensor([bool(re.fullmatch(rb"[\x20-\x5b\x5d-\x7e]*", t)) for t in table.tokens])  # (V,)
    bitmasks = [engine.bitmask(1) for engine in engines]
    for count in range(len(tokens) + 1):
        allowed = []
        for matcher, bitmask in zip(matchers, bitmasks):
            matcher.fill(bitmask, 0)
            allowed.append(unpack_bitmask(bitmask, table.vocab_size)[0])
        text = table.text(tokens[:count])
        where = f"after {text!r}"
        assert allowed[0].any(), where
        in_number = re.search(r"[:,\[]-?[0-9][0-9.eE+-]*$|[:,\[]-$", text)
        assert in_number or not (allowed[0] & ~allowed[1] & plain).any(), where  # llguidance's inside xgrammar's
        forced = matchers[0].inner.compute_ff_bytes()
        if forced:  # every allowed token spells the start of the forced text (or all of it and more)
            for token in allowed[0].nonzero().flatten().tolist():
                spelled = table.tokens[token]
                assert forced.startswith(spelled) or spelled.startswith(forced), (where, spelled, forced)
        elif not in_number:
            differ = (allowed[0] ^ allowed[1]) & plain
            assert not differ.any(), (
                where, [(i, table.tokens[i]) for i in differ.nonzero().flatten().tolist()[:8]])
        if count < len(tokens):
            assert matchers[0].accept(tokens[count]), where
            if not matchers[1].accept(tokens[count]):  # only in a number (-0, >6 decimals) may xgrammar refuse
                assert in_number, where
                return count + 1
    return len(tokens) + 1


# ---------------------------------------------------------------------------- the 200 schemas


def test_two_hundred_generated_types_validate_parse_and_the_engines_agree(model, tokenizer):
    rng = random.Random(0)
    table = token_table(tokenizer)
    compared = 0
    for index in range(200):
        cls = generable(random_type(rng))
        schema = json_schema(cls)
        jsonschema.Draft202012Validator.check_schema(schema)
        snapshots = list(stream_object(model, tokenizer, cls, [tokenizer.bos_id, 10 + index % 50],
                                       max_new_tokens=400, temperature=1.0, seed=index))
        final = snapshots[-1]
        value = json.loads(final.text)
        jsonschema.validate(value, schema)  # the output validates ...
        check_instance(final.value, cls)  # ... parses into the type ...
        assert to_json(final.value) == value  # ... and nothing is lost on the way
        assert all(s.value is None for s in snapshots[:-1])
        compared += masks_agree(tokenizer, schema, list(final.token_ids))
    assert compared > 2000


# ---------------------------------------------------------------------------- the token-byte table


def test_token_table_round_trips_every_id_through_the_decoder(tokenizer):
    sp, table = tokenizer.sp, token_table(tokenizer)
    anchor = sp.piece_to_id("<0x41>")
    for token in range(tokenizer.vocab_size):
        if token in table.special:
            assert table.tokens[token] == b""
        elif sp.is_byte(token):  # a byte piece: completes valid UTF-8 with a partner byte
            byte = table.tokens[token][0]
            if byte < 0x80:
                assert sp.decode([anchor, token], out_type=bytes) == b"A" + bytes([byte])
            elif 0xC2 <= byte <= 0xDF:  # a 2-byte lead: decode it with a continuation byte
                follow = sp.piece_to_id("<0x80>")
                assert sp.decode([token, follow], out_type=bytes) == bytes([byte, 0x80])
            elif 0x80 <= byte <= 0xBF:  # a continuation byte: after the lead 0xC3
                assert sp.decode([sp.piece_to_id("<0xC3>"), token], out_type=bytes) == bytes([0xC3, byte])
        else:
            assert sp.decode([anchor, token], out_type=bytes) == b"A" + table.tokens[token]
    # whole texts: spaces ("▁"), byte fallback (é, emoji, CJK), digits
    for text in ["a red circle on the left", "  two  spaces", "naïve über café 😀 漢字", "1234 sides", "x\ty\nz"]:
        ids = tokenizer.encode(text)
        assert b"".join(table.tokens[i] for i in [anchor] + ids) == sp.decode([anchor] + ids, out_type=bytes)
        assert table.text(ids).removeprefix(" ") == text  # SentencePiece's dummy prefix: one leading space
    assert {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.token_id("<|user|>")} <= table.special
    assert table.duplicates and all(sp.is_byte(i) for i in table.duplicates)  # "<0x61>" next to "a"


@pytest.mark.slow
def test_smollm2_token_table_matches_llguidance_reading_of_the_tokenizer():
    """SmolLM2's byte-level table against llguidance's own reading of the transformers tokenizer
    (an independent implementation), every id; and round trips of texts."""
    pytest.importorskip("gguf")
    from llguidance.hf import from_tokenizer

    from mmafm.interop.smollm2 import load_smollm2_tokenizer

    try:
        hf_tokenizer = load_smollm2_tokenizer()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    table, reference = token_table(hf_tokenizer), from_tokenizer(hf_tokenizer)
    for token in range(len(hf_tokenizer)):
        if token not in table.special:
            assert table.tokens[token] == reference.decode_bytes([token]), token
    for text in ["Hello, world!", " naïve café 😀", "{\"a\": [1, 2]}"]:
        ids = hf_tokenizer(text, add_special_tokens=False).input_ids
        assert table.text(ids) == text


# ---------------------------------------------------------------------------- API behaviour


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@generable
@dataclasses.dataclass
class Part:
    """A part of a shape."""

    name: Annotated[str, Guide("the part's name", pattern=r"[a-z]{2,6}")]
    count: Annotated[int, Guide(minimum=1, maximum=4)]


@generable
@dataclasses.dataclass
class Shape:
    colour: Colour
    kind: Literal["circle", "square"]
    sides: Annotated[int, Guide("number of sides", minimum=3, maximum=12)]
    parts: Annotated[list[Part], Guide(min_items=1, max_items=2)]
    ratio: Annotated[float, Guide(minimum=0.0, maximum=1.0)]
    note: int | None


def test_schema_keeps_declaration_order_and_guides():
    schema = json_schema(Shape)
    assert list(schema["properties"]) == ["colour", "kind", "sides", "parts", "ratio", "note"]
    assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False
    assert schema["properties"]["colour"] == {"enum": ["red", "blue"]}
    assert schema["properties"]["sides"] == {"type": "integer", "minimum": 3, "maximum": 12,
                                             "description": "number of sides"}
    part = schema["properties"]["parts"]
    assert (part["minItems"], part["maxItems"]) == (1, 2) and part["items"]["description"] == "A part of a shape."
    assert part["items"]["properties"]["name"]["pattern"] == "^(?:[a-z]{2,6})$"
    assert schema["properties"]["note"]["anyOf"][1] == {"type": "null"}
    text = format_instructions(Shape)
    assert "colour" in text and "number of sides; from 3 to 12" in text and '"minItems":1' in text
    with pytest.raises(SchemaError, match="Bad.when.*cannot be generated"):
        @generable
        @dataclasses.dataclass
        class Bad:
            when: dict


def test_typed_generation_streams_snapshots_and_returns_an_instance(model, tokenizer):
    ids = guided_prompt(tokenizer, Shape, "Describe a shape.")
    prompt = tokenizer.decode(ids)  # the format instructions are in the prompt, then the assistant turn opens
    assert "sides (integer): number of sides; from 3 to 12" in prompt and prompt.endswith("<|assistant|>")
    snapshots = list(stream_object(model, tokenizer, Shape, "Describe a shape.", temperature=1.0, seed=3))
    shape = snapshots[-1].value
    assert isinstance(shape, Shape) and isinstance(shape.colour, Colour) and isinstance(shape.parts[0], Part)
    assert 3 <= shape.sides <= 12 and 1 <= len(shape.parts) <= 2
    keys = [list(s.partial) for s in snapshots if isinstance(s.partial, dict)]
    assert keys[-1] == list(json_schema(Shape)["properties"])  # all fields, in order ...
    assert all(k == keys[-1][: len(k)] for k in keys)  # ... growing field by field
    assert len(snapshots) > 5
    other = generate_object(model, tokenizer, Shape, "Describe a shape.", temperature=1.0, seed=3, engine="xgrammar")
    assert isinstance(other, Shape)  # the second engine works too (its tokens may differ: see masks_agree)


def test_pydantic_models_are_generable(model, tokenizer):
    from pydantic import BaseModel, Field

    @generable
    class Item(BaseModel):
        label: Literal["red", "blue"]
        size: int = Field(ge=2, le=9, description="size")
        tags: list[str] = Field(min_length=1, max_length=2)

    item = generate_object(model, tokenizer, Item, [tokenizer.bos_id], temperature=1.0, seed=0, max_new_tokens=300)
    assert isinstance(item, Item) and 2 <= item.size <= 9 and 1 <= len(item.tags) <= 2


def test_clear_errors(model, tokenizer):
    with pytest.raises(TokenLimitError, match="max_new_tokens=5.*Shape"):
        generate_object(model, tokenizer, Shape, [tokenizer.bos_id], max_new_tokens=5)

    @dataclasses.dataclass
    class Lookahead:
        code: Annotated[str, Guide(pattern=r"(?=a)a+")]  # Python compiles it; the engine cannot

    with pytest.raises(SchemaError, match="llguidance cannot compile the schema of Lookahead"):
        generate_object(model, tokenizer, Lookahead, [tokenizer.bos_id])
    with pytest.raises(ValueError, match="minimum 5 > maximum 1"):
        Guide(minimum=5, maximum=1)


def test_the_decode_loop_hook_masks_every_row(model, tokenizer):
    engine = make_engine(tokenizer)
    schema = {"type": "object", "properties": {"k": {"enum": ["left", "right"]}}, "required": ["k"],
              "additionalProperties": False}
    constraint = GrammarConstraint([engine.matcher(schema), engine.matcher(schema)], model.config.vocab_size,
                                   engine.table.vocab_size)
    out = decode(model, torch.tensor([[2, 30], [2, 40]]), max_new_tokens=30, constraint=constraint,
                 stop_tokens=engine.table.eos_ids)
    for row in out.tokens:
        assert json.loads(engine.table.text(row))["k"] in ("left", "right")


def test_partial_json():
    assert parse_partial_json('{"a":1,"b":"x') == {"a": 1, "b": "x"}
    assert parse_partial_json('{"a":1,"b') == {"a": 1}
    assert parse_partial_json('{"a":[1,{"c":tr') == {"a": [1, {}]}
    assert parse_partial_json('{"a":"q\\"') == {"a": 'q"'}
    assert parse_partial_json("") is None


@pytest.mark.slow
def test_guided_generation_notebook_runs_on_a_tiny_model(tmp_path):
    """notebooks/guided_generation.ipynb end to end (papermill, mmafm kernel) on a random tiny model."""
    import papermill
    from pathlib import Path

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "guided_generation.ipynb"
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="mmafm", progress_bar=False,
                               parameters={"smollm2": False, "max_new_tokens": 300, "speculative_tokens": 8,
                                           "threads": 1, "out_dir": str(tmp_path)})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["typed"]["value"].startswith("City(") and results["speculative"]["identical"]
    assert results["tools"]["turns"][:3] == ["system", "user", "assistant"]
