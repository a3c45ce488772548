"""Retrieval quality of a collection on labelled pairs: dense, keyword and every fusion setting of a grid.

Each query's legs are fetched once, ``candidates`` deep, through the search route (modes dense and keyword, ids and
scores only), and fused here with ``service.vectors.fusion`` for every setting: the figures are those the hybrid
search route returns for that setting and depth, without a request per setting.

Metrics, on the top 10 of each ranking, for a query whose relevant ids are R (pairs sharing a query are one query):
recall@k = |R ∩ top k| / |R|; MRR@10 = 1 / the place of the first relevant hit (0 when none); nDCG@10 = Σ over
relevant hits of 1 / log2(place + 1), divided by its best possible value (binary gains). The primary metric, which
the suggestion maximises, is nDCG@10: it rewards both finding the item (recall) and placing it high (MRR).
"""

import asyncio
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.async_gateway import AsyncGateway
from client.protocol import SearchMode
from service.vectors.fusion import RrfFusion, WeightedFusion, fuse

PRIMARY = "ndcg@10"
METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
TOP = 10
RRF_KS = (1, 5, 10, 20, 40, 60, 100)
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Fusion = RrfFusion | WeightedFusion
Ranking = list[tuple[str, float]]


class PairsError(ValueError):
    """The pairs file is not what ``read_pairs`` takes; the message names the line."""


@dataclass(frozen=True)
class LabelledQuery:
    query: str
    relevant: frozenset[str]


@dataclass(frozen=True)
class Legs:
    """One query's dense and keyword rankings, each ``candidates`` deep, best first."""

    dense: Ranking
    keyword: Ranking


