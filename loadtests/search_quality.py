"""make bench-search, quality: dense, keyword and hybrid retrieval on text nobody here wrote, through the gateway.

Retrieval set: the man pages installed on this machine (``loadtests.manpages``: query = the one-line NAME
description, relevant item = the page, stored as the first ``TEXT_CHARS`` characters of its body). Every page is an
item of one collection on minilm@1, upserted through ``/v1/collections/.../items``; each query's dense and keyword
legs are fetched through ``/v1/collections/.../search`` and fused with ``service.vectors.fusion`` for every setting
of ``client.evaluate``'s grid at each depth (a leg ``d`` deep is the first ``d`` of a deeper one).

Against over-fitting, the queries (``--queries`` of them, picked by a hash of the page) are split in two halves:
the defaults are chosen on the first (the best nDCG@10; its depth, the smallest within ``DEPTH_TOLERANCE`` of the
deepest's), every figure is reported on the second. A sample of queries checks that the hybrid route itself returns
what the local fusion gives.

Keyword analysers: the same pages in two collections built alike in this process, one per analyser (vectors
synthetic: the keyword leg does not read them), the gateway's collection, and a plain Python BM25 with statistics
over every page (``loadtests.bm25``) with each analysis, an English stemmer among them (Milvus's ``english``
analyser; Lite has none).
"""

import asyncio
import hashlib
import itertools
import time
from pathlib import Path
from typing import Any

import snowballstemmer
from prometheus_client import CollectorRegistry

from client.async_gateway import AsyncGateway
from client.evaluate import (
    METRICS,
    PRIMARY,
    LabelledQuery,
    Legs,
    Ranking,
    fetch_legs,
    fusion_grid,
    mean_metrics,
    score_settings,
)
from client.gateway import Gateway
from loadtests.bm25 import Bm25, word_tokens
from loadtests.manpages import ManPage
from service.settings import Settings
from service.vectors.catalog import Encoder
from service.vectors.fusion import DEFAULT_CANDIDATES, DEFAULT_FUSION, RrfFusion, WeightedFusion, fuse
from service.vectors.keywords import BM25_B, BM25_K1, ENGLISH_STOP_WORDS
from service.vectors.metrics import VectorMetrics
from service.vectors.protocol import ItemIn, SearchRequest
from service.vectors.store import VectorStore

COLLECTION = "manpages"
TEXT_CHARS = 4000
DEPTHS = (20, 50, 100)
DEPTH_TOLERANCE = 0.001  # nDCG@10: a shallower depth this close to the deepest's is as good, and cheaper
ROUTE_CHECKS = 25
LITE_DEFAULT_K1 = 1.5
TARGET_POINTS = 0.03

Fusion = RrfFusion | WeightedFusion


def item_id(index: int) -> str:
    return f"man{index:05d}"


def halves(pages: list[ManPage], queries: int) -> tuple[list[int], list[int]]:
    """Indexes of the pages whose descriptions are the queries defaults are chosen on, and of those they are
    reported on: ``queries`` pages (0: all) in the order of a hash of each page, alternately."""
    order = sorted(
        range(len(pages)), key=lambda i: hashlib.sha256(f"{pages[i].name}\n{pages[i].description}".encode()).digest()
    )
    sample = order[:queries] if queries else order
    return sample[0::2], sample[1::2]


def upsert_pages(url: str, pages: list[ManPage], batch: int = 100) -> float:
    """Create the collection and upsert every page through the gateway, ``batch`` a request; items/s."""
    items = ({"id": item_id(i), "text": page.body[:TEXT_CHARS]} for i, page in enumerate(pages))
    batches, upserted = itertools.count(), 0

    def show(count: int) -> None:
        nonlocal upserted
        upserted += count
        if next(batches) % 20 == 0:
            print(f"  {upserted} pages upserted", flush=True)

    with Gateway(url, timeout_s=600) as gateway:
        gateway.create_collection(COLLECTION, "minilm@1")
        started = time.perf_counter()
        gateway.upsert(COLLECTION, items, batch_size=batch, progress=show)
        return len(pages) / (time.perf_counter() - started)


async def fetch_all_legs(url: str, queries: list[LabelledQuery], depth: int) -> list[Legs]:
    async with AsyncGateway(url, timeout_s=600) as gateway:
        return await fetch_legs(gateway, COLLECTION, queries, depth, concurrency=4)


def at_depth(legs: list[Legs], depth: int) -> list[Legs]:
    return [Legs(q.dense[:depth], q.keyword[:depth]) for q in legs]


def choose_defaults(figures: dict[int, dict[str, dict[str, float]]], grid: list[Fusion]) -> tuple[Fusion, int]:
    """The setting with the best nDCG@10 at the deepest depth, and the smallest depth within ``DEPTH_TOLERANCE``."""
    deepest = figures[max(DEPTHS)]
    best = max(grid, key=lambda s: (deepest[s.label][PRIMARY], deepest[s.label]["mrr@10"]))
    depth = min(d for d in DEPTHS if figures[d][best.label][PRIMARY] >= deepest[best.label][PRIMARY] - DEPTH_TOLERANCE)
    return best, depth


