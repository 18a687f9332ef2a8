"""Vocabulary extension (mmafm.train.vocab): the tokenizer grows without moving a base id, the
model's new rows are the means of their sub-pieces, and base-only inputs give the base's logits."""

import pytest
import torch

import mmafm
from mmafm.checkpoint import load_model, save_model
from mmafm.data.synthetic_text import code_documents
from mmafm.data.text_sources import wordnet_documents
from mmafm.tokenizer import SPECIAL_TOKENS, train_tokenizer
from mmafm.train.vocab import extend_tokenizer, extend_vocabulary, piece_decomposition, tokens_per_byte

_SPACE = "\u2581"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    prose = [text for _, text in wordnet_documents(limit=600, seed=0)]
    base = train_tokenizer(prose, root / "base", vocab_size=600)
    code = [text for _, text in code_documents(limit=300, seed=0)]
    extended = extend_tokenizer(base, code, 760, root / "extended")
    held_out = [text for _, text in code_documents(limit=40, seed=1)]
    return base, extended, held_out


def test_base_ids_are_kept_and_the_size_is_exact(tokenizers):
    base, extended, held_out = tokenizers
    assert extended.vocab_size == 760
    assert [extended.sp.id_to_piece(i) for i in range(base.vocab_size)] == \
        [base.sp.id_to_piece(i) for i in range(base.vocab_size)]
    for token in SPECIAL_TOKENS:
        assert extended.token_id(token) == base.token_id(token)
    for text in held_out:
        assert extended.decode(extended.encode(text)) == text


def test_new_pieces_are_used_and_cut_tokens_per_byte_on_the_new_domain(tokenizers):
    base, extended, held_out = tokenizers
    ids = [i for text in held_out for i in extended.encode(text)]
    assert max(ids) >= base.vocab_size  # appended merges are reachable by SentencePiece's BPE
    assert tokens_per_byte(extended, held_out) < 0.9 * tokens_per_byte(base, held_out)


def test_decomposition_spells_the_piece(tokenizers):
    base, extended, _ = tokenizers
    for i in range(base.vocab_size, extended.vocab_size):
        piece = extended.sp.id_to_piece(i)
        spelled = b"".join(_piece_bytes(base.sp.id_to_piece(j)) for j in piece_decomposition(base, piece))
        assert spelled == _piece_bytes(piece)


def _piece_bytes(piece: str) -> bytes:
    """A piece's UTF-8 bytes: byte-fallback pieces ``<0xNN>`` are one byte, the space mark a space."""
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace(_SPACE, " ").encode("utf-8")


@pytest.mark.parametrize("tied", [True, False])
def test_extended_model_rows_and_logits(tokenizers, tied, tmp_path):
    base, extended, _ = tokenizers
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=base.vocab_size, tie_embeddings=tied).eval()
    ids = torch.randint(0, base.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(ids)
        old_embed = model.embed.weight.clone()
    extend_vocabulary(model, base, extended)
    assert model.config.vocab_size == extended.vocab_size
    assert torch.equal(model.embed.weight[: base.vocab_size], old_embed)
    # a new row by hand: the mean of the base rows its text tokenizes to
    piece_id = base.vocab_size + 3
    parts = piece_decomposition(base, extended.sp.id_to_piece(piece_id))
    torch.testing.assert_close(model.embed.weight[piece_id], old_embed[parts].mean(0))
    with torch.no_grad():
        after = model(ids)
    assert after.shape[-1] == extended.vocab_size
    torch.testing.assert_close(after[..., : base.vocab_size], before, rtol=0, atol=1e-5)
    # new columns: the final hidden states times the new rows
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
    torch.testing.assert_close(after[..., piece_id], hidden @ model.output_weight()[piece_id], rtol=1e-5, atol=1e-5)
    # a checkpoint of the extended model rebuilds at the new size with the same logits
    path = save_model(tmp_path / "extended.safetensors", model)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).eval()(ids), after)


def test_bad_inputs_are_named(tokenizers, tmp_path):
    base, extended, _ = tokenizers
    with pytest.raises(ValueError, match="must exceed"):
        extend_tokenizer(base, ["x"], base.vocab_size, tmp_path / "t")
    with pytest.raises(ValueError, match="new pieces"):
        extend_tokenizer(base, ["ab ab ab"] * 5, base.vocab_size + 500, tmp_path / "t")
    assert not list(tmp_path.glob("t*"))  # nothing half-written
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=base.vocab_size + 1)
    with pytest.raises(ValueError, match="the model has"):
        extend_vocabulary(model, base, extended)
    unrelated = train_tokenizer([text for _, text in code_documents(limit=300, seed=2)], tmp_path / "other",
                                vocab_size=base.vocab_size + 10)  # larger, but its first ids are other pieces
    with pytest.raises(ValueError, match="not an extension"):
        extend_vocabulary(mmafm.create_model("afm_2024_device_tiny", vocab_size=base.vocab_size), base, unrelated)
