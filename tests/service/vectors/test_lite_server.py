"""Milvus Lite run as a server that several processes share (``make milvus``, what tests/replicas.py starts):
concurrent writers and flushes on one collection, as several gateways make them; and how a gateway treats a Lite
server."""

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pymilvus import DataType, MilvusClient

from loadtests.processes import milvus_server
from service.settings import Settings
from service.vectors.milvus import Milvus

WRITERS = 8
BATCHES = 120
ROWS = 10


def _create(client: MilvusClient) -> None:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    indexes = MilvusClient.prepare_index_params()
    indexes.add_index("vector", index_type="FLAT", metric_type="L2")
    client.create_collection("shared", schema=schema, index_params=indexes)
    client.load_collection("shared")


def _ids(client: MilvusClient) -> set[str]:
    ids: set[str] = set()
    iterator = client.query_iterator("shared", batch_size=1000, filter="", output_fields=["id"])
    while batch := iterator.next():
        ids.update(row["id"] for row in batch)
    iterator.close()
    return ids


def test_concurrent_writes_and_flushes_to_one_collection_all_succeed_and_survive_a_restart(tmp_path: Path) -> None:
    expected = {f"{w}-{b}-{i}" for w in range(WRITERS) for b in range(BATCHES) for i in range(ROWS)}

    def writer(number: int, uri: str) -> list[str]:
        # A client of its own, as each gateway process has; a flush every few writes, as their idle flushes do.
        client = MilvusClient(uri=uri)
        rng = random.Random(number)
        errors = []
        for batch in range(BATCHES):
            rows = [{"id": f"{number}-{batch}-{i}", "vector": [rng.random() for _ in range(8)]} for i in range(ROWS)]
            try:
                client.upsert("shared", rows)
                if batch % 2 == 0:
                    client.flush("shared")
            except Exception as error:
                errors.append(str(error))
        client.close()
        return errors

    with milvus_server(tmp_path / "data") as server:
        client = MilvusClient(uri=server.uri)
        _create(client)
        with ThreadPoolExecutor(WRITERS) as pool:
            errors = [e for found in pool.map(writer, range(WRITERS), [server.uri] * WRITERS) for e in found]
        assert errors == []
        assert _ids(client) == expected
        client.close()
    with milvus_server(tmp_path / "data") as server:
        client = MilvusClient(uri=server.uri)
        client.load_collection("shared")
        assert _ids(client) == expected
        client.close()


@pytest.mark.parametrize(
    ("module", "serialised"), [(("service.vectors.lite_server",), True), (("milvus_lite", "server"), False)]
)
async def test_a_gateway_applies_lite_rules_to_a_lite_server_and_says_when_several_must_not_share_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, module: tuple[str, ...], serialised: bool
) -> None:
    with milvus_server(tmp_path / "data", module) as server:
        milvus = Milvus(Settings(milvus_uri=server.uri))
        assert not milvus.in_process
        await milvus.call("list_collections")
        await milvus.close()
    assert milvus.lite  # flushed and warmed as an in-process Milvus Lite is
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("service")]
    assert errors == ([] if serialised else [errors[0]])
    if not serialised:
        assert "does not serialise writes: safe for one gateway only" in errors[0]
        assert "make milvus" in errors[0]
