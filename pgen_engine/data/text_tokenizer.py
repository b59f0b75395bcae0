"""Text tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``.

A checkpoint folder with Hugging Face tokenizer files is loaded through
``transformers.AutoTokenizer``; without one (tiny test/demo models) a built-in byte-level
tokenizer is used whose ids follow :meth:`SpecialTokens.builtin` (0 pad, 1 bos, 2 eos,
3 boi, 4 eoi, 5 image) with byte ``b`` at id ``6 + b``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import PgenUserError
from ..models.special_tokens import SpecialTokens

BYTE_OFFSET = 6
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without any special token."""

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (special ids are dropped)."""


class ByteTokenizer:
    """UTF-8 bytes shifted by 6; ids 0..5 are the built-in specials."""

    vocab_size = BYTE_OFFSET + 256

    def __init__(self, special: SpecialTokens | None = None):
        special = special or SpecialTokens.builtin()
        if special != SpecialTokens.builtin():
            raise ValueError(f"the built-in byte tokenizer needs SpecialTokens.builtin() ids, got {special}")
        self.special = special

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps a ``transformers`` tokenizer so ``encode`` never adds special tokens."""

    def __init__(self, tok, special: SpecialTokens):
        self.tok = tok
        self.special = special
        self.vocab_size = len(tok)
        self._special_ids = set(special.as_dict().values())

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self._special_ids], skip_special_tokens=True)


class TokenizerError(PgenUserError, ValueError):
    """A checkpoint's tokenizer files cannot be loaded or cannot hold the special ids (one line for the user)."""


def load_text_tokenizer(checkpoint_dir: str | os.PathLike | None, special: SpecialTokens) -> ByteTokenizer | HFTokenizer:
    """The checkpoint's HF tokenizer when ``checkpoint_dir`` holds one, else the byte tokenizer.

    Raises TokenizerError (a ValueError) when the tokenizer files cannot be loaded or the HF
    tokenizer's vocabulary cannot hold the special ids; ValueError when falling back to bytes
    with non-built-in special ids.
    """
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: checkpoint folder does not exist")
        if any((d / f).is_file() for f in HF_TOKENIZER_FILES):
            # late import: transformers takes seconds to import; only tokenizer files need it
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(d))
            except Exception as e:  # transformers' loaders raise many types (JSONDecodeError, OSError, ...)
                files = [f for f in HF_TOKENIZER_FILES if (d / f).is_file()]
                raise TokenizerError(f"{d}: cannot load the tokenizer ({', '.join(files)}): {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
            tok = HFTokenizer(hf, special)
            top = max(special.as_dict().values())
            if top >= tok.vocab_size:
                raise TokenizerError(f"{d}: tokenizer vocab size {tok.vocab_size} cannot hold special id {top}")
            return tok
    return ByteTokenizer(special)
