"""Text -> token ids with a version's own tokenizer, and padding into inference batches."""

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Encoding, Tokenizer

from service.errors import InvalidRequest

TOKENIZER_FILE = "tokenizer.json"

# Which end of an input over the token limit is cut off.
Direction = Literal["right", "left"]


@dataclass(frozen=True)
class TokenBatch:
    """Padded token ids of several inputs; padding positions have attention_mask 0."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


class TextTokenizer:
    """A version's tokenizer, limited to its ``max_seq_length`` tokens (special tokens included)."""

    def __init__(self, tokenizer_path: Path, max_seq_length: int) -> None:
        self.max_seq_length = max_seq_length
        self._untruncated = Tokenizer.from_file(str(tokenizer_path))
        self._untruncated.no_padding()
        self._untruncated.no_truncation()
        self._truncating = Tokenizer.from_file(str(tokenizer_path))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_seq_length)
        self._left_truncating = Tokenizer.from_file(str(tokenizer_path))
        self._left_truncating.no_padding()
        self._left_truncating.enable_truncation(max_seq_length, direction="left")
        self.pad_id = self._truncating.token_to_id("[PAD]") or 0
        self.vocab_size = self._truncating.get_vocab_size()
        self.mask_id = self._truncating.token_to_id("[MASK]")
        self.special_ids = [
            token_id
            for token in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
            if (token_id := self._truncating.token_to_id(token)) is not None
        ]

    def encode(self, texts: list[str], *, truncate: bool, direction: Direction = "right") -> list[list[int]]:
        """Token ids of each text: cut to ``max_seq_length`` with ``truncate`` (its end cut off, or its start
        with ``direction="left"``), else whole (an input longer than the limit is the caller's to refuse,
        with ``TooManyTokens``)."""
        if not truncate:
            encoder = self._untruncated
        else:
            encoder = self._left_truncating if direction == "left" else self._truncating
        # The ids only: encode_batch_fast leaves out the character offsets, ~15 % of a short input's time.
        return [encoding.ids for encoding in encoder.encode_batch_fast(texts)]

    def tokens(self, texts: list[str], *, add_special_tokens: bool) -> list[list["Token"]]:
        """Each text's tokens, whole (never truncated): id, the piece of the text it stands for, and where that
        piece is as UTF-8 byte offsets (None for special tokens, which stand for no text)."""
        encodings = self._untruncated.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [_tokens(text, encoding) for text, encoding in zip(texts, encodings, strict=True)]


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # the token itself for a special token, else the slice of the input it covers
    special: bool
    start: int | None  # UTF-8 byte offsets into the input
    stop: int | None


def _tokens(text: str, encoding: Encoding) -> list[Token]:
    # The tokenizer counts offsets in characters; byte offsets are what other servers (TEI) return.
    byte_at = None if text.isascii() else [0, *accumulate(len(char.encode()) for char in text)]
    tokens: list[Token] = []
    for token_id, token, (start, stop), special in zip(
        encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask, strict=True
    ):
        if special:
            tokens.append(Token(token_id, token, special=True, start=None, stop=None))
        else:
            piece = text[start:stop]
            if byte_at is not None:
                start, stop = byte_at[start], byte_at[stop]
            tokens.append(Token(token_id, piece, special=False, start=start, stop=stop))
    return tokens


class TooManyTokens(InvalidRequest):
    """Input ``index`` of a request has more tokens than the model takes (and truncation is off)."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(
            f"input[{index}] has {tokens} tokens, over this model's limit of {limit}; "
            "shorten it or split it into several inputs.",
            param="input",
            code="context_length_exceeded",
        )


def pad_batch(token_ids: list[list[int]], pad_id: int) -> TokenBatch:
    """Right-pad ``token_ids`` to the longest one."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask)
