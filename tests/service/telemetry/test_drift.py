"""Drift scores against a version's reference statistics, neighbourhood agreement, and the text sample."""

import dataclasses
import itertools
import logging
import random
import string
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.models.store import ModelStore
from service.settings import Settings
from service.telemetry.drift import (
    DriftMonitor,
    Reservoir,
    TextSample,
    kernel_mmd,
    mean_cosine_distance,
    neighbour_agreement,
)
from tests.helpers import metric, read_metrics, running_gateway
from trainer.data.sample_text import sentences
from trainer.release.export import embed_with_onnx


@pytest.fixture(scope="module")
def store(model_repository: Path) -> ModelStore:
    return ModelStore.scan(model_repository)


def test_the_reservoir_keeps_the_first_vectors_until_full() -> None:
    reservoir = Reservoir(capacity=4, dimension=2, rng=np.random.default_rng(0))
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    reservoir.observe(rows)
    assert len(reservoir) == 3 and reservoir.seen == 3
    np.testing.assert_array_equal(reservoir.snapshot(), rows)
    reservoir.observe(rows)
    assert len(reservoir) == 4 and reservoir.seen == 6
    with pytest.raises(ValueError, match="shape"):
        reservoir.observe(np.zeros((1, 3), dtype=np.float32))


def test_past_its_horizon_the_reservoir_follows_recent_traffic() -> None:
    # 100,000 vectors of one kind (0), then 10,000 of another (1): a uniform sample of everything would hold
    # about 9 % of the new kind; one with a horizon of 4,096 holds 1 - (1 - 1/4096)^10000 ≈ 91 %.
    reservoir = Reservoir(capacity=512, dimension=1, rng=np.random.default_rng(2), horizon=4096)
    for _ in range(100):
        reservoir.observe(np.zeros((1000, 1), dtype=np.float32))
    for _ in range(10):
        reservoir.observe(np.ones((1000, 1), dtype=np.float32))
    assert 0.85 < reservoir.snapshot().mean() < 0.96
    with pytest.raises(ValueError, match="horizon"):
        Reservoir(capacity=512, dimension=1, horizon=100)


def test_the_reservoir_is_a_uniform_sample_of_everything_observed() -> None:
    # 1,000 numbered vectors in batches of uneven sizes, 400 times over:
    # each vector must be kept with probability capacity / seen = 0.1, early, middle or late.
    capacity, total, runs = 100, 1000, 400
    kept = np.zeros(total)
    rng = np.random.default_rng(1)
    for _ in range(runs):
        reservoir = Reservoir(capacity, 1, rng)
        # A first batch that fills the reservoir and overflows it, uneven ones, a last one of 300 rows.
        cuts = [int(rng.integers(101, 200)), *np.sort(rng.choice(np.arange(200, 700), 8, replace=False)), 700]
        for index, batch in enumerate(np.split(np.arange(total, dtype=np.float32)[:, None], cuts)):
            if index in (3, 6):  # two stretches one vector at a time, as requests of one input offer them
                for row in batch:
                    reservoir.observe(row[None])
            else:
                reservoir.observe(batch)
        sample = reservoir.snapshot()[:, 0].astype(int)
        assert len(set(sample)) == capacity
        kept[sample] += 1
    share = kept / runs
    for part in np.split(share, 10):  # ten stretches of 100 consecutive vectors
        assert abs(part.mean() - 0.1) < 0.01, share.reshape(10, 100).mean(axis=1)


def _slow_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """MMD²_u written out pair by pair (Gretton et al. 2012, eq. 3) with the median-heuristic bandwidth."""
    pooled = [*x, *y]
    squared = [float(np.sum((a - b) ** 2)) for a, b in itertools.combinations(pooled, 2)]
    sigma2 = float(np.median(squared))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma2)))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_kernel_mmd_matches_the_pair_by_pair_definition() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 3)), rng.normal(0.7, 1.0, size=(7, 3))
    assert kernel_mmd(x, y) == pytest.approx(_slow_mmd(x, y), abs=1e-6)  # float32 kernel values
    assert kernel_mmd(x, y) > 0


