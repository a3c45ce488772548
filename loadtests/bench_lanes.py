"""make bench-lanes: interactive latency while a bulk upsert runs, through a real gateway process.

Single-sentence /v1/embeddings requests at concurrency 4 (fresh texts, cache off), first on an idle
gateway, then while one client upserts ``--items`` items (1,000 per request, one request at a time, as a
bulk loader does) into a collection; the interactive P99 under bulk over the idle P99 of the same run is
the figure. Milvus runs as its own process (Milvus Lite's server, as replicas share it);
``--milvus-in-process`` puts Milvus Lite inside the gateway, the single-process default, whose inserts
compete with the event loop for the GIL. The same is measured on a second gateway with lanes turned off
(one queue, CPU-sized batches for everything) as the reference: what the lanes change. The machine is
shared and noisy: only ratios within one run count.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from client.gateway import Gateway
from loadtests.http_load import LoadResult, run_load
from loadtests.processes import gateway, milvus_server
from trainer.data.sample_text import sentences

RESULTS = Path(__file__).parent / "results" / "bench_lanes.json"
CONCURRENCY = 4
UPSERT_BATCH = 1000
WINDOW_S = 4.0


def interactive_bodies(tag: str) -> list[bytes]:
    """Distinct one-sentence requests (nothing answered from a cache even if it were on)."""
    texts = [f"{text} ({tag} {i})" for i, text in enumerate(sentences())]
    return [json.dumps({"model": "minilm", "input": text}).encode() for text in texts]


def bulk_items(count: int) -> list[dict[str, str]]:
    pool = sentences()
    return [{"id": f"item-{i}", "text": f"{pool[i % len(pool)]} Item {i}."} for i in range(count)]


def upsert_all(url: str, items: list[dict[str, str]], done: dict[str, Any], route: str) -> None:
    """One bulk loader: ``items`` in requests of UPSERT_BATCH, one after another, upserted into the collection
    (``route`` upsert) or only embedded (``embeddings``); its timing into ``done``."""
    started = time.perf_counter()
    statuses: dict[int, int] = {}
    # Raw requests, not embedserve's client: the figure counts every answer's status (a 429 included) as it came,
    # where the client would retry it and raise on the others; and the embeddings route compared has no client.
    with httpx.Client(base_url=url, timeout=600) as client:
        for start in range(0, len(items), UPSERT_BATCH):
            chunk = items[start : start + UPSERT_BATCH]
            if route == "upsert":
                answer = client.post("/v1/collections/bulk/items", json={"items": chunk})
            else:
                answer = client.post("/v1/embeddings", json={"model": "minilm", "input": [i["text"] for i in chunk]})
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
    done.update(seconds=time.perf_counter() - started, statuses=statuses)


async def interactive_while(url: str, bodies: list[bytes], running: threading.Event) -> LoadResult:
    """Closed-loop interactive load in windows of WINDOW_S until ``running`` clears; the windows merged."""
    merged = LoadResult(concurrency=CONCURRENCY, elapsed_s=0.0)
    while running.is_set():
        window = await run_load(url, "/v1/embeddings", bodies, CONCURRENCY, WINDOW_S, warmup_s=0.0)
        merged.latencies_ms += window.latencies_ms
        merged.errors += window.errors
        merged.elapsed_s += window.elapsed_s
    return merged


def measure(url: str, items: list[dict[str, str]], idle_s: float, tag: str, route: str) -> dict[str, Any]:
    bodies = interactive_bodies(tag)
    idle = asyncio.run(run_load(url, "/v1/embeddings", bodies, CONCURRENCY, idle_s, warmup_s=2.0))
    with Gateway(url) as client:
        client.create_collection("bulk", "minilm@1")
    running, done = threading.Event(), dict[str, Any]()
    running.set()

    def bulk() -> None:
        try:
            upsert_all(url, items, done, route)
        finally:
            running.clear()

    loader = threading.Thread(target=bulk)
    loader.start()
    under_bulk = asyncio.run(interactive_while(url, bodies, running))
    loader.join()
    with Gateway(url) as client:
        count = client.collection("bulk").items if route == "upsert" else None
    return {
        "idle": idle.summary(),
        "under_bulk": under_bulk.summary(),
        "p99_ratio": round(under_bulk.percentile_ms(99) / idle.percentile_ms(99), 2),
        "p50_ratio": round(under_bulk.percentile_ms(50) / idle.percentile_ms(50), 2),
        "bulk": {
            "items": len(items),
            "stored": count,
            "seconds": round(done["seconds"], 1),
            "items_per_s": round(len(items) / done["seconds"], 1),
            "statuses": done["statuses"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--items", type=int, default=20_000, help="items upserted by the bulk loader")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--milvus-in-process", action="store_true", help="Milvus Lite inside the gateway")
    parser.add_argument("--scenarios", default="lanes,one_queue", help="which of lanes, lanes_spin, one_queue to run")
    parser.add_argument(
        "--bulk",
        choices=["upsert", "embeddings"],
        default="upsert",
        help="the bulk work: collection upserts (embedding + Milvus inserts), or /v1/embeddings of 1,000 inputs "
        "(the gateway's scheduling alone, no Milvus work beside it)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    items = bulk_items(args.items)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "concurrency": CONCURRENCY,
        "bulk_route": args.bulk,
        "milvus": "Milvus Lite in the gateway process" if args.milvus_in_process else "Milvus Lite server process",
    }
    scenarios = {
        "lanes": {},
        # Lanes, with ONNX Runtime's threads spinning during batches (the default does not: see the README).
        "lanes_spin": {"EMBEDSERVE_INFERENCE_SPINNING": "on"},
        # Every request interactive: one queue (big enough for the loader's requests), CPU-sized batches.
        "one_queue": {"EMBEDSERVE_BULK_MIN_INPUTS": "100000", "EMBEDSERVE_MAX_QUEUE_INPUTS": "100000"},
    }
    for name in args.scenarios.split(","):
        extra = scenarios[name]
        with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
            if args.milvus_in_process:
                milvus_uri = str(Path(work) / "milvus.db")
            else:
                milvus_uri = stack.enter_context(milvus_server(Path(work) / "milvus")).uri
            env = {
                "EMBEDSERVE_MODEL_REPOSITORY": str(args.repository),
                "EMBEDSERVE_MILVUS_URI": milvus_uri,
                "EMBEDSERVE_LOG_LEVEL": "WARNING",
                "EMBEDSERVE_CACHE_ENABLED": "false",
                "EMBEDSERVE_ALLOW_ANONYMOUS_WRITES": "true",  # the benchmark's own gateway, on loopback
                **extra,
            }
            print(f"{name}: idle, then {args.items} items upserted ...", flush=True)
            with gateway(env, Path(work) / "gateway.log") as url:
                report[name] = measure(url, items, args.idle_seconds, name, args.bulk)
            print(json.dumps(report[name], indent=2), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
