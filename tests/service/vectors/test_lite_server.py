"""Milvus Lite run as a server that several processes share (``make milvus``, what tests/replicas.py starts):
concurrent writers and flushes on one collection, as several gateways make them."""

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pymilvus import DataType, MilvusClient

from tests.replicas import milvus_server

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
