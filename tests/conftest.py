"""Session fixtures: a real model repository built by the trainer (tiny random encoders + MiniLM)."""

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from loadtests.processes import MilvusLiteServer, gateway, milvus_server
from service.app import create_app
from service.settings import Settings
from trainer.data.sample_text import sentences
from trainer.encoder import from_scratch, packaged_minilm
from trainer.release.bootstrap import bootstrap
from trainer.release.export import ExportRequest, export_version

TINY_DIMENSION = 32
# The machine's Redis; tests keep to their own key prefix there (see shared_redis_prefix).
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def export_tiny(repository: Path, model: str = "tiny", seed: int = 0, max_seq_length: int = 64) -> Path:
    """Export a randomly initialised 2-layer encoder (MiniLM's tokenizer) as the next version of ``model``."""
    folder = packaged_minilm()
    encoder = from_scratch(
        vocab_size=30522, hidden_size=TINY_DIMENSION, layers=2, heads=2, max_seq_length=max_seq_length, seed=seed
    )
    request = ExportRequest(
        model=model,
        source=f"test:random-init seed={seed}",
        tokenizer_dir=folder.path,
        validation_texts=list(sentences()[:64]),
    )
    return export_version(encoder, request, repository)


@pytest.fixture(scope="session", autouse=True)
def no_embedserve_environment() -> Iterator[None]:
    """The developer's EMBEDSERVE_* and OTEL_* variables never reach a test: an exported EMBEDSERVE_REDIS_URL
    would make gateways under test write to that Redis under the default prefix, an OTEL_EXPORTER_OTLP_ENDPOINT
    send their spans away. Tests set what they need explicitly."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith(("EMBEDSERVE_", "OTEL_"))]:
            patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """minilm/1 (all-MiniLM-L6-v2), tiny/1 and tiny/2 (two random encoders). Treat as read-only."""
    repository = tmp_path_factory.mktemp("model_repository")
    bootstrap(repository)
    export_tiny(repository, seed=1)
    export_tiny(repository, seed=2)
    return repository


@pytest.fixture
def repository_copy(model_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the session repository that a test may damage."""
    copy = tmp_path / "model_repository"
    shutil.copytree(model_repository, copy)
    return copy


def own_redis_prefix() -> Iterator[str]:
    """A key prefix of the caller's own on the machine's Redis; only those keys are deleted afterwards."""
    prefix = f"embedserve-test-{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def shared_redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the machine's Redis."""
    yield from own_redis_prefix()


@pytest.fixture(scope="module")
def shared_milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLiteServer]:
    """One Milvus server process (Milvus Lite serving writes one at a time) for a module's gateway replicas."""
    with milvus_server(tmp_path_factory.mktemp("milvus-server") / "data") as server:
        yield server


@pytest.fixture(scope="session")
def settings(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # A private Milvus Lite file: never the developer's data/milvus.db.
    milvus_file = tmp_path_factory.mktemp("milvus") / "milvus.db"
    # Tests that are not about keys write to collections as a trusted network's clients would.
    return Settings(model_repository=model_repository, milvus_uri=str(milvus_file), allow_anonymous_writes=True)


@pytest.fixture(scope="module")
def gateway_url(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway process (``python -m service serve``) on the session repository, for a module of tests that
    drive it with client SDKs over real HTTP."""
    folder = tmp_path_factory.mktemp("gateway")
    env = {"EMBEDSERVE_MODEL_REPOSITORY": str(model_repository), "EMBEDSERVE_MILVUS_URI": str(folder / "milvus.db")}
    with gateway(env, folder / "gateway.log") as url:
        yield url


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """The gateway on the session repository, driven in-process through its real ASGI stack."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
