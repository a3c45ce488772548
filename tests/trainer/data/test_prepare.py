"""The prepare step and its shards: the streamed pipeline keeps the semantics of preparing a list in memory,
is deterministic, round-trips documents through the shards, and is prepared again only when its source
changes; the loader cuts the same batches in worker processes as inline."""

import json
from pathlib import Path

import pytest
import torch

from service.models.tokenization import TextTokenizer
from trainer.config import CorpusConfig, ViewsConfig
from trainer.data.corpus import fingerprint, is_validation, normalise
from trainer.data.documents import prefix, tokenize_documents
from trainer.data.loader import ContrastiveBatches, batch_stream
from trainer.data.order import BatchOrder, DataPosition
from trainer.data.pii import scrub_pii
from trainer.data.prepare import open_current, prepare_corpus
from trainer.data.sample_text import paragraphs, sentences
from trainer.data.tokenizer import train_wordpiece

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece([*paragraphs(), *sentences()], 1500, folder)
    return folder


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two files of real text with duplicates, PII, short and blank lines."""
    folder = tmp_path_factory.mktemp("corpus")
    long_documents = [" ".join(sentences()[i : i + 12]) for i in range(0, 600, 12)]
    lines = [*paragraphs()[:150], "", "tiny", paragraphs()[0], *long_documents]
    (folder / "a.txt").write_text("\n".join(lines) + "\n")
    records = [{"text": f"Write to ops{i}@example.com about  {sentences()[700 + i]}"} for i in range(20)]
    records += [{"text": "Write to ops0@example.org about  " + sentences()[700]}]  # a duplicate once scrubbed
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def config(corpus_dir: Path, **overrides: object) -> CorpusConfig:
    return CorpusConfig.model_validate({"path": corpus_dir, "validation_fraction": 0.2, **overrides})


def raw_documents(corpus_dir: Path) -> list[str]:
    raw = (corpus_dir / "a.txt").read_text().split("\n")[:-1]
    return raw + [json.loads(line)["text"] for line in (corpus_dir / "b.jsonl").read_text().splitlines()]


def expected_texts(corpus_dir: Path, min_chars: int) -> list[str]:
    """What preparing the corpus in memory gives: normalise, drop short, scrub, drop repeats, in order."""
    kept: list[str] = []
    for document in raw_documents(corpus_dir):
        text = normalise(document)
        if len(text) >= min_chars and (text := scrub_pii(text)[0]) not in kept:
            kept.append(text)
    return kept


def test_prepare_keeps_the_in_memory_semantics_and_round_trips_documents(
    corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    prepared = prepare_corpus(config(corpus_dir), tmp_path / "prepared", tokenizer_dir, None, progress=False)
    texts = expected_texts(corpus_dir, min_chars=20)
    train = [t for t in texts if not is_validation(t, 0.2, "embedserve")]
    validation = [t for t in texts if is_validation(t, 0.2, "embedserve")]
    assert prepared.fingerprint == fingerprint(texts)
    report = prepared.report
    assert (report.documents_read, report.empty_or_short_dropped, report.duplicates_dropped) == (
        len(raw_documents(corpus_dir)),
        2,
        2,
    )
    assert report.kept == len(texts) == len(prepared.train) + len(prepared.validation)
    assert report.pii_replaced["email"] == 20
    assert list(prepared.validation) == validation and prepared.validation[:5] == validation[:5]
    assert prepared.validation[-1] == validation[-1]
    # Each training document comes back from the shards as it was tokenised, sentence by sentence ...
    tokenizer = TextTokenizer(tokenizer_dir / "tokenizer.json", MAX_LENGTH)
    assert len(prepared.train) == len(train)
    expected = tokenize_documents(train, tokenizer)
    assert [prepared.train.document(i) for i in range(len(train))] == expected
    assert any(len(d.body) > 4 * MAX_LENGTH and len(d.sentences) > 5 for d in expected)  # whole, not truncated
    # ... and its prefix is what tokenising its text with truncation gives (the views of earlier versions).
    truncated = tokenizer.encode(train, truncate=True)
    assert [prefix(prepared.train.document(i), MAX_LENGTH) for i in range(len(train))] == truncated
    assert prepared.manifest["train"]["tokens"] == sum(len(d.body) for d in expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed


def test_prepare_is_deterministic(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    first = prepare_corpus(config(corpus_dir), tmp_path / "1", tokenizer_dir, None, progress=False)
    second = prepare_corpus(config(corpus_dir), tmp_path / "2", tokenizer_dir, None, progress=False)
    assert first.fingerprint == second.fingerprint
    for name in ("tokens.bin", "documents.bin", "sentences.bin", "validation.txt"):
        assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes(), name


def test_a_prepared_folder_is_reused_until_its_source_or_settings_change(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(paragraphs()[:60]) + "\n")
    folder = tmp_path / "prepared"
    prepare_corpus(config(corpus), folder, tokenizer_dir, None, progress=False)
    assert open_current(config(corpus), folder, tokenizer_dir) is not None
    assert open_current(config(corpus, split_seed="other"), folder, tokenizer_dir) is None
    assert open_current(config(corpus, workers=0), folder, tokenizer_dir) is not None  # not a data setting
    with corpus.open("a") as more:
        more.write(paragraphs()[60] + "\n")
    assert open_current(config(corpus), folder, tokenizer_dir) is None
    # A corpus too small to split is refused with what to do, and leaves nothing behind.
    corpus.write_text(paragraphs()[0] + "\n")
    with pytest.raises(ValueError, match=r"1 usable documents give .*change corpus\.validation_fraction"):
        prepare_corpus(config(corpus), tmp_path / "small", tokenizer_dir, None, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "small"]


def test_workers_cut_the_batches_the_training_process_would(
    corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    prepared = prepare_corpus(config(corpus_dir), tmp_path / "prepared", tokenizer_dir, None, progress=False)
    views = ViewsConfig.model_validate({"mix": {"crop": 1, "inverse_cloze": 1}, "token_deletion": 0.1})
    order = BatchOrder(len(prepared.train), 8, seed=3)
    batches = ContrastiveBatches(prepared.train, order, 2, views, MAX_LENGTH, 0, seed=3)
    inline = batch_stream(batches, DataPosition(), workers=0, pin_memory=False)
    uninterrupted = [next(inline) for _ in range(12)]  # 24 batches of 8: into the second epoch
    in_workers = batch_stream(batches, DataPosition(), workers=2, pin_memory=False)
    resumed = batch_stream(batches, uninterrupted[5].after, workers=2, pin_memory=False)
    for stream, expected in ((in_workers, uninterrupted), (resumed, uninterrupted[6:])):
        for want in expected:
            got = next(stream)
            assert got.after == want.after and got.view_lengths == want.view_lengths
            for name in ("documents", "view_ids", "view_mask", "prefix_ids", "prefix_mask"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
    first = uninterrupted[0]
    assert first.view_ids.shape[0] == 2 * len(first.documents) == 32 and first.tokens == int(first.prefix_mask.sum())
    assert uninterrupted[-1].after.epoch == 1 and len({tuple(b.documents.tolist()) for b in uninterrupted}) == 12
