"""The SentencePiece BPE tokenizer: digits split, byte fallback, no normalization, special tokens.

Trained on a small corpus made here (no data package needed); checks are closed-form: the
UTF-8 bytes of a character, the digits of a number, NFKC's folding of full-width letters.
"""

import random
import unicodedata

import pytest

from mmafm.data.synthetic import generate_pairs
from mmafm.tokenizer import CHAT_TOKENS, IMAGE_TOKEN, MIN_VOCAB_SIZE, SPECIAL_TOKENS, VOCAB_PRESETS, Tokenizer, train_tokenizer


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = "the a of and to in is was for on with as by at from that this which year price".split()
    texts = [pair.caption for pair in generate_pairs(300, seed=0, image_size=16)]
    for _ in range(400):
        sentence = " ".join(rng.choice(words) for _ in range(12))
        texts.append(f"{sentence} {rng.randint(0, 99999)} dollars in {rng.randint(1900, 2030)}.")
    return texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(_corpus(), tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=512)


def test_special_token_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    ids = [tokenizer.token_id(tok) for tok in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tokenizer.unk_id not in ids
    assert tokenizer.image_id == tokenizer.token_id(IMAGE_TOKEN)
    text = f"{CHAT_TOKENS[1]}what is in {IMAGE_TOKEN}?{CHAT_TOKENS[3]}"
    pieces = tokenizer.pieces(text)
    for tok in (CHAT_TOKENS[1], IMAGE_TOKEN, CHAT_TOKENS[3]):
        assert pieces.count(tok) == 1, f"{tok} not kept as one piece: {pieces}"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(KeyError):
        tokenizer.token_id("<|nonexistent|>")


def test_digits_are_split(tokenizer):
    text = "in 2024 it cost 1234567 dollars"
    pieces = tokenizer.pieces(text)
    digit_pieces = [p.replace("\u2581", "") for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "20241234567"
    assert all(len(p) == 1 for p in digit_pieces), pieces


def test_byte_fallback_roundtrips_unseen_characters(tokenizer):
    for char in ("🦄", "猫", "Ω"):
        pieces = tokenizer.pieces(char)
        byte_pieces = [p for p in pieces if p.startswith("<0x")]
        assert [int(p[3:5], 16) for p in byte_pieces] == list(char.encode("utf-8")), pieces
        assert tokenizer.unk_id not in tokenizer.encode(char)
    text = "a unicorn 🦄 and a cat 猫, naïve café"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_no_normalization(tokenizer):
    full_width = "ＡＢＣ"
    assert unicodedata.normalize("NFKC", full_width) == "ABC"  # what a normalizing tokenizer would see
    assert tokenizer.encode(full_width) != tokenizer.encode("ABC")
    for text in (full_width, "two  spaces\tand a tab", "  leading spaces"):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_eos_and_batch(tokenizer):
    ids = tokenizer.encode("a red circle", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "a red circle"
    assert tokenizer.encode_batch(["a red circle", "two"], eos=True) == [
        tokenizer.encode("a red circle", eos=True),
        tokenizer.encode("two", eos=True),
    ]


def test_load_and_vocab_size(tokenizer, tmp_path):
    again = Tokenizer.load(tokenizer.path)
    assert again.vocab_size == tokenizer.vocab_size == 512
    assert Tokenizer.load(tokenizer.path.parent).path == tokenizer.path  # a folder finds tokenizer.model
    text = "three large blue stars at the top"
    assert again.encode(text) == tokenizer.encode(text)
    with pytest.raises(FileNotFoundError, match="00_data"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_training_is_deterministic(tokenizer, tmp_path):
    other = train_tokenizer(_corpus(), tmp_path / "tokenizer", vocab_size=512)
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert [other.sp.id_to_piece(i) for i in range(other.vocab_size)] == pieces


def test_training_input_errors(tmp_path):
    with pytest.raises(ValueError, match=f">= {MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "   "], tmp_path / "t", vocab_size=512)
    with pytest.raises(FileNotFoundError):
        train_tokenizer(tmp_path / "nope.txt", tmp_path / "t", vocab_size=512)


def test_train_from_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_corpus()))
    tok = train_tokenizer(corpus, tmp_path / "tokenizer", vocab_size=400)
    assert tok.vocab_size == 400 and tok.path == tmp_path / "tokenizer.model"


def test_presets_are_the_reports_sizes():
    assert sorted(VOCAB_PRESETS.values()) == [49_152, 100_000, 153_600]
