"""SentencePiece BPE tokenizer trained as the reports specify (AFM 2024 section 3.1; 2025 report).

"SentencePiece BPE, numbers split into individual digits, byte fallback, no Unicode
normalization" (REFERENCE.md, Tokenizer [paper]). So:

- ``model_type="bpe"``, ``split_digits=True``: "2024" is always "2" "0" "2" "4";
- ``byte_fallback=True``: a character never seen in training becomes its UTF-8 bytes
  (``<0xF0>`` ...) instead of ``<unk>``, so every string round-trips through encode/decode;
- ``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False``: text is not
  NFKC-folded or whitespace-collapsed (code and tables keep their spacing).

Special tokens, reserved ids in this order: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (BOS),
``</s>`` 3 (EOS), then the chat-role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``,
``<|end|>`` and the image placeholder ``<image>`` (where a vision-language model splices its
image tokens), each always one piece.

Vocabulary presets of the reports (``VOCAB_PRESETS``): 49,152 (AFM-on-device 2024), 100,000
(AFM-server 2024), 153,600 (2025 on-device; "150k" in the report). They need a large corpus;
the tiny pipeline trains a 2,048-piece vocabulary on the bundled text in a few seconds.

Contrastive text towers (:mod:`mmafm.models.clip`) read captions through :class:`CaptionTokenizer`:
fixed-length rows ``[start] ids [end] [pad]...`` made with this tokenizer or with open_clip's
bundled BPE (``"openclip"``, no download); :func:`load_caption_tokenizer` rebuilds one from the
spec a CLIP checkpoint records.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import sentencepiece as spm
import torch

if TYPE_CHECKING:  # the tokenizer sits below the models: no runtime import of them
    from mmafm.models.clip import TextTowerConfig

__all__ = [
    "Tokenizer",
    "train_tokenizer",
    "CaptionTokenizer",
    "load_caption_tokenizer",
    "OPENCLIP_TOKENIZER",
    "SPECIAL_TOKENS",
    "CHAT_TOKENS",
    "IMAGE_TOKEN",
    "VOCAB_PRESETS",
]

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = CHAT_TOKENS + (IMAGE_TOKEN,)
VOCAB_PRESETS = {
    "afm_device_2024": 49_152,  # AFM-on-device 2024, paper Table 1
    "afm_server_2024": 100_000,  # AFM-server 2024
    "afm_2025": 153_600,  # 2025 on-device (report: "150k"; teardown: 153,600)
}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# 256 byte pieces + 4 control + 5 special tokens, plus room for characters and merges.
MIN_VOCAB_SIZE = 300
OPENCLIP_TOKENIZER = "openclip"  # caption tokenizer spec: open_clip's bundled BPE (49,408 tokens)


def train_tokenizer(
    texts_or_file: str | Path | Iterable[str],
    out_prefix: str | Path,
    vocab_size: int = 2048,
    character_coverage: float = 0.9995,
    max_sentences: int = 200_000,
    max_sentence_length: int = 16_384,
    seed: int = 0,
    num_threads: int = 2,
) -> "Tokenizer":
    """Train the BPE model and write ``<out_prefix>.model`` and ``<out_prefix>.vocab``.

    Args:
        texts_or_file: a text file (one training sentence per line) or an iterable of strings
            (each may hold newlines; each line becomes one training sentence).
        out_prefix: output path without extension, e.g. ``runs/x/tokenizer/tokenizer``.
        vocab_size: number of pieces including special tokens and the 256 byte pieces.
        character_coverage: fraction of characters given their own piece; the rest fall back
            to bytes.
        max_sentences: sentences sampled for training (SentencePiece ``input_sentence_size``).
        max_sentence_length: longer lines (in bytes) are skipped by SentencePiece.
        seed: sampling seed, for reproducible vocabularies.
        num_threads: trainer threads.

    Returns:
        The trained :class:`Tokenizer`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte pieces + specials), got {vocab_size}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    options = dict(
        model_prefix=str(out_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(SPECIAL_TOKENS),
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        hard_vocab_limit=False,  # a tiny corpus may not support every merge; don't fail on it
        num_threads=num_threads,
        minloglevel=2,
    )
    spm.set_random_generator_seed(seed)
    if isinstance(texts_or_file, (str, Path)):
        path = Path(texts_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {path}")
        spm.SentencePieceTrainer.train(input=str(path), **options)
    else:
        lines = [line for text in texts_or_file for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError("no text to train the tokenizer on (all texts empty)")
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), **options)
    return Tokenizer.load(out_prefix.with_suffix(".model"))


class Tokenizer:
    """A trained SentencePiece model with mmafm's special tokens."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | Path | None = None):
        self.sp = processor
        self.path = Path(path) if path is not None else None
        missing = [tok for tok in SPECIAL_TOKENS if self.sp.piece_to_id(tok) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"tokenizer {path} lacks special tokens {missing}; train it with train_tokenizer")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load ``tokenizer.model`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path} (run the 00_data stage to train one)")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a SentencePiece model: {err}") from err
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def image_id(self) -> int:
        return self.sp.piece_to_id(IMAGE_TOKEN)

    def token_id(self, piece: str) -> int:
        """The id of a special token such as ``"<|user|>"``."""
        token = self.sp.piece_to_id(piece)
        if token == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            raise KeyError(f"{piece!r} is not a piece of this tokenizer")
        return token

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their single id."""
        ids = self.sp.encode(text, out_type=int)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        ids = self.sp.encode(list(texts), out_type=int)
        return [([self.bos_id] if bos else []) + row + ([self.eos_id] if eos else []) for row in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; BOS/EOS/PAD are dropped, byte pieces are reassembled into UTF-8."""
        return self.sp.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def to_bytes(self) -> bytes:
        return self.sp.serialized_model_proto()

    def describe(self) -> dict:
        """What a run records about the tokenizer (meta.json, manifests)."""
        return {
            "path": str(self.path) if self.path else None,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "image_id": self.image_id,
            "special_tokens": {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS},
        }

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------ caption tokenizer
class CaptionTokenizer:
    """Captions -> ``(B, context_length)`` token ids laid out ``[start] ids [end] [pad]...``.

    Long captions are truncated, keeping the end token last (as open_clip does).

    Args:
        encode: ``text -> list of ids`` without special tokens.
        vocab_size: Size of the id space.
        context_length: Tokens per caption, start and end included.
        eot_id: End-of-text id (the text tower pools there).
        pad_id: Padding id.
        sot_id: Start-of-text id, or None for no start token.
        spec: What :func:`load_caption_tokenizer` rebuilds it from (saved in checkpoints).
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        vocab_size: int,
        context_length: int,
        eot_id: int,
        pad_id: int,
        sot_id: int | None = None,
        spec: str = "",
    ):
        if context_length < 2 + (sot_id is not None):
            raise ValueError(f"context_length {context_length} leaves no room for a caption token")
        self.encode = encode
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.sot_id = sot_id
        self.spec = spec

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:  # (B, T)
        if isinstance(texts, str):
            texts = [texts]
        prefix = [] if self.sot_id is None else [self.sot_id]
        room = self.context_length - len(prefix) - 1
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = prefix + list(self.encode(text))[:room] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def text_config(self, base: "TextTowerConfig") -> "TextTowerConfig":
        """``base`` with this tokenizer's vocabulary, context, end and pad ids."""
        return replace(
            base, vocab_size=self.vocab_size, context_length=self.context_length,
            eot_id=self.eot_id, pad_id=self.pad_id,
        )


def _openclip_tokenizer(context_length: int) -> CaptionTokenizer:
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()  # vocab ships inside the open_clip package: no download
    return CaptionTokenizer(
        bpe.encode, bpe.vocab_size, context_length, eot_id=bpe.eot_token_id, pad_id=0,
        sot_id=bpe.sot_token_id, spec=OPENCLIP_TOKENIZER,
    )


def _sentencepiece_caption_tokenizer(path: str, context_length: int) -> CaptionTokenizer:
    if not Path(path).exists():
        raise FileNotFoundError(
            f"tokenizer {path} not found: pass the data stage's `tokenizer` output, or 'openclip'"
        )
    tok = Tokenizer.load(path)
    ids = {name: getattr(tok, name, None) for name in ("bos_id", "eos_id", "pad_id")}
    if ids["eos_id"] is None or ids["eos_id"] < 0:
        raise ValueError(f"tokenizer {path} has no end-of-sequence id; CLIP pools at it")
    pad = ids["pad_id"] if ids["pad_id"] is not None and ids["pad_id"] >= 0 else ids["eos_id"]
    bos = ids["bos_id"] if ids["bos_id"] is not None and ids["bos_id"] >= 0 else None
    return CaptionTokenizer(
        lambda text: list(tok.encode(text)), int(tok.vocab_size), context_length,
        eot_id=ids["eos_id"], pad_id=pad, sot_id=bos, spec=str(path),
    )


def load_caption_tokenizer(spec: str, context_length: int) -> CaptionTokenizer:
    """``"openclip"`` (open_clip's bundled BPE) or a path to the data stage's tokenizer."""
    if not spec:
        raise ValueError("tokenizer spec is empty: pass 'openclip' or the data stage's tokenizer path")
    if spec == OPENCLIP_TOKENIZER:
        return _openclip_tokenizer(context_length)
    return _sentencepiece_caption_tokenizer(spec, context_length)
