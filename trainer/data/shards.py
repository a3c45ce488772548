"""Prepared corpora on disk: tokenised training documents in flat memory-mapped arrays, and the held-out
texts one per line. Readers map the files and touch only the pages of the documents they read, so a
process's memory does not grow with the corpus.

A prepared folder holds (besides ``manifest.json``, see trainer.data.prepare):

- ``tokens.bin``: every training document's token ids (no special tokens), one document after another,
  as little-endian uint16 (a vocabulary under 65,536) or uint32;
- ``documents.bin``: int64 pairs, one per document plus an end row: where the document's tokens start in
  ``tokens.bin`` and where its sentences start in ``sentences.bin``;
- ``sentences.bin``: int64, where each sentence starts in ``tokens.bin`` (a sentence ends where the next, or
  its document, ends), so inverse-cloze views work in token space;
- ``validation.txt``: the held-out texts, prepared, one per line (a prepared text holds no line break).
"""

from collections.abc import Iterator, Sequence
from itertools import islice, pairwise
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np

from trainer.data.documents import Document

TOKENS_FILE, DOCUMENTS_FILE, SENTENCES_FILE, VALIDATION_FILE = (
    "tokens.bin",
    "documents.bin",
    "sentences.bin",
    "validation.txt",
)


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The narrowest unsigned type that holds every id of a vocabulary of ``vocab_size``."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class ShardWriter:
    """Appends tokenised documents to the three arrays of a prepared folder."""

    def __init__(self, folder: Path, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self._tokens: BinaryIO = (folder / TOKENS_FILE).open("wb")
        self._documents: BinaryIO = (folder / DOCUMENTS_FILE).open("wb")
        self._sentences: BinaryIO = (folder / SENTENCES_FILE).open("wb")
        self.tokens = self.sentences = self.documents = 0

    def add(self, documents: Sequence[Document]) -> None:
        rows, starts, bodies = [], [], []
        for document in documents:
            rows.append((self.tokens, self.sentences))
            for sentence in document.sentences:
                starts.append(self.tokens)
                bodies.append(sentence)
                self.tokens += len(sentence)
                self.sentences += 1
        self.documents += len(documents)
        self._documents.write(np.asarray(rows, dtype="<i8").reshape(-1, 2).tobytes())
        self._sentences.write(np.asarray(starts, dtype="<i8").tobytes())
        flat = np.fromiter((token for body in bodies for token in body), dtype=self.dtype, count=sum(map(len, bodies)))
        self._tokens.write(flat.tobytes())

    def close(self) -> None:
        self._documents.write(np.asarray([self.tokens, self.sentences], dtype="<i8").tobytes())  # the end row
        for handle in (self._tokens, self._documents, self._sentences):
            handle.close()


def _map(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...] | None = None) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        return np.zeros(shape or 0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class TokenShards:
    """The training documents of a prepared folder, memory-mapped on first use (so a copy sent to a
    DataLoader worker maps the files itself instead of carrying them)."""

    def __init__(self, folder: Path, count: int, dtype: np.dtype[Any], head: list[int], tail: list[int]) -> None:
        self.folder, self.count, self.dtype, self.head, self.tail = folder, count, dtype, head, tail
        self._maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = (
                _map(self.folder / TOKENS_FILE, self.dtype),
                _map(self.folder / DOCUMENTS_FILE, np.dtype("<i8"), (self.count + 1, 2)),
                _map(self.folder / SENTENCES_FILE, np.dtype("<i8")),
            )
        return self._maps

    def document(self, index: int) -> Document:
        """Document ``index``: its sentences' ids and the tokenizer's special ends."""
        if not 0 <= index < self.count:
            raise IndexError(f"document {index} of {self.count}")
        tokens, documents, sentences = self._arrays()
        (start, first), (stop, last) = documents[index], documents[index + 1]
        bounds = [*sentences[first:last].tolist(), int(stop)]
        body = tokens[start:stop].tolist()
        cuts = [bound - int(start) for bound in bounds]
        return Document([body[a:b] for a, b in pairwise(cuts)], self.head, self.tail)

    def tokens(self) -> int:
        """Token ids over every document (special ends not counted)."""
        return int(self._arrays()[1][self.count, 0])


class ValidationTexts(Sequence[str]):
    """The held-out texts of a prepared folder, read from disk on each access: a slice from the start
    (``validation[:512]``) reads that many lines and holds only them."""

    def __init__(self, path: Path, count: int) -> None:
        self.path, self.size = path, count

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[str]:
        with self.path.open(encoding="utf-8", newline="\n") as handle:
            for line in handle:
                yield line.removesuffix("\n")

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            return list(islice(iter(self), start, stop, step)) if step > 0 else list(self)[index]
        position = index + self.size if index < 0 else index
        if not 0 <= position < self.size:
            raise IndexError(f"validation text {index} of {self.size}")
        return next(islice(iter(self), position, None))
