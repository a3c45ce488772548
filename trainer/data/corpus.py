"""Corpus preparation for self-supervised pretraining: read, normalise, scrub PII, de-duplicate,
fingerprint and split (``trainer.data.order`` shards the result and orders its batches).

Every step is deterministic: the same files give the same texts, fingerprint and split on every
machine and in every process, which is what exact resume and DDP sharding rely on.
"""

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.pii import PII_KINDS, scrub_pii

CORPUS_SUFFIXES = (".txt", ".jsonl")


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
