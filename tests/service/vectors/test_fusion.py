"""service.vectors.fusion against a slow, obviously correct reference, on hand-made and random rankings.

The reference re-reads the rules from the module's docstring one id at a time: it scans the whole leg for each id
(first place wins), computes each normalised score from its definition, and orders by comparing every pair of ids.
"""

import functools
import math
import random

import pytest
from pydantic import ValidationError

from service.vectors.fusion import (
    DEFAULT_CANDIDATES,
    DEFAULT_FUSION,
    HybridSettings,
    RrfFusion,
    WeightedFusion,
    fuse,
)

Leg = list[tuple[str, float]]


def reference_rank(leg: Leg, item: str) -> int | None:
    """1-based place of ``item`` in ``leg`` once earlier repeats of every id are dropped; None when absent."""
    place = 0
    seen: list[str] = []
    for candidate, _ in leg:
        if candidate in seen:
            continue
        seen.append(candidate)
        place += 1
        if candidate == item:
            return place
    return None


def reference_score(leg: Leg, item: str) -> float | None:
    for candidate, score in leg:
        if candidate == item:
            return score  # the first place's score
    return None


def reference_normalised(leg: Leg, item: str, normalization: str) -> float:
    distinct: list[str] = []
    for candidate, _ in leg:
        if candidate not in distinct:
            distinct.append(candidate)
    scores = [reference_score(leg, candidate) for candidate in distinct]
    values = [s for s in scores if s is not None]
    own = reference_score(leg, item)
    if not values or all(v == values[0] for v in values):
        return 0.0 if own is None else 1.0
    if normalization == "minmax":
        if own is None:
            return 0.0
        return (own - min(values)) / (max(values) - min(values))
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) * (v - mean) for v in values) / len(values))
    if own is None:
        return min((v - mean) / sd for v in values)
    return (own - mean) / sd


def reference_fuse(dense: Leg, keyword: Leg, fusion: RrfFusion | WeightedFusion) -> list[tuple[str, float]]:
    items: list[str] = []
    for candidate, _ in [*dense, *keyword]:
        if candidate not in items:
            items.append(candidate)
    fused: dict[str, float] = {}
    best: dict[str, int] = {}
    for item in items:
        ranks = [r for r in (reference_rank(dense, item), reference_rank(keyword, item)) if r is not None]
        best[item] = min(ranks)
        if isinstance(fusion, RrfFusion):
            total = 0.0
            for leg in (dense, keyword):
                rank = reference_rank(leg, item)
                if rank is not None:
                    total += 1.0 / (fusion.k + rank)
            fused[item] = total
        else:
            d = reference_normalised(dense, item, fusion.normalization)
            k = reference_normalised(keyword, item, fusion.normalization)
            fused[item] = fusion.alpha * d + (1.0 - fusion.alpha) * k

    def before(a: str, b: str) -> int:
        if fused[a] != fused[b]:
            return -1 if fused[a] > fused[b] else 1
        if best[a] != best[b]:
            return -1 if best[a] < best[b] else 1
        return -1 if a < b else 1

    return [(item, fused[item]) for item in sorted(items, key=functools.cmp_to_key(before))]


def assert_same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [item for item, _ in got] == [item for item, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-12)


FUSIONS = [
    RrfFusion(method="rrf", k=0),
    RrfFusion(method="rrf", k=1),
    RrfFusion(method="rrf", k=60),
    WeightedFusion(method="weighted", alpha=0.0, normalization="minmax"),
    WeightedFusion(method="weighted", alpha=0.3, normalization="minmax"),
    WeightedFusion(method="weighted", alpha=1, normalization="minmax"),
    WeightedFusion(method="weighted", alpha=0.5, normalization="zscore"),
    WeightedFusion(method="weighted", alpha=0.8, normalization="zscore"),
]

HAND_MADE: dict[str, tuple[Leg, Leg]] = {
    "disjoint": ([("a", 0.9), ("b", 0.8)], [("c", 12.0), ("d", 3.0)]),
    "overlap": ([("a", 0.9), ("b", 0.8), ("c", 0.1)], [("c", 9.0), ("a", 4.0), ("e", 1.0)]),
    "keyword empty": ([("a", 0.9), ("b", 0.5), ("c", 0.2)], []),
    "dense empty": ([], [("x", 3.0), ("y", 2.0)]),
    "both empty": ([], []),
    "duplicates within a leg": ([("a", 0.9), ("b", 0.7), ("a", 0.95), ("c", 0.1)], [("b", 5.0), ("b", 1.0), ("d", 2)]),
    # Every id's fused score ties with its mirror's: the better best rank, then the smaller id, decide.
    "ties by place": ([("b", 0.9), ("d", 0.5)], [("a", 9.0), ("c", 5.0)]),
    "ties everywhere": ([("z", 1.0), ("y", 1.0), ("x", 1.0)], [("y", 2.0), ("z", 2.0), ("w", 2.0)]),
    "one hit each": ([("a", 0.3)], [("a", 7.0)]),
    "negative cosines": ([("a", -0.1), ("b", -0.4), ("c", -0.9)], [("c", 1.5), ("b", 1.5)]),
}


@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: f.label)
@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_hand_made_rankings_match_the_reference(case: str, fusion: RrfFusion | WeightedFusion) -> None:
    dense, keyword = HAND_MADE[case]
    assert_same(fuse(dense, keyword, fusion), reference_fuse(dense, keyword, fusion))