def test_kernel_mmd_is_about_zero_within_a_distribution_and_large_across() -> None:
    rng = np.random.default_rng(3)
    x, same, shifted = rng.normal(size=(300, 16)), rng.normal(size=(64, 16)), rng.normal(1.0, 1.0, size=(64, 16))
    within, across = kernel_mmd(x, same), kernel_mmd(x, shifted)
    assert within < 0.01
    assert across > 0.1 and across > 20 * within
    assert kernel_mmd(shifted, x) == pytest.approx(across, abs=1e-6)  # symmetric
    assert kernel_mmd(10 * x, 10 * shifted) == pytest.approx(across, abs=1e-6)  # the bandwidth follows the scale
    assert kernel_mmd(np.ones((5, 4)), np.ones((3, 4))) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        kernel_mmd(x, x[:1])


def test_mean_cosine_distance() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert mean_cosine_distance(x, np.array([2.0, 2.0])) == pytest.approx(0.0, abs=1e-12)
    assert mean_cosine_distance(x, np.array([1.0, -1.0])) == pytest.approx(1.0)
    assert mean_cosine_distance(x, np.array([-1.0, -1.0])) == pytest.approx(2.0)
    assert mean_cosine_distance(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1.0, 0.0])) == 1.0


def _slow_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    def nearest(v: np.ndarray, i: int) -> set[int]:
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        others = sorted((j for j in range(len(v)) if j != i), key=lambda j: -float(unit[i] @ unit[j]))
        return set(others[:k])

    return float(np.mean([len(nearest(a, i) & nearest(b, i)) / k for i in range(len(a))]))


def test_neighbour_agreement() -> None:
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(8, 24))
    a = np.repeat(centres, 25, axis=0) + 0.3 * rng.normal(size=(200, 24))  # 8 clusters of 25 texts
    assert neighbour_agreement(a, a) == 1.0
    rotation, _ = np.linalg.qr(rng.normal(size=(40, 24)))  # 24 -> 40 dimensions, distances kept
    assert neighbour_agreement(a, 3.0 * a @ rotation.T) == 1.0
    unrelated = rng.normal(size=(200, 16))
    assert neighbour_agreement(a, unrelated) < 0.15  # chance: 10 / 199
    noisy = a + 0.3 * rng.normal(size=a.shape)
    assert neighbour_agreement(a, noisy, k=3) == pytest.approx(_slow_agreement(a, noisy, 3))
    with pytest.raises(ValueError, match="more than 11 texts"):
        neighbour_agreement(a[:11], a[:11])
    with pytest.raises(ValueError, match="same texts"):
        neighbour_agreement(a, a[:50])
    assert neighbour_agreement(a[:12], a[:12]) == 1.0


def test_the_text_sample_keeps_recent_distinct_texts_per_model() -> None:
    texts = TextSample(capacity=5)
    texts.observe("m", ["a", "b", "a"])
    assert texts.sample("m") == ["b", "a"]
    texts.observe("m", [str(i) for i in range(20)])
    assert texts.sample("m") == ["15", "16", "17", "18", "19"]
    texts.observe("m", ["17"])
    assert texts.sample("m") == ["15", "16", "18", "19", "17"]
    assert texts.sample("other") == []
    nothing = TextSample(capacity=0)
    nothing.observe("m", ["a"])
    assert nothing.sample("m") == []


def test_the_monitor_scores_served_vectors_against_the_reference(store: ModelStore) -> None:
    tiny = store.get("tiny", 1)
    assert tiny is not None and tiny.manifest.reference_stats is not None
    monitor = DriftMonitor(store, CollectorRegistry(), capacity=256, min_samples=64, seed=0)
    served = embed_with_onnx(tiny.onnx_path, tiny.tokenizer, list(sentences()[64:320]))
    monitor.observe(tiny, served[:63])
    assert monitor.scores("tiny", 1) is None  # too few to judge
    monitor.observe(tiny, served[63:])
    scores = monitor.scores("tiny", 1)
    assert scores is not None and scores.samples == 256
    assert scores.mmd < 0.03 and scores.mean_cosine_distance < 0.05
    assert monitor.scores("tiny", 2) is None and monitor.scores("nope", 1) is None