def check_route(url: str, queries: list[LabelledQuery], legs: list[Legs]) -> dict[str, float]:
    """Hybrid searches with the gateway's defaults against the local fusion of the legs: how many were checked, how
    many gave the same ids in the same order, the largest score difference (a query embedded in a batch with others
    can differ from itself alone in the 8th digit)."""
    same, largest = 0, 0.0
    with Gateway(url) as gateway:
        for labelled, query_legs in list(zip(queries, legs, strict=True))[:ROUTE_CHECKS]:
            hits = gateway.search(COLLECTION, labelled.query, "hybrid", 10, output_fields=[]).hits
            depth_legs = at_depth([query_legs], DEFAULT_CANDIDATES)[0]
            expected = fuse(depth_legs.dense, depth_legs.keyword, DEFAULT_FUSION)[:10]
            same += [hit.id for hit in hits] == [item for item, _ in expected]
            largest = max([largest, *(abs(h.score - e) for h, (_, e) in zip(hits, expected, strict=False))])
    return {"queries": min(ROUTE_CHECKS, len(queries)), "same_ids": same, "largest_score_difference": largest}


def quality(
    url: str, pages: list[ManPage], queries: int, work: Path, repository: Path, encoder: Encoder
) -> dict[str, Any]:
    """Upsert every page, fetch the legs of ``queries`` of them (0: all), score every setting on both halves, choose
    on the first; then the keyword analysers (``encoder`` fills the collections built for them)."""
    choose, report = halves(pages, queries)
    labelled = {i: LabelledQuery(pages[i].description, frozenset({item_id(i)})) for i in [*choose, *report]}
    print(f"quality: upserting {len(pages)} man pages ...", flush=True)
    upsert_per_s = upsert_pages(url, pages)
    print(f"quality: fetching the legs of {len(labelled)} queries, {max(DEPTHS)} deep ...", flush=True)
    started = time.perf_counter()
    legs = dict(zip(labelled, asyncio.run(fetch_all_legs(url, list(labelled.values()), max(DEPTHS))), strict=True))
    legs_s = time.perf_counter() - started
    grid = fusion_grid()
    if DEFAULT_FUSION not in grid:
        grid.append(DEFAULT_FUSION)
    figures: dict[str, dict[int, dict[str, dict[str, float]]]] = {"choose": {}, "report": {}}
    for half, indexes in (("choose", choose), ("report", report)):
        for depth in DEPTHS:
            depth_legs = at_depth([legs[i] for i in indexes], depth)
            figures[half][depth] = score_settings([labelled[i] for i in indexes], depth_legs, grid)
    chosen, chosen_depth = choose_defaults(figures["choose"], grid)
    checked = check_route(url, [labelled[i] for i in report], [legs[i] for i in report])
    print("quality: keyword analysers ...", flush=True)
    return {
        "set": {
            "source": "/usr/share/man (man1, man8): query = NAME description, item = page body",
            "pages": len(pages),
            "gcloud_pages": sum(page.name.startswith("gcloud") for page in pages),
            "item_text": f"the first {TEXT_CHARS} characters of the page body",
            "choose_queries": len(choose),
            "report_queries": len(report),
        },
        "upsert_items_per_s": round(upsert_per_s, 1),
        "legs_fetch_s": round(legs_s, 1),
        "primary_metric": PRIMARY,
        "depths": list(DEPTHS),
        "figures": {half: {str(d): by_depth[d] for d in DEPTHS} for half, by_depth in figures.items()},
        "chosen": {"fusion": chosen.model_dump(), "label": chosen.label, "candidates": chosen_depth},
        "gateway_default": {
            "fusion": DEFAULT_FUSION.model_dump(),
            "label": DEFAULT_FUSION.label,
            "candidates": DEFAULT_CANDIDATES,
        },
        "verdict": verdict(figures["report"]),
        "route_against_local_fusion": checked,
        "analyzers": asyncio.run(analyzers(work, repository, pages, (choose, report), legs, encoder)),
    }


