"""Corpus preparation for self-supervised pretraining, one document at a time: read, normalise, scrub
PII, de-duplicate, fingerprint and split (``trainer.data.prepare`` runs these over a corpus into
tokenised shards; ``trainer.data.order`` shards them across processes and orders their batches).

Every step is deterministic: the same files give the same texts, fingerprint and split on every
machine and in every process, which is what exact resume and DDP sharding rely on. Nothing here
holds more than one document at a time, except the de-duplication set, which lives on disk.
"""

import hashlib
import json
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from trainer.data.pii import PII_KINDS, scrub_pii

CORPUS_SUFFIXES = (".txt", ".jsonl")


class CorpusError(ValueError):
    """A corpus that cannot be read as documents; the message names the file and, where known, the line."""


# -- reading ---------------------------------------------------------------------------------------


def corpus_files(path: Path) -> list[Path]:
    """The files of the corpus at ``path``, in the order they are read: ``path`` itself, or the .txt and
    .jsonl files of a folder at any depth, in sorted order of their paths relative to it."""
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES),
            key=lambda p: p.relative_to(path).parts,
        )
        if not files:
            raise CorpusError(f"{path}: the folder holds no {' or '.join(CORPUS_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise CorpusError(f"{path}: no such file or folder")
    if path.suffix not in CORPUS_SUFFIXES:
        raise CorpusError(f"{path}: unsupported corpus file; use .txt (one document per line) or .jsonl")
    return [path]


def read_corpus(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents under ``path``, one at a time, in an order that is the same on every machine.

    A ``.txt`` file holds one document per line (an empty line is an empty document); a ``.jsonl``
    file one JSON object per line with the text in ``text_field`` (blank lines are skipped); a folder
    holds such files (see corpus_files). Raises CorpusError naming the file and line for invalid
    UTF-8, invalid JSON or a missing text field.
    """
    for file in corpus_files(path):
        if file.suffix == ".txt":
            yield from read_lines(file)
        else:
            for number, line in enumerate(read_lines(file), start=1):
                if line.strip():
                    yield _jsonl_text(line, f"{file}:{number}", text_field)


def read_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file (a leading BOM dropped), without their ends, read a line at a time.

    Only "\\n" ends a line (and a "\\r" before it is dropped): str.splitlines() also splits on U+2028
    and form feeds, which can sit inside a document or, unescaped, inside a JSON string."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise CorpusError(f"{path}:{number}: not valid UTF-8") from None
            yield line.removesuffix("\n").removesuffix("\r")


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


# -- normalisation, PII and de-duplication ---------------------------------------------------------


def normalise(text: str) -> str:
    """``text`` in Unicode NFKC with every run of whitespace made one space, stripped at both ends.

    A normalised text holds no line break, so prepared texts are stored one per line."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass
class PreparationReport:
    """What preparation did to a corpus; ``pii_replaced`` has every kind in PII_KINDS, zeros included."""

    documents_read: int = 0
    empty_or_short_dropped: int = 0
    duplicates_dropped: int = 0
    pii_replaced: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    kept: int = 0


class SeenTexts:
    """The set of texts kept so far, as 64-bit hashes in an SQLite table on disk: memory stays bounded by
    SQLite's page cache whatever the corpus size. Two different texts share a hash with probability about
    n² / 2⁶⁵ over n texts (one in 10⁶ at 6 million texts); the later one would then be dropped as a duplicate."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        # A scratch table: no journal, no fsync, a 32 MiB page cache.
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-32768;"
            "CREATE TABLE IF NOT EXISTS seen (hash INTEGER PRIMARY KEY) WITHOUT ROWID; BEGIN;"
        )

    def add(self, text: str) -> bool:
        """Record ``text``; False when it was seen before."""
        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big", signed=True)
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (key,)).rowcount == 1

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SeenTexts":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def prepare_texts(
    documents: Iterable[str], report: PreparationReport, seen: SeenTexts, *, min_chars: int = 1, scrub: bool = True
) -> Iterator[str]:
    """The normalised texts of ``documents``, in order, one at a time; ``report`` counts what was done.

    Each document is normalised; one shorter than ``min_chars`` afterwards (empty included) is
    dropped; PII is scrubbed (when ``scrub``); a duplicate of an earlier kept text (one ``seen`` holds)
    is dropped. De-duplication runs after scrubbing, so texts differing only in an email address are
    one text. ``pii_replaced`` counts the placeholders in the kept texts only.
    """
    for document in documents:
        report.documents_read += 1
        text = normalise(document)
        if len(text) < max(min_chars, 1):
            report.empty_or_short_dropped += 1
            continue
        counts: dict[str, int] = {}
        if scrub:
            text, counts = scrub_pii(text)
        if not seen.add(text):
            report.duplicates_dropped += 1
            continue
        for kind, number in counts.items():
            report.pii_replaced[kind] += number
        report.kept += 1
        yield text


def fingerprint(texts: Iterable[str]) -> str:
    """Hex sha256 of ``texts`` in order, each as its UTF-8 bytes followed by a newline."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def is_validation(text: str, validation_fraction: float, seed: str) -> bool:
    """Whether ``text`` is held out: sha256(seed, text) falls in the lowest ``validation_fraction`` of the
    hash range.

    The side depends only on the text and ``seed``, never on its position or on an RNG, so adding,
    removing or reordering documents does not move the others, and a stream is split as it goes."""
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    # The NUL keeps (seed "a", text "bc") apart from (seed "ab", text "c").
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2**64
