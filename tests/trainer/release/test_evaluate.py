"""Evaluation: retrieval metrics against a slow reference, alignment over positive pairs, the CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.models.tokenization import TextTokenizer
from tests.conftest import export_tiny
from trainer.data.sample_text import sentences
from trainer.release.evaluate import (
    EVALUATION_VIEWS,
    EmbedFn,
    LabeledPair,
    evaluate,
    load_pairs,
    retrieval_metrics,
    text_views,
)
from trainer.release.export import embed_with_onnx


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def hashed_vector(text: str, dimension: int = 8) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return unit(np.random.default_rng(seed).standard_normal(dimension)).astype(np.float32)


def embed_hashed(texts: list[str]) -> np.ndarray:
    """Every distinct text its own random unit vector: no two views of a text are alike."""
    return np.stack([hashed_vector(text) for text in texts])


def embed_bag_of_words(texts: list[str]) -> np.ndarray:
    """The mean of per-word random vectors: views sharing most words land close together."""
    return np.stack([unit(sum((hashed_vector(w, 64) for w in t.split()), np.zeros(64))) for t in texts])


def reference_retrieval(embed: EmbedFn, pairs: list[LabeledPair], k: int = 10) -> dict[str, float]:
    """One query at a time: sort the distinct documents by score and find the relevant one's place."""
    documents = []
    for pair in pairs:
        if pair.document not in documents:
            documents.append(pair.document)
    hits, reciprocal, squared = 0.0, 0.0, 0.0
    for pair in pairs:
        query = embed([pair.query])[0]
        scored = sorted(documents, key=lambda document: -float(query @ embed([document])[0]))
        rank = scored.index(pair.document) + 1
        if rank <= k:
            hits += 1
            reciprocal += 1 / rank
        squared += float(np.sum((unit(query) - unit(embed([pair.document])[0])) ** 2))
    return {
        f"recall@{k}": hits / len(pairs),
        f"mrr@{k}": reciprocal / len(pairs),
        "pair_alignment": squared / len(pairs),
    }


def test_retrieval_metrics_match_a_slow_reference() -> None:
    # 8 dimensions and 30 documents: some relevant documents rank past 10, so both recall and MRR are partial.
    texts = list(sentences()[:70])
    pairs = [LabeledPair(query=texts[i], document=texts[40 + i % 30]) for i in range(40)]  # shared documents
    fast = retrieval_metrics(embed_hashed, pairs)
    slow = reference_retrieval(embed_hashed, pairs)
    assert 0 < fast["recall@10"] < 1 and 0 < fast["mrr@10"] < fast["recall@10"]
    assert (fast["queries"], fast["documents"]) == (40, 30)
    for name, value in slow.items():
        assert fast[name] == pytest.approx(value, abs=1e-6), name


def test_a_perfect_encoder_scores_one_and_the_primary_metric_is_mrr_at_10() -> None:
    texts = list(sentences()[:20])
    pairs = [LabeledPair(query=f"about: {text}", document=text) for text in texts]

    def topic_of(batch: list[str]) -> np.ndarray:
        return embed_hashed([text.removeprefix("about: ") for text in batch])

    result = evaluate(topic_of, texts, pairs)
    assert result.primary_metric == "mrr@10" and result.primary == 1.0
    assert result.metrics["recall@10"] == 1.0 and result.metrics["pair_alignment"] == pytest.approx(0, abs=1e-6)
    assert evaluate(topic_of, texts).primary_metric == "neg_uniformity"


def test_alignment_is_measured_over_two_fixed_views_of_each_text() -> None:
    texts = list(sentences()[:64])
    first, second = text_views(texts)
    assert (first, second) == text_views(texts)  # a fixed seed: the same encoder always scores the same
    assert sum(a != b for a, b in zip(first, second, strict=True)) > 32
    for text, *views in zip(texts, first, second, strict=True):
        words = text.split()
        for view in views:
            assert set(view.split()) <= set(words) and 0 < len(view.split()) <= len(words), (text, view)
    assert EVALUATION_VIEWS.token_deletion > 0 and EVALUATION_VIEWS.span_crop is not None

    invariant = evaluate(embed_bag_of_words, texts).metrics["alignment"]
    unrelated = evaluate(embed_hashed, texts).metrics["alignment"]
    expected = float(np.mean(np.sum((embed_bag_of_words(first) - embed_bag_of_words(second)) ** 2, axis=1)))
    assert invariant == pytest.approx(expected, rel=1e-5)
    assert invariant < 0.5 < 1.5 < unrelated  # random unit vectors: E‖a − b‖² = 2


def test_load_pairs_reads_jsonl_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"query": "q1", "document": "d1"}\n\n{"query": "q2", "document": "d2", "id": 7}\n')
    assert load_pairs(good) == [LabeledPair("q1", "d1"), LabeledPair("q2", "d2")]
    for content, message in [
        ('{"query": "q"}\n', r"bad\.jsonl:1: expected a JSON object with 'query' and 'document'"),
        ('{"query": "q", "document": "d"}\nnot json\n', r"bad\.jsonl:2: expected a JSON object"),
        ('["q", "d"]\n', r"bad\.jsonl:1: expected a JSON object"),
        ('{"query": "q", "document": null}\n', r"bad\.jsonl:1: 'query' and 'document' must be strings"),
        ("\n\n", r"bad\.jsonl: no \(query, document\) pairs"),
    ]:
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(ValueError, match=message):
            load_pairs(tmp_path / "bad.jsonl")


def test_the_evaluate_command_on_an_exported_version(tmp_path: Path) -> None:
    version_dir = export_tiny(tmp_path / "repository", model="tiny")
    texts = list(sentences()[100:164])
    pairs = [LabeledPair(query=" ".join(text.split()[:4]), document=text) for text in texts[:24]]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(pair.__dict__) for pair in pairs))
    command = [sys.executable, "-m", "trainer", "evaluate", "--version-dir", str(version_dir)]
    command += ["--pairs", str(tmp_path / "pairs.jsonl"), "--texts", str(tmp_path / "texts.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)

    tokenizer = TextTokenizer(version_dir / "tokenizer.json", 64)
    expected = evaluate(lambda batch: embed_with_onnx(version_dir / "model.onnx", tokenizer, batch), texts, pairs)
    assert report["primary_metric"] == "mrr@10" and report["primary"] == pytest.approx(expected.primary)
    assert set(report["metrics"]) >= {"alignment", "pair_alignment", "uniformity", "effective_rank", "recall@10"}
    for name, value in expected.metrics.items():
        assert report["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