def test_a_version_without_usable_reference_stats_has_no_scores_and_says_so_once(
    store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    tiny1, tiny2 = store.get("tiny", 1), store.get("tiny", 2)
    assert tiny1 is not None and tiny2 is not None and tiny2.manifest.reference_stats is not None
    bare = dataclasses.replace(tiny1, manifest=tiny1.manifest.model_copy(update={"reference_stats": None}))
    skewed_stats = tiny2.manifest.reference_stats.model_copy(update={"sample": [[0.5, 0.5]] * 8})
    skewed = dataclasses.replace(tiny2, manifest=tiny2.manifest.model_copy(update={"reference_stats": skewed_stats}))
    monitor = DriftMonitor(ModelStore(store.repository, [bare, skewed], []), CollectorRegistry(), 8, min_samples=2)
    for version in (bare, skewed):
        monitor.observe(version, np.eye(4, version.dimension, dtype=np.float32))
    with caplog.at_level(logging.WARNING, logger="service.telemetry.drift"):
        assert monitor.scores("tiny", 1) is None and monitor.scores("tiny", 2) is None
        monitor.update_gauges()
    warnings = [r.__dict__ for r in caplog.records if r.getMessage() == "no drift scores for this version"]
    assert [(w["version"], "no reference_stats" in w["reason"]) for w in warnings] == [(1, True), (2, False)]


def test_bootstrap_writes_minilm_reference_stats_with_a_sample(store: ModelStore) -> None:
    minilm = store.get("minilm", 1)
    assert minilm is not None
    stats = minilm.manifest.reference_stats
    assert stats is not None and stats.count == 512 and len(stats.mean) == 384
    sample = np.asarray(stats.sample)
    assert sample.shape == (64, 384)
    np.testing.assert_allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-4)
    # Spread over the 512 reference texts, first to last (not the first 64: they share a few topics).
    ends = embed_with_onnx(minilm.onnx_path, minilm.tokenizer, [sentences()[0], sentences()[511]])
    np.testing.assert_allclose((sample[[0, -1]] * ends).sum(axis=1), 1.0, atol=1e-4)


def _random_token_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in itertools.count())
    return [" ".join(itertools.islice(words, rng.randint(4, 15))) for _ in range(count)]


async def test_the_gateway_exports_drift_of_what_it_serves(settings: Settings) -> None:
    async with running_gateway(settings) as (app, client):
        app.state.drift.update_gauges()
        found = await read_metrics(client)
        assert found["embedserve_drift_mmd"] == []  # declared for dashboards; no version has scores yet
        # Python-reference prose like the reference texts (sentences()[:512]), but none of them.
        prose = list(sentences()[600:1112])
        for start in range(0, len(prose), 64):
            response = await client.post("/v1/embeddings", json={"input": prose[start : start + 64], "model": "minilm"})
            assert response.status_code == 200
        app.state.drift.update_gauges()
        found = await read_metrics(client)
        in_distribution = metric(found, "embedserve_drift_mmd", model="minilm", version="1")
        in_cosine = metric(found, "embedserve_drift_mean_cosine_distance", model="minilm", version="1")
        assert 0 <= in_distribution < 0.03 and in_cosine < 0.2
        assert not [s for s in found["embedserve_drift_mmd"] if s.labels["model"] == "tiny"]  # nothing served

        # Random letter strings, served 8,192 times (mostly from the cache): a reservoir of 512 keeps ~6 % prose.
        gibberish = _random_token_texts(64, seed=5)
        for _ in range(4):
            response = await client.post("/v1/embeddings", json={"input": gibberish * 32, "model": "minilm"})
            assert response.status_code == 200
        # The gateway's own embeddings are not served traffic: kept out of the samples.
        minilm = app.state.store.get("minilm", 1)
        await app.state.embedder.embed(prose[:64], minilm, "analysis")
        app.state.drift.update_gauges()
        found = await read_metrics(client)
        out_of_distribution = metric(found, "embedserve_drift_mmd", model="minilm", version="1")
        out_cosine = metric(found, "embedserve_drift_mean_cosine_distance", model="minilm", version="1")
        assert out_of_distribution > 0.1 and out_of_distribution > 5 * in_distribution
        assert out_cosine > 0.2
        assert app.state.drift.samples("minilm", 1) == 512

        sampled = app.state.texts.sample("minilm")
        assert len(sampled) == settings.drift_text_sample_size == 256
        assert set(sampled) == set(gibberish) | set(prose[-192:])  # the most recent distinct texts