@dataclass
class Scores:
    """Summed per-query metrics of one ranking method; ``means`` divides by the query count."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    queries: int = 0

    def add(self, ranked_ids: Sequence[str], relevant: frozenset[str]) -> None:
        for name, value in query_metrics(ranked_ids, relevant).items():
            self.sums[name] += value
        self.queries += 1

    def means(self) -> dict[str, float]:
        return {name: round(total / self.queries, 4) if self.queries else 0.0 for name, total in self.sums.items()}


def read_pairs(path: Path) -> list[LabelledQuery]:
    """JSON lines ``{"query": str, "relevant_id": str}``; lines with the same query make one query with several
    relevant ids. Blank lines are skipped."""
    relevant: dict[str, set[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except ValueError:
            raise PairsError(f"{path}:{number}: not JSON") from None
        if (
            not isinstance(pair, dict)
            or not isinstance(pair.get("query"), str)
            or not pair["query"].strip()
            or not isinstance(pair.get("relevant_id"), str)
        ):
            raise PairsError(f'{path}:{number}: expected {{"query": "<text>", "relevant_id": "<item id>"}}')
        relevant.setdefault(pair["query"], set()).add(pair["relevant_id"])
    if not relevant:
        raise PairsError(f"{path}: no pairs")
    return [LabelledQuery(query, frozenset(ids)) for query, ids in relevant.items()]


def query_metrics(ranked_ids: Sequence[str], relevant: frozenset[str]) -> dict[str, float]:
    """recall@1, recall@10, MRR@10 and nDCG@10 of one ranking (see the module's definitions)."""
    top = list(ranked_ids[:TOP])
    places = [place for place, item in enumerate(top, start=1) if item in relevant]
    ideal = sum(1.0 / math.log2(place + 1) for place in range(1, min(len(relevant), TOP) + 1))
    return {
        "recall@1": len(relevant.intersection(top[:1])) / len(relevant),
        "recall@10": len(relevant.intersection(top)) / len(relevant),
        "mrr@10": 1.0 / places[0] if places else 0.0,
        "ndcg@10": sum(1.0 / math.log2(place + 1) for place in places) / ideal,
    }


def fusion_grid(rrf_ks: Iterable[int] = RRF_KS, alphas: Iterable[float] = ALPHAS) -> list[Fusion]:
    """RRF with each k, then weighted fusion with each alpha, min-max then z-score."""
    grid: list[Fusion] = [RrfFusion(method="rrf", k=k) for k in rrf_ks]
    for normalization in ("minmax", "zscore"):
        grid += [WeightedFusion(method="weighted", alpha=alpha, normalization=normalization) for alpha in alphas]
    return grid


async def fetch_legs(
    client: AsyncGateway, name: str, queries: list[LabelledQuery], depth: int, concurrency: int = 4
) -> list[Legs]:
    """Each query's dense and keyword legs, ``depth`` deep, ``concurrency`` searches at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def leg(query: str, mode: SearchMode) -> Ranking:
        async with gate:
            result = await client.search(name, query, mode, depth, output_fields=[])
            return [(hit.id, hit.score) for hit in result.hits]

    async def legs(query: str) -> Legs:
        dense, keyword = await asyncio.gather(leg(query, "dense"), leg(query, "keyword"))
        return Legs(dense, keyword)

    return list(await asyncio.gather(*(legs(labelled.query) for labelled in queries)))


def rankings(legs: Legs, settings: list[Fusion]) -> dict[str, Ranking]:
    """One query's ranking by dense, keyword and each fusion setting (by its label)."""
    ranked = {"dense": legs.dense, "keyword": legs.keyword}
    for setting in settings:
        ranked[setting.label] = fuse(legs.dense, legs.keyword, setting)
    return ranked


def score_settings(
    queries: list[LabelledQuery], legs: list[Legs], settings: list[Fusion]
) -> dict[str, dict[str, float]]:
    """Mean metrics of dense, keyword and each fusion setting (by its label), over ``queries``."""
    ranked: dict[str, list[Ranking]] = {}
    for query_legs in legs:
        for label, ranking in rankings(query_legs, settings).items():
            ranked.setdefault(label, []).append(ranking)
    return {label: mean_metrics(queries, rankings_of_label) for label, rankings_of_label in ranked.items()}


def mean_metrics(queries: list[LabelledQuery], rankings: list[Ranking]) -> dict[str, float]:
    """Mean metrics of one ranking per query, rounded to 4 places."""
    scores = Scores()
    for labelled, ranking in zip(queries, rankings, strict=True):
        scores.add([item for item, _ in ranking], labelled.relevant)
    return scores.means()


def best_setting(figures: dict[str, dict[str, float]], settings: list[Fusion]) -> Fusion:
    """The setting with the highest primary metric; ties go to MRR@10, recall@10, then the earlier in the grid."""
    return max(
        settings,
        key=lambda s: (figures[s.label][PRIMARY], figures[s.label]["mrr@10"], figures[s.label]["recall@10"]),
    )


async def evaluate(
    client: AsyncGateway,
    name: str,
    queries: list[LabelledQuery],
    candidates: int | None = None,
    grid: list[Fusion] | None = None,
    concurrency: int = 4,
) -> dict[str, Any]:
    """The report of ``embedserve collections evaluate``: every method's metrics, the collection's default, the
    suggested setting."""
    collection = await client.collection(name)
    depth = max(candidates or collection.hybrid.candidates, TOP)
    settings = list(grid if grid is not None else fusion_grid())
    if collection.hybrid.fusion not in settings:
        settings.append(collection.hybrid.fusion)
    legs = await fetch_legs(client, name, queries, depth, concurrency)
    figures = score_settings(queries, legs, settings)
    best = best_setting(figures, settings)
    default = collection.hybrid.fusion
    return {
        "collection": name,
        "model": collection.model_version,
        "items": collection.items,
        "queries": len(queries),
        "pairs": sum(len(q.relevant) for q in queries),
        "candidates": depth,
        "primary_metric": PRIMARY,
        "results": [
            {"method": label, "fusion": _fusion_json(settings, label), **metrics} for label, metrics in figures.items()
        ],
        "collection_default": {"fusion": default.model_dump(), "label": default.label, **figures[default.label]},
        "suggested": {
            "fusion": best.model_dump(),
            "candidates": depth,
            "label": best.label,
            **figures[best.label],
            "gain_over_default": {m: round(figures[best.label][m] - figures[default.label][m], 4) for m in METRICS},
        },
    }


def _fusion_json(settings: list[Fusion], label: str) -> dict[str, Any] | None:
    return next((s.model_dump() for s in settings if s.label == label), None)


def table(report: dict[str, Any]) -> str:
    """The report as a table a person reads: one line per method, the default and the suggestion marked."""
    default, suggested = report["collection_default"]["label"], report["suggested"]["label"]
    lines = [
        f"collection {report['collection']} ({report['model']}, {report['items']} items): {report['queries']} "
        f"queries, {report['pairs']} relevant pairs, legs {report['candidates']} deep",
        f"  {'method':<32}" + "".join(f"{m:>11}" for m in METRICS),
    ]
    for row in report["results"]:
        mark = " *" if row["method"] == suggested else " d" if row["method"] == default else "  "
        lines.append(f"{mark}{row['method']:<32}" + "".join(f"{row[m]:>11.4f}" for m in METRICS))
    gain = report["suggested"]["gain_over_default"]
    lines.append(
        f"suggested (*, best {report['primary_metric']}): {suggested}, candidates {report['candidates']}; against the "
        f"collection's default (d, {default}): " + ", ".join(f"{m} {gain[m]:+.4f}" for m in METRICS)
    )
    if suggested != default:
        lines.append(
            f"to make it the default: PATCH /v1/collections/{report['collection']} "
            + json.dumps({"hybrid": {"fusion": report["suggested"]["fusion"], "candidates": report["candidates"]}})
        )
    return "\n".join(lines)
