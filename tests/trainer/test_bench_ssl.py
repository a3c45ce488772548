"""make bench-ssl's verdict and its skip path (the benchmark itself takes minutes and is not run here)."""

import sys
from pathlib import Path

import pytest

import loadtests.bench_ssl as bench_ssl


def test_the_adapted_encoder_must_raise_mrr_without_losing_recall() -> None:
    base = {"recall@10": 0.99, "mrr@10": 0.89}
    assert bench_ssl.shortfalls(base, {"recall@10": 0.99, "mrr@10": 0.90}) == []
    assert bench_ssl.shortfalls(base, {"recall@10": 0.99, "mrr@10": 0.89}) == [
        "MRR@10 did not rise (0.8900 base, 0.8900 adapted)"
    ]
    assert bench_ssl.shortfalls(base, {"recall@10": 0.98, "mrr@10": 0.95}) == [
        "recall@10 fell (0.9900 base, 0.9800 adapted)"
    ]
    # A candidate objective against the default: named as such.
    assert bench_ssl.shortfalls(base, {"recall@10": 0.98, "mrr@10": 0.88}, ("default", "candidate")) == [
        "MRR@10 did not rise (0.8900 default, 0.8800 candidate)",
        "recall@10 fell (0.9900 default, 0.9800 candidate)",
    ]


def test_without_man_pages_it_writes_nothing_and_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    committed = tmp_path / "bench_ssl.json"
    committed.write_text('{"adapted_beats_base": true}\n')
    no_pages = tmp_path / "man"
    (no_pages / "man1").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["bench_ssl", "--output", str(committed), "--man-root", str(no_pages)])
    bench_ssl.main()  # returns: exit status 0
    assert committed.read_text() == '{"adapted_beats_base": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_ssl.json", "man"]
    assert "bench-ssl skipped: only 0 man pages" in capsys.readouterr().out