def test_the_rules_by_hand() -> None:
    """A few fused rankings worked out on paper, so the reference itself is checked too."""
    rrf = RrfFusion(method="rrf", k=1)
    # a: 1/(1+1) + 1/(1+2) = 0.8333; c: 1/(1+3) + 1/(1+1) = 0.75; b: 1/3; e: 1/4
    assert_same(fuse(*HAND_MADE["overlap"], rrf), [("a", 5 / 6), ("c", 0.75), ("b", 1 / 3), ("e", 0.25)])
    # Duplicates: "a" keeps its first place (1), "c" is third, not fourth; "b" is first in keyword, "d" second:
    # b 1/3 + 1/2, a 1/2, d 1/3, c 1/4.
    dense, keyword = HAND_MADE["duplicates within a leg"]
    assert_same(fuse(dense, keyword, rrf), [("b", 5 / 6), ("a", 0.5), ("d", 1 / 3), ("c", 0.25)])
    # Ties: b (dense 1) and a (keyword 1) score 1/2 each; best ranks tie at 1, so the smaller id, a, comes first.
    assert [item for item, _ in fuse(*HAND_MADE["ties by place"], rrf)] == ["a", "b", "c", "d"]
    # Weighted min-max: a missing id counts 0 in that leg; one side empty gives the other's order.
    half = WeightedFusion(method="weighted", alpha=0.5, normalization="minmax")
    assert_same(fuse(*HAND_MADE["disjoint"], half), [("a", 0.5), ("c", 0.5), ("b", 0.0), ("d", 0.0)])
    assert [item for item, _ in fuse(*HAND_MADE["keyword empty"], half)] == ["a", "b", "c"]
    assert_same(fuse(*HAND_MADE["dense empty"], half), [("x", 0.5), ("y", 0.0)])
    assert fuse([], [], half) == [] and fuse([], [], rrf) == []
    # A leg whose scores are all equal: 1 for its ids, 0 for the others.
    assert_same(fuse([("a", 0.3)], [("b", 2.0), ("c", 1.0)], half), [("a", 0.5), ("b", 0.5), ("c", 0.0)])
    # z-score: dense (0.9, 0.5, 0.1) -> (1.2247, 0, -1.2247); d, missing from dense, counts -1.2247 there and ties
    # with c, but its best rank (1, in keyword) beats c's (3).
    z = WeightedFusion(method="weighted", alpha=1.0, normalization="zscore")
    dense_z = fuse([("a", 0.9), ("b", 0.5), ("c", 0.1)], [("d", 1.0)], z)
    assert_same(dense_z, [("a", math.sqrt(1.5)), ("b", 0.0), ("d", -math.sqrt(1.5)), ("c", -math.sqrt(1.5))])


def random_leg(rng: random.Random, ids: list[str], *, scale: float, ties: bool) -> Leg:
    size = rng.randint(0, len(ids))
    chosen = rng.sample(ids, size)
    if rng.random() < 0.3 and chosen:  # repeats
        chosen += rng.choices(chosen, k=rng.randint(1, 3))
    if ties:
        scores = sorted((rng.randint(0, 3) * scale for _ in chosen), reverse=True)
    else:
        scores = sorted((rng.random() * scale for _ in chosen), reverse=True)
    return list(zip(chosen, scores, strict=True))


@pytest.mark.parametrize("seed", range(200))
def test_random_rankings_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"id{n}" for n in range(rng.randint(1, 25))]
    dense = random_leg(rng, ids, scale=1.0, ties=seed % 3 == 0)
    keyword = random_leg(rng, ids, scale=20.0, ties=seed % 4 == 0)
    for fusion in [
        RrfFusion(method="rrf", k=rng.randint(0, 100)),
        WeightedFusion(method="weighted", alpha=round(rng.random(), 2), normalization="minmax"),
        WeightedFusion(method="weighted", alpha=round(rng.random(), 2), normalization="zscore"),
    ]:
        assert_same(fuse(dense, keyword, fusion), reference_fuse(dense, keyword, fusion))


def test_settings_defaults_and_bounds() -> None:
    assert HybridSettings().resolved().fusion == DEFAULT_FUSION
    assert HybridSettings().resolved().candidates == DEFAULT_CANDIDATES
    custom = HybridSettings.model_validate({"fusion": {"method": "weighted", "alpha": 1}, "candidates": 7})
    assert custom.resolved().fusion == WeightedFusion(method="weighted", alpha=1, normalization="minmax")
    for bad in [
        {"fusion": {"method": "weighted", "alpha": 1.5}},
        {"fusion": {"method": "weighted", "alpha": "0.5"}},
        {"fusion": {"method": "weighted"}},
        {"fusion": {"method": "weighted", "alpha": 0.5, "normalization": "l2"}},
        {"fusion": {"method": "rrf", "k": -1}},
        {"fusion": {"method": "rrf", "k": 1.5}},
        {"fusion": {"method": "rrf", "alpha": 0.5}},
        {"fusion": {"method": "borda"}},
        {"candidates": 0},
        {"candidates": 1001},
        {"candidates": True},
    ]:
        with pytest.raises(ValidationError):
            HybridSettings.model_validate(bad)
