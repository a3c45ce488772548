"""Corpus preparation for self-supervised pretraining: read, normalise, scrub PII, de-duplicate,
fingerprint, split, shard, and a resumable batch order.

Every step is deterministic: the same files give the same texts, fingerprint, split and batches on
every machine and in every process, which is what exact resume and DDP sharding rely on.
"""

import hashlib
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from trainer.pii import PII_KINDS, scrub_pii

CORPUS_SUFFIXES = (".txt", ".jsonl")

Remainder = Literal["truncate", "pad"]
T = TypeVar("T")


class CorpusError(ValueError):
    """A corpus that cannot be read as documents; the message names the file and, where known, the line."""


# -- reading ---------------------------------------------------------------------------------------


def read_corpus(path: Path, text_field: str = "text") -> list[str]:
    """The documents under ``path``, in an order that is the same on every machine.

    A ``.txt`` file holds one document per line (an empty line is an empty document); a ``.jsonl``
    file one JSON object per line with the text in ``text_field`` (blank lines are skipped); a folder
    holds such files at any depth, read in sorted order of their paths relative to it. Raises
    CorpusError naming the file and line for invalid UTF-8, invalid JSON or a missing text field.
    """
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES),
            key=lambda p: p.relative_to(path).parts,
        )
        if not files:
            raise CorpusError(f"{path}: the folder holds no {' or '.join(CORPUS_SUFFIXES)} files")
        return [document for file in files for document in _read_file(file, text_field)]
    if not path.is_file():
        raise CorpusError(f"{path}: no such file or folder")
    return _read_file(path, text_field)


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        return _lines(path)
    if path.suffix == ".jsonl":
        return [
            _jsonl_text(line, f"{path}:{number}", text_field)
            for number, line in enumerate(_lines(path), start=1)
            if line.strip()
        ]
    raise CorpusError(f"{path}: unsupported corpus file; use .txt (one document per line) or .jsonl")


