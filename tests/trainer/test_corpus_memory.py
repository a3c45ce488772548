"""Resident memory does not grow with the corpus: prepare and 20 training steps, in a subprocess, on a corpus and
on one five times its size (real text plus synthetic documents of its words)."""

from pathlib import Path

import pytest

from loadtests.bench_corpus import Measurement, train_measured, write_corpus
from trainer.data.sample_text import paragraphs, sentences

SMALL_MB, LARGE_MB = 2, 10


def prepared_and_trained(folder: Path, megabytes: int) -> Measurement:
    folder.mkdir()
    write_corpus(folder / "corpus.txt", megabytes, [*paragraphs(), *sentences()])
    run = train_measured(folder / "corpus.txt", folder, steps=20, workers=2, timeout_s=900)
    assert run.returncode == 0, run.stderr
    assert (folder / "runs" / "bench-corpus" / "checkpoints" / "step-00000020.pt").is_file()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Measurement, Measurement]:
    root = tmp_path_factory.mktemp("memory")
    return prepared_and_trained(root / "small", SMALL_MB), prepared_and_trained(root / "large", LARGE_MB)


def test_peak_memory_stays_bounded_and_does_not_grow_with_the_corpus(runs: tuple[Measurement, Measurement]) -> None:
    small, large = runs
    # Holding the corpus as text (file, decoded string, list of lines, kept texts, their set) would add
    # several times the 8 MiB the larger corpus has more; streaming adds about nothing (make bench-corpus:
    # +17 MiB from 51 MiB to 205 MiB of corpus).
    assert large.peak_rss_mb - small.peak_rss_mb < 20, (small, large)
    assert large.peak_rss_mb < 1500, large
