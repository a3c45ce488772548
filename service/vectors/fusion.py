"""Fusion of a dense and a keyword ranking into one hybrid ranking, and the settings that choose how.

Pure (pydantic and the standard library only: no web framework, no Milvus), so the search route and the evaluation
client (``client.evaluate``) rank the same way from the same legs. Each method is tested against a slow reference in
``tests/service/vectors/test_fusion.py``.

The rules, for every method:
- A leg is a list of (id, score), best first. An id repeated within a leg keeps its first (best) place; later repeats
  are dropped before anything else. An id's rank in a leg is its 1-based place in the leg so cleaned.
- ``rrf``, reciprocal-rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009): fused = Σ 1 / (k + rank) over the legs
  that hold the id. Scores are not used, only places.
- ``weighted``: each leg's scores are normalised on their own — ``minmax``: (s - min) / (max - min); ``zscore``:
  (s - mean) / standard deviation (population) — and fused = alpha · dense + (1 - alpha) · keyword. An id missing from
  a leg counts as that leg's lowest normalised score (0 with min-max): a leg cut at its depth says only that the id
  scored no better than its last hit. A leg whose scores are all equal normalises to 1 for its ids and 0 for the
  missing; an empty leg gives 0 to every id.
- Ties on the fused score go to the id with the better (smaller) best rank in either leg, then to the smaller id, so
  the order never depends on the order of dictionaries or on which leg answered first.
"""

import math
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

Ranked = tuple[str, float]  # (id, score), higher score = better

MAX_CANDIDATES = 1000
# Chosen by measurement on the man-page retrieval set of make bench-search (README, "Hybrid search").
DEFAULT_CANDIDATES = 100
DEFAULT_RRF_K = 60


class RrfFusion(BaseModel):
    """Reciprocal-rank fusion: each leg gives an id 1 / (k + rank)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["rrf"]
    k: Annotated[StrictInt, Field(ge=0, le=10_000)] = Field(
        DEFAULT_RRF_K, description="The rank offset: larger k flattens the difference between first and later places."
    )

    @property
    def label(self) -> str:
        return f"rrf k={self.k}"


class WeightedFusion(BaseModel):
    """A weighted sum of each leg's normalised scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["weighted"]
    alpha: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)] = Field(
        description="The dense leg's weight, between 0 and 1; the keyword leg gets 1 - alpha."
    )
    normalization: Literal["minmax", "zscore"] = Field(
        "minmax", description="How each leg's scores are put on one scale before they are weighed."
    )

    @property
    def label(self) -> str:
        return f"weighted {self.normalization} alpha={self.alpha:g}"


Fusion = Annotated[RrfFusion | WeightedFusion, Field(discriminator="method")]

DEFAULT_FUSION: RrfFusion | WeightedFusion = WeightedFusion(method="weighted", alpha=0.5, normalization="zscore")


class HybridSettings(BaseModel):
    """A collection's hybrid-search defaults; a field left out (or null) is the gateway's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fusion: Fusion | None = Field(
        None,
        description='How the legs are fused: {"method": "rrf", "k": 60} or {"method": "weighted", "alpha": '
        '0.5, "normalization": "minmax"|"zscore"}.',
    )
    candidates: Annotated[StrictInt, Field(ge=1, le=MAX_CANDIDATES)] | None = Field(
        None, description="Hits each leg retrieves before fusion (raised to top_k when smaller)."
    )

    def resolved(self) -> "ResolvedHybrid":
        return ResolvedHybrid(
            fusion=self.fusion if self.fusion is not None else DEFAULT_FUSION,
            candidates=self.candidates if self.candidates is not None else DEFAULT_CANDIDATES,
        )


class ResolvedHybrid(BaseModel):
    """Hybrid settings with every default filled in."""

    model_config = ConfigDict(frozen=True)

    fusion: Fusion
    candidates: int


def fuse(dense: Sequence[Ranked], keyword: Sequence[Ranked], fusion: RrfFusion | WeightedFusion) -> list[Ranked]:
    """Every id of either leg with its fused score, best first (see the module's rules)."""
    dense, keyword = first_places(dense), first_places(keyword)
    if isinstance(fusion, RrfFusion):
        scores = _rrf(dense, keyword, fusion.k)
    else:
        scores = _weighted(dense, keyword, fusion.alpha, fusion.normalization)
    best_rank: dict[str, int] = {}
    for leg in (dense, keyword):
        for rank, (item, _) in enumerate(leg, start=1):
            best_rank[item] = min(rank, best_rank.get(item, rank))
    order = sorted(scores, key=lambda item: (-scores[item], best_rank[item], item))
    return [(item, scores[item]) for item in order]


def first_places(leg: Iterable[Ranked]) -> list[Ranked]:
    """``leg`` without the repeats of an id (its first place kept)."""
    seen: set[str] = set()
    kept: list[Ranked] = []
    for item, score in leg:
        if item not in seen:
            seen.add(item)
            kept.append((item, score))
    return kept


def _rrf(dense: list[Ranked], keyword: list[Ranked], k: int) -> dict[str, float]:
    scores: dict[str, float] = {}
    for leg in (dense, keyword):
        for rank, (item, _) in enumerate(leg, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return scores


def _weighted(
    dense: list[Ranked], keyword: list[Ranked], alpha: float, normalization: Literal["minmax", "zscore"]
) -> dict[str, float]:
    dense_scores, dense_missing = _normalised(dense, normalization)
    keyword_scores, keyword_missing = _normalised(keyword, normalization)
    return {
        item: alpha * dense_scores.get(item, dense_missing) + (1.0 - alpha) * keyword_scores.get(item, keyword_missing)
        for item in [*dense_scores, *keyword_scores]
    }


def _normalised(leg: list[Ranked], normalization: Literal["minmax", "zscore"]) -> tuple[dict[str, float], float]:
    """(each id's normalised score, the score of an id missing from the leg)."""
    values = [score for _, score in leg]
    if not values or min(values) == max(values):
        return {item: 1.0 for item, _ in leg}, 0.0
    if normalization == "minmax":
        low, high = min(values), max(values)
        return {item: (score - low) / (high - low) for item, score in leg}, 0.0
    mean = math.fsum(values) / len(values)
    deviation = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / len(values))
    normalised = {item: (score - mean) / deviation for item, score in leg}
    return normalised, min(normalised.values())
