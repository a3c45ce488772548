"""One gateway process for the client's tests: the session repository (minilm/1, tiny/1, tiny/2), rollouts shared
through the machine's Redis under a prefix of its own, a Milvus Lite file, an admin key and a client key."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtests.processes import gateway
from tests.conftest import SHARED_REDIS_URL, own_redis_prefix

ADMIN_KEY = "client-tests-admin"
WRITER_KEY = "client-tests-writer"  # embed, search, write: everything but the admin API
READER_KEY = "client-tests-reader"  # embed and search only


@dataclass(frozen=True)
class RunningGateway:
    url: str
    log: Path


@pytest.fixture(scope="session")
def keyed_gateway(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("client-gateway")
    prefixes = own_redis_prefix()
    prefix = next(prefixes)
    keys = [
        {"key": WRITER_KEY, "scopes": ["embed", "search", "write"]},
        {"key": READER_KEY, "scopes": ["embed", "search"]},
    ]
    env = {
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_MILVUS_URI": str(folder / "milvus.db"),
        "EMBEDSERVE_REDIS_URL": SHARED_REDIS_URL,
        "EMBEDSERVE_REDIS_PREFIX": prefix,
        "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY,
        "EMBEDSERVE_API_KEYS": json.dumps(keys),
        "EMBEDSERVE_STABLE_VERSIONS": '{"tiny": 1}',
        "EMBEDSERVE_LOG_LEVEL": "WARNING",
    }
    log = folder / "gateway.log"
    try:
        with gateway(env, log) as url:
            yield RunningGateway(url, log)
    finally:
        next(prefixes, None)  # delete the prefix's keys
