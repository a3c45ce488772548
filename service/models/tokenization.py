"""Text -> token ids with a version's own tokenizer, and padding into inference batches."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.errors import InvalidRequest

TOKENIZER_FILE = "tokenizer.json"


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
        self.pad_id = self._truncating.token_to_id("[PAD]") or 0
        self.vocab_size = self._truncating.get_vocab_size()
        self.mask_id = self._truncating.token_to_id("[MASK]")
        self.special_ids = [
            token_id
            for token in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
            if (token_id := self._truncating.token_to_id(token)) is not None
        ]

    def encode(self, texts: list[str], *, truncate: bool) -> list[list[int]]:
        """Token ids of each text: cut at ``max_seq_length`` with ``truncate``, else whole (an input longer
        than the limit is the caller's to refuse, with ``TooManyTokens``)."""
        encoder = self._truncating if truncate else self._untruncated
        return [encoding.ids for encoding in encoder.encode_batch(texts)]


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
