"""The gateway routes only to Triton versions whose content it matches to the manifest it verified.

A real Triton on a tampered repository (its own, started with --exit-on-error=false so a version that
fails to load does not stop it):
- tiny@2 there is other content under the same number (tiny@1's weights, a self-consistent manifest);
- tiny@1 there has a byte of model.onnx flipped (its manifest and config untouched): model.py refuses to
  run it (it still loads: Triton loads a model's versions all or nothing);
- bare@1 there has a config.pbtxt that names no sha256 for it (a hand-written or pre-digest config);
- minilm@1 is intact.
"""

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.models.manifest import verify_version
from service.settings import Settings
from tests.helpers import running_gateway
from tests.service.backends.conftest import add_version_copy, min_cosine, triton_settings, vectors
from tests.triton_server import LocalTriton
from trainer.release.triton_config import python_config, write_python_repository


def flip_byte(path: Path) -> None:
    """Flip a byte in the middle of ``path`` (a weight of the embedding matrix) in a copy of its own: the
    file is hard-linked to the session repository's."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def gateway_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session repository plus bare@1 (a copy of tiny@1)."""
    repository = tmp_path_factory.mktemp("content-gateway") / "repository"
    shutil.copytree(model_repository, repository, copy_function=os.link)
    (repository / "bare").mkdir()
    add_version_copy(repository, "tiny/1", "bare/1")
    return repository


@pytest.fixture(scope="module")
def tampered_triton(gateway_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    workdir = tmp_path_factory.mktemp("content-triton")
    # Another model repository, where tiny@2 is something else: what a Triton pointed at a stale or
    # re-exported copy would serve.
    other = workdir / "other"
    shutil.copytree(gateway_repository, other, copy_function=os.link)
    shutil.rmtree(other / "tiny" / "2")
    add_version_copy(other, "tiny/1", "tiny/2")
    repository = workdir / "repository"
    assert write_python_repository(other, repository) == ["bare@1", "minilm@1", "tiny@1", "tiny@2"]
    flip_byte(repository / "tiny" / "1" / "model.onnx")
    (repository / "bare" / "config.pbtxt").write_text(python_config("bare", 32))
    server = LocalTriton(repository, workdir / "triton.log", extra_args=("--exit-on-error=false",))
    server.start(until="live")
    yield server
    server.stop()


def triton_index(triton: LocalTriton) -> dict[str, dict]:
    """Triton's own view of its repository: name@version -> state and reason."""
    index = httpx.post(f"http://127.0.0.1:{triton.http_port}/v2/repository/index", timeout=5).json()
    return {f"{entry['name']}@{entry['version']}": entry for entry in index if "version" in entry}


def test_tritons_model_py_refuses_to_run_files_that_do_not_match_their_manifest(
    tampered_triton: LocalTriton,
) -> None:
    # Every version loads: failing tiny@1's load would unload tiny@2 with it.
    index = triton_index(tampered_triton)
    assert {name: entry["state"] for name, entry in index.items()} == dict.fromkeys(
        ("bare@1", "minilm@1", "tiny@1", "tiny@2"), "READY"
    )
    logged = tampered_triton.log_path.read_text()
    assert "tiny version 1: model.onnx does not match its sha256 in manifest.json" in logged
    ids = [[101, 2023, 102]]
    body = {
        "inputs": [
            {"name": name, "shape": [1, 3], "datatype": "INT64", "data": ids if name == "input_ids" else [[1, 1, 1]]}
            for name in ("input_ids", "attention_mask")
        ]
    }
    url = f"http://127.0.0.1:{tampered_triton.http_port}/v2/models/tiny/versions/1/infer"
    refused = httpx.post(url, json=body, timeout=10)
    assert refused.status_code != 200 and "model.onnx does not match" in refused.json()["error"]
    # model.py checks that its files are what its manifest and config name, not what the gateway verified.
    served = httpx.post(url.replace("versions/1", "versions/2"), json=body, timeout=10)
    assert served.status_code == 200


async def test_the_gateway_refuses_triton_versions_it_cannot_match_to_its_manifests(
    settings: Settings,
    tampered_triton: LocalTriton,
    gateway_repository: Path,
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="service.backends.triton")
    configured = triton_settings(
        settings, tampered_triton, model_repository=gateway_repository, milvus_uri=str(tmp_path / "milvus.db")
    )
    async with running_gateway(configured) as (_, gateway):
        ready = await gateway.get("/readyz")
        body = ready.json()
        versions = {f"{v['model']}@{v['version']}": v for v in body["versions"]}
        assert ready.status_code == 503
        # tiny@1 is Triton's own refusal (below); its config names the right sha256, so /readyz cannot see it.
        assert {name: v["state"] for name, v in versions.items() if name != "tiny@1"} == {
            "minilm@1": "ready",
            "tiny@2": "content_mismatch",
            "bare@1": "content_mismatch",
        }
        mismatch, unnamed = versions["tiny@2"]["reason"], versions["bare@1"]["reason"]
        assert "sha256" in mismatch and "same model repository" in mismatch
        assert "names no sha256" in unnamed and "python -m trainer triton-config" in unnamed
        # The defaults of tiny and bare are refused: the pod is out of rotation, and says which and why.
        assert len(body["problems"]) == 2
        assert any("tiny@2" in p and "content" in p for p in body["problems"])
        assert any("bare@1" in p for p in body["problems"])

        for pinned in ("tiny@2", "bare@1", "tiny@1"):
            refused = await gateway.post("/v1/embeddings", json={"input": "x", "model": pinned})
            assert refused.status_code == 503, pinned
            message = refused.json()["error"]["message"]
            assert pinned in message and "pin another version" in message and "/readyz" in message
            assert "model.onnx" not in message and "sha256" not in message

        texts = ["the intact version serves", "as it always did"]
        served = await gateway.post("/v1/embeddings", json={"input": texts, "model": "minilm@1"})
        assert served.status_code == 200
    expected = vectors(client.post("/v1/embeddings", json={"input": texts, "model": "minilm@1"}).json())
    assert min_cosine(vectors(served.json()), expected) >= 0.9999

    refusals = {(r.model, r.version): r for r in caplog.records if r.getMessage() == "triton version refused"}  # type: ignore[attr-defined]
    assert set(refusals) == {("tiny", 2), ("bare", 1)}
    # Triton's tiny@2 is tiny@1's content: the digest it names is tiny@1's, not the verified tiny@2's.
    tiny_2 = refusals[("tiny", 2)]
    assert tiny_2.expected_sha256 == verify_version(gateway_repository / "tiny" / "2").sha256  # type: ignore[attr-defined]
    assert tiny_2.triton_sha256 == verify_version(gateway_repository / "tiny" / "1").sha256  # type: ignore[attr-defined]
    assert refusals[("bare", 1)].triton_sha256 is None  # type: ignore[attr-defined]
    # model.py's reason for tiny@1 reaches the operator through the log, never a client.
    failures = [r for r in caplog.records if r.getMessage() == "triton inference failed"]
    assert [r.version for r in failures] == [1]  # type: ignore[attr-defined]
    assert "model.onnx does not match" in failures[0].triton_message  # type: ignore[attr-defined]
