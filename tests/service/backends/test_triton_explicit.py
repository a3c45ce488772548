"""Hot-loading with a real Triton in --model-control-mode=explicit: Triton never looks at its repository by itself,
so a version exported while both run is served only because the gateway asks Triton to load it."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from service.models.tokenization import TextTokenizer
from service.settings import Settings
from tests.conftest import export_tiny
from tests.helpers import running_gateway
from tests.triton_server import LocalTriton
from trainer.release.export import embed_with_onnx
from trainer.release.triton_config import write_python_repository

ADMIN = {"Authorization": "Bearer explicit-admin"}


@pytest.fixture
def repositories(model_repository: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The gateway's repository (tiny/1, tiny/2) and Triton's python-backend copy of it."""
    gateway_repository = tmp_path / "repository"
    shutil.copytree(model_repository / "tiny", gateway_repository / "tiny")
    triton_repository = tmp_path / "triton-repository"
    assert write_python_repository(gateway_repository, triton_repository) == ["tiny@1", "tiny@2"]
    return gateway_repository, triton_repository


@pytest.fixture
def explicit_triton(repositories: tuple[Path, Path], tmp_path: Path) -> Iterator[LocalTriton]:
    server = LocalTriton(repositories[1], tmp_path / "triton.log", model_control="explicit")
    server.start()
    yield server
    server.stop()


def triton_versions(triton: LocalTriton) -> dict[str, str]:
    index = httpx.post(f"http://127.0.0.1:{triton.http_port}/v2/repository/index", timeout=5).json()
    return {f"{e['name']}@{e['version']}": e["state"] for e in index if "version" in e}


async def test_a_hot_loaded_version_is_loaded_into_an_explicit_mode_triton(
    repositories: tuple[Path, Path], explicit_triton: LocalTriton
) -> None:
    gateway_repository, triton_repository = repositories
    settings = Settings(
        model_repository=gateway_repository,
        milvus_uri=str(gateway_repository.parent / "milvus.db"),
        backend="triton",
        triton_url=explicit_triton.grpc_url,
        triton_model_control="explicit",
        cache_enabled=False,
        admin_api_key=SecretStr("explicit-admin"),
        model_rescan_s=0,
    )
    async with running_gateway(settings) as (_, client):
        written = export_tiny(gateway_repository, seed=21)  # tiny/3, while both run
        write_python_repository(gateway_repository, triton_repository)  # what a shared volume would show Triton
        assert "tiny@3" not in {k for k, state in triton_versions(explicit_triton).items() if state == "READY"}

        report = await client.post("/v1/admin/models/reload", headers=ADMIN)
        assert report.status_code == 200, report.text
        assert triton_versions(explicit_triton)["tiny@3"] == "READY"
        answer = await client.post("/v1/embeddings", json={"model": "tiny@3", "input": ["explicitly loaded"]})
        assert answer.status_code == 200, answer.text
        tokenizer = TextTokenizer(written / "tokenizer.json", 64)
        expected = embed_with_onnx(written / "model.onnx", tokenizer, ["explicitly loaded"])[0]
        np.testing.assert_allclose(answer.json()["data"][0]["embedding"], expected, atol=1e-5)
        # The versions Triton already served kept serving.
        assert (await client.post("/v1/embeddings", json={"model": "tiny@1", "input": ["x"]})).status_code == 200
