"""The prepare step: a corpus streamed into a prepared folder (trainer.data.shards) in two passes.

1. Read, normalise, scrub, de-duplicate (trainer.data.corpus), fingerprint and split each document as it
   comes; kept training texts go to a scratch file, held-out ones to ``validation.txt``.
2. A scratch tokenizer, when the run needs one, is trained on a sample of at most
   ``TOKENIZER_SAMPLE_CHARS`` of the training texts (every n-th); then every training text is tokenised whole,
   sentence by sentence, into the shards.

Nothing holds the corpus: memory is one batch of documents, SQLite's page cache and the tokenizer's. The
folder is built under a temporary name and renamed into place with ``manifest.json`` inside, so a reader sees
a whole prepared corpus or none. The manifest names its source (the corpus settings, and each file's path,
size and modification time) and the tokenizer's sha256: a folder whose source or tokenizer changed is stale
and prepared again.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.models.tokenization import TextTokenizer
from trainer.config import CorpusConfig
from trainer.data.corpus import PreparationReport, SeenTexts, corpus_files, is_validation, prepare_texts, read_corpus
from trainer.data.corpus import read_lines as read_texts
from trainer.data.documents import special_ends, tokenize_documents
from trainer.data.shards import VALIDATION_FILE, ShardWriter, TokenShards, ValidationTexts, token_dtype
from trainer.data.tokenizer import write_tokenizer

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT = 1
TRAIN_TEXTS = "train.txt"  # pass 1's kept training texts; deleted once tokenised
TOKENIZER_SAMPLE_CHARS = 64 * 2**20
TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class PreparedCorpus:
    """A prepared corpus: ``fingerprint`` covers every kept text in order, before the split."""

    folder: Path
    fingerprint: str
    report: PreparationReport
    train: TokenShards
    validation: ValidationTexts
    tokenizer_dir: Path
    manifest: dict[str, Any]


def source(config: CorpusConfig) -> dict[str, Any]:
    """What a prepared folder is made from: the corpus settings and every file's path, size and mtime."""
    root = config.path.resolve()
    files = corpus_files(root)
    settings = config.model_dump(mode="json", include={"text_field", "min_chars", "scrub_pii"})
    split = config.model_dump(mode="json", include={"validation_fraction", "split_seed"})
    return {
        "path": str(root),
        **settings,
        **split,
        "files": [
            [str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files
        ],
    }


def tokenizer_sha256(tokenizer_dir: Path) -> str | None:
    path = tokenizer_dir / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def open_prepared(folder: Path) -> PreparedCorpus | None:
    """The prepared corpus in ``folder``, or None when there is none (no manifest: absent or unfinished)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        return None
    train = manifest["train"]
    ends = manifest["special_ends"]
    return PreparedCorpus(
        folder=folder,
        fingerprint=manifest["fingerprint"],
        report=PreparationReport(**manifest["report"]),
        train=TokenShards(folder, train["documents"], np.dtype(train["dtype"]), ends["head"], ends["tail"]),
        validation=ValidationTexts(folder / VALIDATION_FILE, manifest["validation"]["texts"]),
        tokenizer_dir=Path(manifest["tokenizer_dir"]),
        manifest=manifest,
    )


def open_current(config: CorpusConfig, folder: Path, tokenizer_dir: Path) -> PreparedCorpus | None:
    """The prepared corpus in ``folder`` if it was made from the corpus as it is now, with this tokenizer."""
    prepared = open_prepared(folder)
    if prepared is None:
        return None
    manifest = prepared.manifest
    fresh = manifest["source"] == source(config) and manifest["tokenizer_sha256"] == tokenizer_sha256(tokenizer_dir)
    return prepared if fresh else None


def prepare_corpus(
    config: CorpusConfig, folder: Path, tokenizer_dir: Path, vocab_size: int | None, *, progress: bool = True
) -> PreparedCorpus:
    """Prepare the corpus ``config`` names into ``folder`` (replacing what is there) with the tokenizer in
    ``tokenizer_dir``; when that holds none, a WordPiece of ``vocab_size`` is trained there first. A
    corpus that leaves no training or no validation text is refused (ValueError) with what to change."""
    started = time.perf_counter()
    origin = source(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        report, fingerprint, counts = _clean(config, work, progress)
        if not counts["train"] or not counts["validation"]:
            raise ValueError(
                f"{config.path}: {report.kept} usable documents give {counts['train']} training and "
                f"{counts['validation']} validation texts; add text or change corpus.validation_fraction"
            )
        if tokenizer_sha256(tokenizer_dir) is None:
            if vocab_size is None:
                raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer.json")
            stride = max(1, -(-counts["train_chars"] // TOKENIZER_SAMPLE_CHARS))
            write_tokenizer(islice(read_texts(work / TRAIN_TEXTS), 0, None, stride), vocab_size, tokenizer_dir)
        shards = _tokenise(work, tokenizer_dir, counts["train"], progress)
        (work / TRAIN_TEXTS).unlink()
        ends = shards.pop("special_ends")
        manifest = {
            "format": FORMAT,
            "source": origin,
            "tokenizer_dir": str(tokenizer_dir),
            "tokenizer_sha256": tokenizer_sha256(tokenizer_dir),
            "fingerprint": fingerprint,
            "report": asdict(report),
            "train": shards,
            "validation": {"texts": counts["validation"]},
            "special_ends": ends,
            "bytes_read": counts["bytes"],
            "seconds": round(time.perf_counter() - started, 3),
        }
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info(
        "corpus shards written",
        extra={"documents": shards["documents"], "tokens": shards["tokens"], "seconds": manifest["seconds"]},
    )
    prepared = open_prepared(folder)
    assert prepared is not None
    return prepared


def _clean(config: CorpusConfig, work: Path, progress: bool) -> tuple[PreparationReport, str, dict[str, int]]:
    """Pass 1: the kept texts, split into ``train.txt`` and ``validation.txt``; the report, the fingerprint
    and the counts."""
    report, digest = PreparationReport(), hashlib.sha256()
    counts = {"train": 0, "validation": 0, "train_chars": 0, "bytes": 0}
    total = sum(f.stat().st_size for f in corpus_files(config.path))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare: clean", disable=not progress)

    def documents() -> Iterator[str]:
        for document in read_corpus(config.path, config.text_field):
            bar.update(len(document) + 1)  # characters: bytes for ASCII text
            yield document

    with (
        SeenTexts(work / "seen.sqlite") as seen,
        (work / TRAIN_TEXTS).open("w", encoding="utf-8", newline="\n") as train,
        (work / VALIDATION_FILE).open("w", encoding="utf-8", newline="\n") as validation,
    ):
        texts = prepare_texts(documents(), report, seen, min_chars=config.min_chars, scrub=config.scrub_pii)
        for text in texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\n")
            if is_validation(text, config.validation_fraction, config.split_seed):
                validation.write(text + "\n")
                counts["validation"] += 1
            else:
                train.write(text + "\n")
                counts["train"] += 1
                counts["train_chars"] += len(text)
    bar.close()
    (work / "seen.sqlite").unlink()
    counts["bytes"] = total
    return report, digest.hexdigest(), counts


def _tokenise(work: Path, tokenizer_dir: Path, count: int, progress: bool) -> dict[str, Any]:
    """Pass 2: every training text tokenised whole into the shards; their sizes and the special ends."""
    tokenizer = TextTokenizer(tokenizer_dir / "tokenizer.json", max_seq_length=512)  # never truncates here
    head, tail = special_ends(tokenizer)
    ends = tokenizer.encode([""], truncate=False)[0]
    writer = ShardWriter(work, token_dtype(tokenizer.vocab_size))
    bar = tqdm(total=count, unit="doc", desc="prepare: tokenise", disable=not progress)
    texts = read_texts(work / TRAIN_TEXTS)
    try:
        while batch := list(islice(texts, TOKENIZE_BATCH)):
            writer.add(tokenize_documents(batch, tokenizer))
            bar.update(len(batch))
    finally:
        writer.close()
        bar.close()
    return {
        "documents": writer.documents,
        "tokens": writer.tokens,
        "sentences": writer.sentences,
        "dtype": writer.dtype.str,
        "special_ends": {"head": ends[:head], "tail": ends[len(ends) - tail :]},
    }
