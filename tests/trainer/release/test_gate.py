"""The gate's arithmetic: the paired bootstrap against a slow reference and hand-made numbers, the scoring
function against retrieval_metrics, the decision on hand-made encoders."""

import random
import re
import statistics

import numpy as np
import pytest

from tests.trainer.release.test_evaluate import embed_hashed, reference_retrieval
from trainer.config import ExportGateConfig
from trainer.data.sample_text import sentences
from trainer.release.dev_set import DevSet, labeled_dev_set
from trainer.release.evaluate import EmbedFn, LabeledPair, retrieval_metrics
from trainer.release.gate import failed_check, judge, paired_bootstrap, refusal, score


def slow_bootstrap(candidate: list[float], parent: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """One resample at a time: draw queries with replacement, mean difference; the 2.5th and 97.5th percentiles."""
    rng = random.Random(seed)
    n = len(candidate)
    means = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        means.append(sum(candidate[i] - parent[i] for i in picks) / n)
    means.sort()
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def test_identical_systems_give_an_interval_of_zero_and_clearly_better_ones_a_positive_lower_bound() -> None:
    same = np.array([1.0, 0.5, 0.0, 0.25, 1 / 3] * 40)
    assert paired_bootstrap(same, same, 500, seed=0) == (0.0, 0.0)  # lower bound 0: not > 0, refused
    better = np.minimum(same + 0.2, 1.0)
    low, high = paired_bootstrap(better, same, 500, seed=0)
    assert 0 < low <= float(np.mean(better - same)) <= high
    low, high = paired_bootstrap(same, better, 500, seed=0)
    assert low <= high < 0


def test_the_interval_matches_a_slow_reference_and_the_normal_approximation() -> None:
    rng = np.random.default_rng(7)
    parent = rng.choice([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 1.0], size=300)
    candidate = np.clip(parent + rng.normal(0.03, 0.2, size=300), 0, 1)
    low, high = paired_bootstrap(candidate, parent, 4000, seed=3)
    slow_low, slow_high = slow_bootstrap(list(candidate), list(parent), 4000, seed=11)
    differences = candidate - parent
    half_width = 1.96 * statistics.stdev(differences) / len(differences) ** 0.5
    mean = float(differences.mean())
    # Two independent bootstraps of 4,000 resamples agree to Monte Carlo error, and both with mean ± 1.96 SE.
    for ours, slow, normal in ((low, slow_low, mean - half_width), (high, slow_high, mean + half_width)):
        assert ours == pytest.approx(slow, abs=0.006) and ours == pytest.approx(normal, abs=0.006)
    assert low < mean < high
    assert paired_bootstrap(candidate, parent, 4000, seed=3) == (low, high)  # seeded: the same interval again


def test_the_scoring_function_matches_retrieval_metrics_and_a_slow_reference() -> None:
    texts = list(sentences()[:70])
    pairs = [LabeledPair(query=texts[i], document=texts[40 + i % 30]) for i in range(40)]
    scores = score(embed_hashed, labeled_dev_set(pairs)).summary()
    fast, slow = retrieval_metrics(embed_hashed, pairs), reference_retrieval(embed_hashed, pairs)
    assert 0 < scores["mrr@10"] < scores["recall@10"] < 1
    for name in ("mrr@10", "recall@10"):
        assert scores[name] == pytest.approx(fast[name], abs=1e-9) and scores[name] == pytest.approx(slow[name])


def topic_embedder(topics: dict[str, str]) -> EmbedFn:
    """Each text to the random vector of its topic: a query and its own document coincide (a perfect encoder)."""
    return lambda texts: embed_hashed([topics[text] for text in texts])


def test_a_perfect_encoder_passes_against_a_random_one_and_not_the_other_way_round() -> None:
    texts = list(sentences()[:120])
    dev_set = DevSet(texts[:60], texts[60:], list(range(60)), "self-supervised", seed=0)
    topics = {text: f"topic {i % 60}" for i, text in enumerate(texts)}
    perfect, random_encoder = topic_embedder(topics), embed_hashed
    config = ExportGateConfig(resamples=1000)

    passed = judge(perfect, random_encoder, "m@1", dev_set, config)
    assert passed.decision == "passed" and passed.candidate["mrr@10"] == 1.0
    assert passed.interval is not None and passed.difference is not None
    assert 0 < passed.interval[0] <= passed.difference <= passed.interval[1]
    assert passed.parent_scores is not None and passed.parent_scores["mrr@10"] < 0.5
    assert passed.dev_set is not None and passed.dev_set.sha256 == dev_set.sha256

    refused = judge(random_encoder, perfect, "m@1", dev_set, config)
    assert refused.decision == "refused" and refused.interval is not None and refused.interval[1] < 0
    message = refusal(refused)
    for part in ("m@1", "MRR@10", "interval", "--force", "learning_rate", "max_steps"):
        assert part in message, part
    assert failed_check(refused).startswith("mrr@10 ") and "lower bound" in failed_check(refused)

    same = judge(perfect, perfect, "m@1", dev_set, config)
    assert (same.decision, same.interval, same.difference) == ("refused", (0.0, 0.0), 0.0)
    # A release may tolerate a loss: the lower bound need only be above a negative min_delta.
    assert judge(perfect, perfect, "m@1", dev_set, config, min_delta=-0.01).decision == "passed"


def test_a_dev_set_too_small_to_compare_on_is_refused_with_what_to_do() -> None:
    dev_set = DevSet(["q"], ["d"], [0], "self-supervised", seed=0)
    gate = judge(embed_hashed, embed_hashed, "m@1", dev_set, ExportGateConfig())
    assert (gate.decision, gate.interval, gate.candidate) == ("refused", None, {})
    assert gate.dev_set is not None and gate.dev_set.queries == 1
    assert re.search(r"dev set has 1 pair\(s\).*export\.eval_file.*--force", refusal(gate))
