"""/v1/collections with two gateway replicas: real processes sharing one Redis key prefix and one Milvus Lite
server process, as replicas share Redis and Milvus in production. A catalog change acknowledged by one replica
is what the next request on the other sees; a re-index driven by one replica loses none of the other's writes;
a re-index whose replica was killed is finished by another; a collection bound to a version's content is refused by
a replica that serves other content under that number.
"""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.processes import MilvusLiteServer, free_port, gateway
from tests.conftest import export_tiny, own_redis_prefix
from tests.replicas import gateways, replica_env
from tests.service.test_bad_input import assert_openai_error


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """A key prefix of this module's own on the machine's Redis."""
    yield from own_redis_prefix()


def collections_env(repository: Path, milvus: MilvusLiteServer, prefix: str) -> dict[str, str]:
    return replica_env(
        repository,
        milvus.uri,
        prefix,
        # The previous version's collection goes as soon as the alias moves: a replica still searching it fails.
        EMBEDSERVE_REINDEX_GRACE_S="0",
        EMBEDSERVE_REINDEX_BATCH_SIZE="32",
        # No client keys here: gateways that refuse anonymous collection writes must let these through.
        EMBEDSERVE_ALLOW_ANONYMOUS_WRITES="true",
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the replicas' logs: gateway-0.log (A) and gateway-1.log (B)."""
    return tmp_path_factory.mktemp("replicas")


@pytest.fixture(scope="module")
def replicas(
    model_repository: Path, shared_milvus: MilvusLiteServer, prefix: str, logs: Path
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Replicas A and B on the session repository (tiny@1 and tiny@2), each with its own HTTP client."""
    with (
        gateways(2, collections_env(model_repository, shared_milvus, prefix), logs) as urls,
        httpx.Client(base_url=urls[0], timeout=60) as a,
        httpx.Client(base_url=urls[1], timeout=60) as b,
    ):
        yield a, b


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def upsert(client: httpx.Client, name: str, items: list[dict[str, Any]]) -> httpx.Response:
    response = client.post(f"/v1/collections/{name}/items", json={"items": items})
    assert response.status_code == 200, response.text
    return response


def search_ids(client: httpx.Client, name: str, **body: Any) -> list[str]:
    return [hit["id"] for hit in ok(client.post(f"/v1/collections/{name}/search", json=body))["hits"]]


def test_a_collection_created_on_one_replica_is_served_by_the_other_at_once(
    replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = replicas
    ok(a.put("/v1/collections/shared", json={"model": "tiny@1", "fields": {"color": "string"}}), 201)
    # The very next request on B sees it: describe, then write and read both ways.
    info = ok(b.get("/v1/collections/shared"))
    assert (info["model"], info["version"], info["fields"], info["items"]) == ("tiny", 1, {"color": "string"}, 0)
    assert "shared" in [c["name"] for c in ok(b.get("/v1/collections"))["data"]]
    upsert(a, "shared", [{"id": "from-a", "text": "written through replica A", "metadata": {"color": "red"}}])
    assert search_ids(b, "shared", query="written through replica A", top_k=1) == ["from-a"]
    upsert(b, "shared", [{"id": "from-b", "text": "written through replica B"}])
    assert ok(a.get("/v1/collections/shared/items/from-b"))["text"] == "written through replica B"
    assert ok(a.get("/v1/collections/shared"))["items"] == ok(b.get("/v1/collections/shared"))["items"] == 2
    # Creating it again through B is the idempotent 200 (B knows it exists), another model a 409.
    ok(b.put("/v1/collections/shared", json={"model": "tiny@1", "fields": {"color": "string"}}), 200)
    assert_openai_error(b.put("/v1/collections/shared", json={"model": "tiny@2"}), 409, "delete it first")


def test_a_collection_dropped_on_one_replica_is_gone_on_the_other_at_once(
    replicas: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = replicas
    ok(a.put("/v1/collections/dropped", json={"model": "tiny@1"}), 201)
    upsert(b, "dropped", [{"id": "x", "text": "soon gone"}])
    assert ok(a.delete("/v1/collections/dropped")) == {"name": "dropped", "deleted": True}
    assert_openai_error(b.get("/v1/collections/dropped"), 404, "does not exist")
    assert_openai_error(b.post("/v1/collections/dropped/search", json={"query": "soon gone"}), 404, "does not exist")
    items = {"items": [{"id": "y", "text": "too late"}]}
    assert_openai_error(b.post("/v1/collections/dropped/items", json=items), 404, "does not exist")
    assert_openai_error(b.get("/v1/collections/dropped/items/x"), 404, "does not exist")
    assert "dropped" not in [c["name"] for c in ok(b.get("/v1/collections"))["data"]]
    # Created again (through B, on the other version): a new, empty collection on both replicas.
    ok(b.put("/v1/collections/dropped", json={"model": "tiny@2"}), 201)
    info = ok(a.get("/v1/collections/dropped"))
    assert (info["version"], info["items"]) == (2, 0)


def test_a_reindex_driven_by_one_replica_keeps_every_write_of_the_other(
    replicas: tuple[httpx.Client, httpx.Client], logs: Path
) -> None:
    a, b = replicas
    ok(a.put("/v1/collections/moving", json={"model": "tiny@1", "fields": {"n": "int"}}), 201)
    texts: dict[str, str] = {}
    for start in range(0, 1000, 200):  # the items the re-index copies
        batch = [
            {"id": f"old-{i:04d}", "text": f"an item written before the re-index, number {i}"}
            for i in range(start, start + 200)
        ]
        upsert(a, "moving", batch)
        texts.update((item["id"], item["text"]) for item in batch)
    versions_seen: list[str] = []
    written = 0
    round_ = 0
    deadline = time.monotonic() + 300
    # B upserts 2,000 new items, 20 per request (and re-writes some of the copied ones), while A re-indexes;
    # it goes on until its writes have straddled the cut-over (the header names version 1, then 2).
    while written < 2000 or "2" not in versions_seen or versions_seen[-3:] != ["2", "2", "2"]:
        assert time.monotonic() < deadline, f"the re-index did not finish ({written} items written)"
        batch = [
            {"id": f"new-{i:04d}", "text": f"an item written during the re-index, number {i}", "metadata": {"n": i}}
            for i in range(written, min(written + 20, 2000))
        ]
        batch.append({"id": f"old-{round_ * 7 % 1000:04d}", "text": f"an old item re-written in round {round_}"})
        response = upsert(b, "moving", batch)
        versions_seen.append(response.headers["x-model-version"])
        texts.update((item["id"], item["text"]) for item in batch)
        written = min(written + 20, 2000)
        round_ += 1
        if round_ == 3:
            reindex = ok(a.post("/v1/collections/moving/reindex", json={"version": 2}), 202)
            assert reindex["state"] == "reindexing"
    assert versions_seen[0] == "1" and "1" in versions_seen[3:], "B wrote nothing while the re-index ran"
    for client in (a, b):
        info = ok(client.get("/v1/collections/moving"))
        assert (info["version"], info["state"], info["items"]) == (2, "ready", len(texts)), info
    # Every item exactly once, with the text last written, read through either replica.
    for i, (item_id, text) in enumerate(sorted(texts.items())):
        item = ok((a, b)[i % 2].get(f"/v1/collections/moving/items/{item_id}"))
        assert item["text"] == text, item_id
    # Embedded by version 2: an item's own text finds it, from either replica. Under the random tiny encoder these
    # near-identical texts all lie within cosine 0.997 of each other, where HNSW (approximate) can miss the exact
    # row at a search depth of 3, and of 10 (each seen once in CI): 200 hits, and so a search 200 deep.
    for i, item_id in enumerate(sorted(texts)[::97]):
        client = (a, b)[i % 2]
        response = client.post("/v1/collections/moving/search", json={"query": texts[item_id], "top_k": 200})
        assert response.headers["x-model-version"] == "2"
        assert item_id in [hit["id"] for hit in ok(response)["hits"]], item_id
    # Both replicas resume re-indexes nobody drives, yet only A (which started it) copied.
    drivers = [
        replica
        for replica, log in (("A", "gateway-0.log"), ("B", "gateway-1.log"))
        for line in (logs / log).read_text().splitlines()
        if '"re-index driven by this replica"' in line and '"collection": "moving"' in line
    ]
    assert drivers == ["A"]


def test_a_replica_serving_other_content_under_the_same_version_refuses_the_collection_until_reindexed(
    replicas: tuple[httpx.Client, httpx.Client],
    model_repository: Path,
    shared_milvus: MilvusLiteServer,
    prefix: str,
    tmp_path: Path,
) -> None:
    a, _ = replicas
    ok(a.put("/v1/collections/bound", json={"model": "tiny@2"}), 201)
    items = [{"id": f"b{i:02d}", "text": f"bound to the first export of tiny 2, item {i}"} for i in range(40)]
    upsert(a, "bound", items)
    # tiny@2 deleted and exported again: the same number, other weights (another seed).
    repository = tmp_path / "model_repository"
    shutil.copytree(model_repository, repository)
    shutil.rmtree(repository / "tiny" / "2")
    assert export_tiny(repository, seed=99).name == "2"
    with (
        gateway(collections_env(repository, shared_milvus, prefix), tmp_path / "gateway-c.log") as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        for response in (
            c.post("/v1/collections/bound/search", json={"query": "item 3"}),
            c.post("/v1/collections/bound/items", json={"items": [{"id": "c", "text": "mixed?"}]}),
        ):
            assert_openai_error(response, 503, "tiny@2", "exported again", "re-index")
        assert ok(c.get("/v1/collections/bound"))["items"] == 40  # nothing was written
        ok(c.post("/v1/collections/bound/reindex", json={"version": 2}), 202)
        deadline = time.monotonic() + 120
        while (info := ok(c.get("/v1/collections/bound")))["state"] != "ready":
            assert info["state"] == "reindexing", info
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert (info["version"], info["items"]) == (2, 40)
        assert search_ids(c, "bound", query=items[7]["text"], top_k=1) == ["b07"]
        upsert(c, "bound", [{"id": "c", "text": "embedded by the new export"}])
        # Now A is the replica serving content the collection no longer holds.
        assert_openai_error(a.post("/v1/collections/bound/search", json={"query": "item 3"}), 503, "exported again")


def test_a_reindex_whose_replica_was_killed_is_finished_by_another(
    replicas: tuple[httpx.Client, httpx.Client],
    model_repository: Path,
    shared_milvus: MilvusLiteServer,
    prefix: str,
    tmp_path: Path,
) -> None:
    a, b = replicas
    ok(a.put("/v1/collections/orphan", json={"model": "tiny@1"}), 201)
    texts = {f"o{i:04d}": f"an item whose re-index outlives its replica, number {i}" for i in range(2000)}
    for start in range(0, 2000, 500):
        upsert(a, "orphan", [{"id": k, "text": texts[k]} for k in sorted(texts)[start : start + 500]])
    # Replica D starts the re-index and is killed (SIGKILL: no lease given back) while copying.
    port = free_port()
    env = {
        **os.environ,
        **collections_env(model_repository, shared_milvus, prefix),
        "EMBEDSERVE_REINDEX_BATCH_SIZE": "8",
        "EMBEDSERVE_VECTOR_LEASE_S": "2",
        "EMBEDSERVE_HOST": "127.0.0.1",
        "EMBEDSERVE_PORT": str(port),
    }
    with (tmp_path / "gateway-d.log").open("ab") as log:
        d = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                deadline = time.monotonic() + 90
                while not _ready(client):
                    assert d.poll() is None and time.monotonic() < deadline, "replica D did not start"
                    time.sleep(0.2)
                ok(client.post("/v1/collections/orphan/reindex", json={"version": 2}), 202)
            deadline = time.monotonic() + 120
            while (ok(a.get("/v1/collections/orphan"))["reindex"] or {}).get("copied", 0) < 80:
                assert time.monotonic() < deadline, "replica D copied nothing"
                time.sleep(0.05)
        finally:
            d.kill()
            d.wait()
    copied_by_d = ok(a.get("/v1/collections/orphan"))["reindex"]["copied"]
    assert copied_by_d < 2000, "D finished before it was killed: nothing was taken over"
    deadline = time.monotonic() + 180
    while (info := ok(b.get("/v1/collections/orphan")))["state"] != "ready":
        assert info["state"] == "reindexing" and time.monotonic() < deadline, info
        time.sleep(0.1)
    assert (info["version"], info["items"]) == (2, 2000)
    for i, item_id in enumerate(sorted(texts)[::157]):
        client = (a, b)[i % 2]
        response = client.post("/v1/collections/orphan/search", json={"query": texts[item_id], "top_k": 3})
        assert response.headers["x-model-version"] == "2"
        assert item_id in [hit["id"] for hit in ok(response)["hits"]], item_id


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False
