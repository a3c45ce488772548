"""embedserve collections evaluate against a real gateway process: its figures equal the test's own computation from
the search route (dense, keyword, and hybrid with each setting), its suggestion is the best of them, and its
mistakes are told on standard error with an exit code."""

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.processes import gateway
from service.vectors.fusion import DEFAULT_FUSION
from service.vectors.milvus import IDLE_S
from trainer.data.sample_text import sentences

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 80


@pytest.fixture(scope="module")
def url(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("cli")
    env = {
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_MILVUS_URI": str(folder / "milvus.db"),
        "EMBEDSERVE_ALLOW_ANONYMOUS_WRITES": "true",
        # Exact search: HNSW over the tiny encoder's near-identical vectors ranks differently before Milvus Lite
        # indexes the items (an exact scan of its memtable) and after, and the evaluation is compared with
        # searches made later (seen in CI: dense recall@10 0.88 in the report, 0.94 from the route).
        "EMBEDSERVE_VECTOR_INDEX": "FLAT",
        "EMBEDSERVE_VECTOR_INDEX_PARAMS": "{}",
    }
    with gateway(env, folder / "gateway.log") as base:
        texts = sentences()[:ITEMS]
        created = httpx.put(f"{base}/v1/collections/faq", json={"model": "tiny@1"})
        assert created.json()["index"]["type"] == "FLAT", created.text
        items = [{"id": f"q{i:03d}", "text": text} for i, text in enumerate(texts)]
        httpx.post(f"{base}/v1/collections/faq/items", json={"items": items}, timeout=60).raise_for_status()
        settled(base, texts)
        yield base


def settled(base: str, texts: list[str], timeout_s: float = 30.0) -> None:
    """Wait until Milvus Lite answers as it will from now on. Right after a bulk load it scans its memtable,
    then (once the gateway's idle flush has run) searches the flushed segment and builds BM25 on the first keyword
    search; near-tied scores of the tiny encoder came out in another order early and later (seen in CI and here:
    dense or keyword recall@1 one query apart between the evaluation and the later route searches, with one or
    several batches in flight alike; those steps are the likely cause, not a proven one). Settled = two rounds
    of every leg a few words deep agree, 2 x IDLE_S apart."""
    queries = [" ".join(text.split()[1:5]) for text in texts[::5]]

    def round_of_searches() -> list[list[str]]:
        return [route_ids(base, query, mode=mode) for query in queries for mode in ("dense", "keyword")]

    deadline = time.monotonic() + timeout_s
    previous = round_of_searches()
    while time.monotonic() < deadline:
        time.sleep(2 * IDLE_S)
        current = round_of_searches()
        if current == previous:
            return
        previous = current
    raise AssertionError(f"the collection's search results still changed after {timeout_s}s")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Queries made of a few words of an item (so dense and keyword disagree), one query with two relevant items,
    one whose relevant id no search finds."""
    texts = sentences()[:ITEMS]
    lines = []
    for i in range(0, ITEMS, 5):
        words = texts[i].split()
        lines.append({"query": " ".join(words[1 : 1 + max(3, len(words) // 3)]), "relevant_id": f"q{i:03d}"})
    lines.append({"query": lines[0]["query"], "relevant_id": "q001"})
    lines.append({"query": "an item that is not there", "relevant_id": "missing"})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def embedserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def own_metrics(ids: list[str], relevant: set[str]) -> dict[str, float]:
    """The metrics as a search team would write them down, one at a time."""
    recall_1 = sum(1 for item in ids[:1] if item in relevant) / len(relevant)
    recall_10 = sum(1 for item in ids[:10] if item in relevant) / len(relevant)
    reciprocal = 0.0
    for place, item in enumerate(ids[:10], start=1):
        if item in relevant:
            reciprocal = 1 / place
            break
    gains = sum(1 / math.log2(place + 1) for place, item in enumerate(ids[:10], start=1) if item in relevant)
    best = sum(1 / math.log2(place + 1) for place in range(1, min(10, len(relevant)) + 1))
    return {"recall@1": recall_1, "recall@10": recall_10, "mrr@10": reciprocal, "ndcg@10": gains / best}


def route_ids(url: str, query: str, **body: Any) -> list[str]:
    response = httpx.post(f"{url}/v1/collections/faq/search", json={"query": query, "top_k": 10, **body}, timeout=60)
    response.raise_for_status()
    return [hit["id"] for hit in response.json()["hits"]]


def test_evaluate_equals_an_independent_computation_through_the_search_route(
    url: str, pairs: Path, tmp_path: Path
) -> None:
    report_file = tmp_path / "report.json"
    # A grid of its own (every search is repeated below); the default grid's shape is checked on fusion_grid.
    result = embedserve("--url", url, "collections", "evaluate", "faq", "--pairs", str(pairs), "--json",
                        "--candidates", "30", "--rrf-k", "10,60", "--alphas", "0.3,0.7",
                        "--output", str(report_file))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(report_file.read_text())
    assert report["queries"] == 17 and report["pairs"] == 18 and report["candidates"] == 30
    assert report["items"] == ITEMS and report["model"] == "tiny@1" and report["primary_metric"] == "ndcg@10"

    queries: dict[str, set[str]] = {}
    for line in pairs.read_text().splitlines():
        if line.strip():
            pair = json.loads(line)
            queries.setdefault(pair["query"], set()).add(pair["relevant_id"])
    methods = [row["method"] for row in report["results"]]
    assert methods[:2] == ["dense", "keyword"] and len(methods) == 9  # 2 k, 2 alphas × 2 norms, default
    mine: dict[str, dict[str, float]] = {}
    for row in report["results"]:
        if row["fusion"] is None:
            body: dict[str, Any] = {"mode": row["method"]}
        else:
            body = {"mode": "hybrid", "fusion": row["fusion"], "candidates": 30}
        per_query = [own_metrics(route_ids(url, query, **body), relevant) for query, relevant in queries.items()]
        mine[row["method"]] = {m: sum(q[m] for q in per_query) / len(per_query) for m in per_query[0]}
        for metric, value in mine[row["method"]].items():
            assert row[metric] == pytest.approx(value, abs=5.1e-5), (row["method"], metric)
    # Not vacuous: the methods do not all score alike.
    assert len({round(figures["ndcg@10"], 4) for figures in mine.values()}) >= 4
    best = max(mine[m]["ndcg@10"] for m in methods[2:])
    assert report["suggested"]["ndcg@10"] == pytest.approx(best, abs=5.1e-5)
    assert report["collection_default"]["label"] == DEFAULT_FUSION.label


def test_evaluate_prints_a_table_with_the_suggestion(url: str, pairs: Path) -> None:
    result = embedserve("--url", url, "collections", "evaluate", "faq", "--pairs", str(pairs), "--rrf-k", "10,60",
                        "--alphas", "0.5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("collection faq (tiny@1, 80 items): 17 queries, 18 relevant pairs, legs 100 deep")
    methods = [line[2:].split("  ")[0].strip() for line in lines[2:8]]
    assert methods == [
        "dense",
        "keyword",
        "rrf k=10",
        "rrf k=60",
        "weighted minmax alpha=0.5",
        "weighted zscore alpha=0.5",
    ]
    assert any(line.startswith(" *") for line in lines[2:8]) and "suggested (*, best ndcg@10)" in result.stdout


@pytest.mark.parametrize(
    ("content", "args", "code", "says"),
    [
        ('{"query": "x"}\n', [], 2, "pairs.jsonl:1: expected"),
        ("not json\n", [], 2, "pairs.jsonl:1: not JSON"),
        ("\n", [], 2, "no pairs"),
        ('{"query": "x", "relevant_id": "q001"}\n', ["--candidates", "0"], 2, "--candidates must be between 1 and"),
        ('{"query": "x", "relevant_id": "q001"}\n', ["--alphas", "2"], 2, "less than or equal to 1"),
        ('{"query": "x", "relevant_id": "q001"}\n', ["--rrf-k", "a"], 2, "not a comma-separated list of integers"),
    ],
)
def test_mistakes_are_said_on_standard_error(
    url: str, tmp_path: Path, content: str, args: list[str], code: int, says: str
) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    result = embedserve("--url", url, "collections", "evaluate", "faq", "--pairs", str(path), *args)
    assert result.returncode == code and says in result.stderr, result.stderr


def test_gateway_errors_are_said_on_standard_error(url: str, pairs: Path) -> None:
    missing = embedserve("--url", url, "collections", "evaluate", "nowhere", "--pairs", str(pairs))
    assert missing.returncode == 1 and "404 collection 'nowhere' does not exist" in missing.stderr
    unreachable = embedserve("--url", "http://127.0.0.1:9", "collections", "evaluate", "faq", "--pairs", str(pairs))
    assert unreachable.returncode == 1 and "cannot reach the gateway" in unreachable.stderr