def verdict(report: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The gateway's default hybrid against the better of dense and keyword, on the report half."""
    depth = DEFAULT_CANDIDATES if DEFAULT_CANDIDATES in report else max(DEPTHS)
    figures = report[depth]
    hybrid = figures[DEFAULT_FUSION.label]
    better = {m: max(figures["dense"][m], figures["keyword"][m]) for m in METRICS}
    gains = {m: round(hybrid[m] - better[m], 4) for m in METRICS}
    return {
        "default_hybrid": hybrid,
        "better_of_dense_and_keyword": better,
        "gain": gains,
        "target_points": TARGET_POINTS,
        "met": gains["recall@10"] >= TARGET_POINTS and gains["mrr@10"] >= TARGET_POINTS,
    }


async def analyzers(
    work: Path,
    repository: Path,
    pages: list[ManPage],
    sample: tuple[list[int], list[int]],
    gateway_legs: dict[int, Legs],
    encoder: Encoder,
) -> dict[str, dict[str, dict[str, float]]]:
    """Keyword metrics on each half: Milvus Lite with each analyser, both collections built alike here (``encoder``'s
    vectors, which the keyword leg never reads; upserts of 100 pages in a row), the gateway's collection (upserts of
    100 pages as each is embedded: Lite flushes in between), and the Python reference with each analysis."""
    texts = [page.body[:TEXT_CHARS] for page in pages]
    indexes = [*sample[0], *sample[1]]
    labelled = {i: LabelledQuery(pages[i].description, frozenset({item_id(i)})) for i in indexes}
    rankings: dict[str, dict[int, Ranking]] = {}
    for analyzer in ("standard", "english_stop"):
        settings = Settings(
            model_repository=repository, milvus_uri=str(work / f"{analyzer}.db"), keyword_analyzer=analyzer
        )
        store = VectorStore(settings, encoder, VectorMetrics(CollectorRegistry()))
        ranked: dict[int, Ranking] = {}
        try:
            await store.create("pages", "minilm@1", {})
            for start in range(0, len(texts), 100):
                items = [ItemIn(id=item_id(i), text=texts[i]) for i in range(start, min(len(texts), start + 100))]
                await store.upsert("pages", items)
            for i in indexes:
                request = SearchRequest(query=labelled[i].query, mode="keyword", top_k=10, output_fields=[])
                hits, _ = await store.search("pages", request)
                ranked[i] = [(hit.id, hit.score) for hit in hits]
        finally:
            await store.close()
        rankings[f"milvus lite {analyzer}"] = ranked
    rankings["milvus lite english_stop, loaded through the gateway"] = {
        i: gateway_legs[i].keyword[:10] for i in indexes
    }
    stemmer = snowballstemmer.stemmer("english")
    references = {
        "python standard, k1 1.5": Bm25(texts, word_tokens(), k1=LITE_DEFAULT_K1, b=BM25_B),
        "python english_stop": Bm25(texts, word_tokens(ENGLISH_STOP_WORDS), k1=BM25_K1, b=BM25_B),
        "python english_stop + Porter2 stemmer": Bm25(
            texts, word_tokens(ENGLISH_STOP_WORDS, stemmer.stemWords), k1=BM25_K1, b=BM25_B
        ),
    }
    for label, bm25 in references.items():
        rankings[label] = {i: [(item_id(d), s) for d, s in bm25.top(labelled[i].query, 10)] for i in indexes}
    return {
        half: {label: mean_metrics([labelled[i] for i in part], [r[i] for i in part]) for label, r in rankings.items()}
        for half, part in zip(("choose", "report"), sample, strict=True)
    }


def print_quality(quality: dict[str, Any]) -> None:
    if "skipped" in quality:
        print(f"\nquality: {quality['skipped']}")
        return
    chosen, default = quality["chosen"], quality["gateway_default"]
    sizes = quality["set"]
    print(
        f"\nquality on {sizes['pages']} man pages ({sizes['gcloud_pages']} of them gcloud's); defaults chosen on "
        f"{sizes['choose_queries']} queries, figures on the other {sizes['report_queries']}"
    )
    depth = str(default["candidates"])
    figures = quality["figures"]["report"][depth]
    labels = ["dense", "keyword", *sorted({default["label"], chosen["label"], "rrf k=60"})]
    print(f"  {'method (legs ' + depth + ' deep)':<34}" + "".join(f"{m:>11}" for m in METRICS))
    for label in labels:
        print(f"  {label:<34}" + "".join(f"{figures[label][m]:>11.4f}" for m in METRICS))
    print(f"chosen on the first half: {chosen['label']}, candidates {chosen['candidates']}; gateway default: "
          f"{default['label']}, candidates {default['candidates']}")  # fmt: skip
    verdict = quality["verdict"]
    gains = ", ".join(f"{m} {verdict['gain'][m]:+.4f}" for m in METRICS)
    print(f"default hybrid against the better of dense and keyword: {gains} (target +{verdict['target_points']} "
          f"recall@10 and MRR@10: {'met' if verdict['met'] else 'NOT met'})")  # fmt: skip
    route = quality["route_against_local_fusion"]
    print(f"hybrid route against the local fusion of its legs: {route['same_ids']} of {route['queries']} queries "
          f"with the same ids, scores within {route['largest_score_difference']:.1e}")  # fmt: skip
    print("keyword analysers (report half):")
    for label, row in quality["analyzers"]["report"].items():
        print(f"  {label:<48}" + "".join(f"{row[m]:>11.4f}" for m in METRICS))
