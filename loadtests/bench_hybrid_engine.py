"""Hybrid against dense search latency on any Milvus engine, below the gateway (``make bench-hybrid-engine``).

``make bench-search`` measures search through the gateway on Milvus Lite 3, whose pure-Python engine walks every row
for each leg, so hybrid costs the sum of its legs there. This benchmark runs the gateway's own search legs
(``service.vectors.milvus.Milvus`` with the parameters of ``service.vectors.search``: dense top-k with the stored
fields; keyword likewise; hybrid = both legs ``candidates`` deep side by side, fused by ``service.vectors.fusion``
with the default fusion, then the top-k read by id) against whatever Milvus ``--uri`` names: a Milvus server, or
the C++ Milvus engine of Milvus Lite 2.5 (the README says how to start it). The gateway itself cannot run on that
engine (it has no aliases), hence the level. Queries are embedded nowhere (random unit vectors), which leaves out
a cost both modes share and so makes the ratio harsher than through the gateway.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench_search import synthetic_text, synthetic_vocabulary, unit_vectors
from service.settings import Settings
from service.vectors.fusion import DEFAULT_CANDIDATES, DEFAULT_FUSION, fuse
from service.vectors.milvus import Milvus
from trainer.data.sample_text import sentences

RESULTS = Path("loadtests/results/bench_hybrid_engine.json")
DIMENSION = 384
TOP_K = 10
OUTPUTS = ["text", "metadata"]
MAX_HYBRID_P95_RATIO = 1.5


async def load(milvus: Milvus, name: str, settings: Settings, count: int) -> float:
    """Create collection ``name`` as the gateway creates one and fill it with ``count`` items; items/s."""
    vocabulary = synthetic_vocabulary()
    words, rng = random.Random(1), np.random.default_rng(1)
    await milvus.create_physical(name, DIMENSION, settings.vector_index, settings.vector_index_params, "english_stop")
    started = time.perf_counter()
    for start in range(0, count, 1000):
        ids = range(start, min(count, start + 1000))
        vectors = unit_vectors(rng, len(ids), DIMENSION)
        rows = [
            {
                "id": f"s{i:07d}",
                "text": synthetic_text(words, vocabulary),
                "vector": vector.tolist(),
                "metadata": {"shard": i % 16},
            }
            for i, vector in zip(ids, vectors, strict=True)
        ]
        await milvus.upsert(name, rows)
    await milvus.call("flush", name)
    return count / (time.perf_counter() - started)


async def measure(search: Callable[[int], Awaitable[Any]], seconds: float) -> dict[str, float]:
    """P50/P95 (ms) of ``search(i)`` run one after another for ``seconds``, after 20 unmeasured searches."""
    for i in range(20):
        await search(i)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await search(len(latencies))
        latencies.append((time.perf_counter() - started) * 1000)
    return {
        "searches": len(latencies),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p95_ms": round(float(np.percentile(latencies, 95)), 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(milvus_uri=args.uri, vector_index=args.index, vector_index_params=json.loads(args.index_params))
    milvus = Milvus(settings)
    name = f"bench_hybrid_{os.getpid()}"
    queries = list(sentences())[:500]
    vectors = unit_vectors(np.random.default_rng(2), len(queries), DIMENSION).tolist()
    breadth = {"ef": settings.vector_search_ef} if args.index == "HNSW" else {}
    dense_params = {"metric_type": "COSINE", "params": breadth}
    keyword_params = {"metric_type": "BM25"}

    async def dense(i: int, limit: int = TOP_K, outputs: list[str] = OUTPUTS) -> list[dict[str, Any]]:
        return await milvus.search(name, [vectors[i % len(vectors)]], "vector", limit, "", outputs, dense_params)

    async def keyword(i: int, limit: int = TOP_K, outputs: list[str] = OUTPUTS) -> list[dict[str, Any]]:
        return await milvus.search(name, [queries[i % len(queries)]], "sparse", limit, "", outputs, keyword_params)

    async def hybrid_legs(i: int) -> list[tuple[str, float]]:
        dense_hits, keyword_hits = await asyncio.gather(dense(i, args.candidates, []), keyword(i, args.candidates, []))
        return fuse(
            [(str(hit["id"]), float(hit["distance"])) for hit in dense_hits],
            [(str(hit["id"]), abs(float(hit["distance"]))) for hit in keyword_hits],
            DEFAULT_FUSION,
        )[:TOP_K]

    async def hybrid(i: int) -> list[dict[str, Any]]:
        return await milvus.get(name, [item for item, _ in await hybrid_legs(i)])

    try:
        print(f"loading {args.items} items into {args.uri} ...", flush=True)
        report: dict[str, Any] = {"load_items_per_s": round(await load(milvus, name, settings, args.items), 1)}
        modes = (("dense", dense), ("keyword", keyword), ("hybrid_legs_fused", hybrid_legs), ("hybrid", hybrid))
        for mode, search in modes:
            report[mode] = await measure(search, args.seconds)
            print(f"  {mode}: {report[mode]}", flush=True)
    finally:
        await milvus.drop_physical(name)
        await milvus.close()
    report["hybrid_vs_dense_p95"] = round(report["hybrid"]["p95_ms"] / report["dense"]["p95_ms"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True, help="the Milvus to measure, e.g. http://127.0.0.1:19530")
    parser.add_argument("--engine", default="", help="what --uri is, for the report (e.g. 'Milvus Lite 2.5.1')")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per mode")
    parser.add_argument("--index", default="HNSW", help="dense index type (Milvus Lite 2.5 takes IVF_FLAT or FLAT)")
    parser.add_argument("--index-params", default='{"M": 16, "efConstruction": 200}', help="its build parameters")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="hybrid depth of each leg")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "engine": args.engine or args.uri,
        "items": args.items,
        "index": {"type": args.index, "params": json.loads(args.index_params)},
        "hybrid_settings": {"candidates": args.candidates, "fusion": DEFAULT_FUSION.label, "top_k": TOP_K},
        **asyncio.run(run(args)),
        "target": MAX_HYBRID_P95_RATIO,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    verdict = "met" if report["hybrid_vs_dense_p95"] <= MAX_HYBRID_P95_RATIO else "not met"
    print(f"hybrid P95 / dense P95: {report['hybrid_vs_dense_p95']} (target <= {MAX_HYBRID_P95_RATIO}: {verdict})")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