def _lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8") from None
    # Only "\n" ends a line: str.splitlines() also splits on U+2028 and form feeds, which can sit
    # inside a document or, unescaped, inside a JSON string.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise CorpusError(f"{where}: no field '{text_field}' (fields: {', '.join(sorted(record)) or 'none'})")
    value = record[text_field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field '{text_field}' holds {type(value).__name__}, not a string")
    return value


# -- normalisation and PII -------------------------------------------------------------------------


def normalise(text: str) -> str:
    """``text`` in Unicode NFKC with every run of whitespace made one space, stripped at both ends."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass
class PreparationReport:
    """What preparation did to a corpus; ``pii_replaced`` has every kind in PII_KINDS, zeros included."""

    documents_read: int = 0
    empty_or_short_dropped: int = 0
    duplicates_dropped: int = 0
    pii_replaced: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    kept: int = 0


def prepare_texts(
    documents: Iterable[str], *, min_chars: int = 1, scrub: bool = True
) -> tuple[list[str], PreparationReport]:
    """Normalised texts of ``documents``, in order, and a report of what was done.

    Each document is normalised; one shorter than ``min_chars`` afterwards (empty included) is
    dropped; PII is scrubbed (when ``scrub``); an exact duplicate of an earlier kept text is dropped.
    De-duplication runs after scrubbing, so texts differing only in an email address are one text.
    ``pii_replaced`` counts the placeholders in the kept texts only.
    """
    report = PreparationReport()
    seen: set[str] = set()
    kept: list[str] = []
    for document in documents:
        report.documents_read += 1
        text = normalise(document)
        if len(text) < max(min_chars, 1):
            report.empty_or_short_dropped += 1
            continue
        counts: Counter[str] = Counter()
        if scrub:
            text, counts = scrub_pii(text)
        if text in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(text)
        kept.append(text)
        for kind, number in counts.items():
            report.pii_replaced[kind] += number
    report.kept = len(kept)
    return kept, report


def fingerprint(texts: Iterable[str]) -> str:
    """Hex sha256 of ``texts`` in order, each as its UTF-8 bytes followed by a newline."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def split(texts: Sequence[str], validation_fraction: float, seed: str) -> tuple[list[str], list[str]]:
    """(train, validation): a text goes to validation when sha256(seed, text) falls in the lowest
    ``validation_fraction`` of the hash range.

    Each text's side depends only on the text and ``seed``, never on its position or on an RNG, so
    adding, removing or reordering documents does not move the others. Both lists keep input order.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    threshold = validation_fraction * 2**64
    train: list[str] = []
    validation: list[str] = []
    for text in texts:
        # The NUL keeps (seed "a", text "bc") apart from (seed "ab", text "c").
        digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
        (validation if int.from_bytes(digest[:8], "big") < threshold else train).append(text)
    return train, validation


@dataclass(frozen=True)
class PreparedCorpus:
    """Prepared texts split for training; ``fingerprint`` covers all of them, before the split."""

    train: list[str]
    validation: list[str]
    fingerprint: str
    report: PreparationReport


def prepare_corpus(
    path: Path,
    *,
    text_field: str = "text",
    min_chars: int = 1,
    scrub: bool = True,
    validation_fraction: float = 0.05,
    split_seed: str = "embedserve",
) -> PreparedCorpus:
    """Read ``path`` (see read_corpus), prepare its texts (see prepare_texts) and split them (see split)."""
    texts, report = prepare_texts(read_corpus(path, text_field), min_chars=min_chars, scrub=scrub)
    train, validation = split(texts, validation_fraction, split_seed)
    return PreparedCorpus(train=train, validation=validation, fingerprint=fingerprint(texts), report=report)


# -- sharding and batch order ----------------------------------------------------------------------


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Every ``world_size``-th item from ``rank`` on.

    The shards of ranks 0 … world_size − 1 are disjoint and together hold every item; their sizes
    differ by at most one (the first ``len(items) % world_size`` ranks hold one more). Use
    equal_shard where every rank must take the same number of steps (DDP).
    """
    _check_rank(rank, world_size)
    return list(items[rank::world_size])


def equal_shard(items: Sequence[T], rank: int, world_size: int, remainder: Remainder = "truncate") -> list[T]:
    """Like shard, but every rank's shard has the same length, as DDP needs.

    ``truncate``: the last ``len(items) % world_size`` items are left out and each rank holds
    ``len(items) // world_size``; shards stay disjoint. ``pad``: items are repeated from the start
    (as torch's DistributedSampler does) until each rank holds ``ceil(len(items) / world_size)``;
    every item is covered and a few appear twice.
    """
    _check_rank(rank, world_size)
    if remainder == "truncate":
        return list(items[rank : len(items) - len(items) % world_size : world_size])
    if not items:
        raise ValueError("cannot pad an empty sequence into shards")
    total = math.ceil(len(items) / world_size) * world_size
    padded = (list(items) * math.ceil(total / len(items)))[:total]
    return padded[rank::world_size]


@dataclass(frozen=True)
class DataPosition:
    """Where a run is in its data: ``batch`` is the index, within ``epoch``, of the next batch."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, state: Mapping[str, object]) -> "DataPosition":
        """The position saved by to_dict; ValueError if ``state`` is not one."""
        epoch, batch = state.get("epoch"), state.get("batch")
        if not (isinstance(epoch, int) and isinstance(batch, int) and epoch >= 0 and batch >= 0):
            raise ValueError(f"not a data position: {dict(state)!r}")
        return cls(epoch=epoch, batch=batch)


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(size) drawn from a numpy Generator seeded with (seed, epoch).

    Seeding with the pair rather than seed + epoch keeps (seed 1, epoch 0) and (seed 0, epoch 1)
    apart. The same numpy version gives the same permutation on every machine.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(size)


class BatchOrder:
    """The batches of corpus indices one process trains on, epoch after epoch.

    Each epoch permutes all ``size`` indices (epoch_permutation), takes this rank's equal_shard of
    the permutation — so ranks see different texts every epoch, and ``truncate`` leaves out
    different ones — and cuts it into full batches. A last partial batch is dropped: every batch
    has the same number of in-batch negatives and every rank the same number of batches.

    The batch at a position depends only on the constructor's arguments and the position, so a run
    restored at a saved DataPosition sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        remainder: Remainder = "truncate",
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        per_rank = size // world_size if remainder == "truncate" else math.ceil(size / world_size)
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{size} texts over {world_size} process(es) give {per_rank} per process, "
                f"fewer than one batch of {batch_size}; add text or lower the batch size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.remainder = rank, world_size, remainder
        self._epoch: int | None = None
        self._shard: list[int] = []

    def batch(self, position: DataPosition) -> list[int]:
        """The corpus indices of the batch at ``position``."""
        if position.batch >= self.batches_per_epoch:
            raise ValueError(
                f"position {position} is past the {self.batches_per_epoch} batches of an epoch "
                "(was the batch size or the number of processes changed?)"
            )
        if self._epoch != position.epoch:
            permutation = epoch_permutation(self.size, self.seed, position.epoch).tolist()
            self._shard = equal_shard(permutation, self.rank, self.world_size, self.remainder)
            self._epoch = position.epoch
        start = position.batch * self.batch_size
        return self._shard[start : start + self.batch_size]

    def after(self, position: DataPosition) -> DataPosition:
        """The position of the batch that follows the one at ``position``."""
        if position.batch + 1 < self.batches_per_epoch:
            return DataPosition(position.epoch, position.batch + 1)
        return DataPosition(position.epoch + 1, 0)

    def batches(self, start: DataPosition | None = None) -> Iterator[tuple[list[int], DataPosition]]:
        """Batches from ``start`` (default: the beginning) on, without end, each with the position to
        save once it has been trained on."""
        position = start if start is not None else DataPosition()
        while True:
            indices = self.batch(position)
            position = self.after(position)
            yield indices, position
