"""A version whose files don't match its manifest is refused at start; the others keep serving."""

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.helpers import private_settings


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_refuses_that_version_only(repository_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    onnx = repository_copy / "tiny" / "2" / "model.onnx"
    flip_byte(onnx, onnx.stat().st_size // 2)
    caplog.set_level(logging.ERROR)
    with TestClient(create_app(private_settings(repository_copy))) as client:
        refused_logs = [r for r in caplog.records if r.getMessage() == "model version refused"]
        assert [(r.model, r.version, r.file) for r in refused_logs] == [("tiny", 2, "model.onnx")]  # type: ignore[attr-defined]

        pinned = client.post("/v1/embeddings", json={"input": "x", "model": "tiny@2"})
        assert pinned.status_code == 404
        assert "model.onnx does not match its sha256" in pinned.json()["error"]["message"]
        # The other versions serve; the unpinned model now defaults to its highest verified version.
        assert client.post("/v1/embeddings", json={"input": "x", "model": "tiny"}).headers["x-model-version"] == "1"
        assert client.post("/v1/embeddings", json={"input": "x", "model": "minilm"}).status_code == 200

        ready = client.get("/readyz").json()
        assert ready["ready"] is True
        refused = [v for v in ready["versions"] if v["state"] == "refused"]
        assert refused == [
            {
                "model": "tiny",
                "version": 2,
                "state": "refused",
                "reason": "file model.onnx does not match its sha256",
                "used_by": [],
            }
        ]
        tiny = next(card for card in client.get("/v1/models").json()["data"] if card["id"] == "tiny")
        assert [(v["version"], v["state"]) for v in tiny["versions"]] == [(1, "ready"), (2, "refused")]
        assert "sha256" in tiny["versions"][1]["reason"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json has the wrong size"),
        (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin is not listed"),
        (lambda d: (d / "vocab.txt").unlink(), "vocab.txt listed in the manifest is missing"),
        (lambda d: (d / "manifest.json").write_text("not json"), "not a valid manifest"),
        (
            lambda d: (d / "manifest.json").write_text(
                json.dumps({**json.loads((d / "manifest.json").read_text()), "version": 7})
            ),
            "manifest names tiny@7",
        ),
    ],
)
def test_every_kind_of_mismatch_is_refused_with_its_reason(repository_copy: Path, damage, reason: str) -> None:
    damage(repository_copy / "tiny" / "1")
    with TestClient(create_app(private_settings(repository_copy))) as client:
        refused = [v for v in client.get("/readyz").json()["versions"] if v["state"] == "refused"]
        assert len(refused) == 1 and (refused[0]["model"], refused[0]["version"]) == ("tiny", 1)
        assert reason in refused[0]["reason"]


def test_a_stable_version_that_was_refused_makes_the_gateway_unready(repository_copy: Path) -> None:
    flip_byte(repository_copy / "tiny" / "1" / "model.onnx", 100)
    settings = private_settings(repository_copy).model_copy(update={"stable_versions": {"tiny": 1}})
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert any("tiny@1" in problem for problem in ready.json()["problems"])
        unpinned = client.post("/v1/embeddings", json={"input": "x", "model": "tiny"})
        assert unpinned.status_code == 503 and "tiny@1" in unpinned.json()["error"]["message"]


def test_an_empty_repository_is_not_ready_and_says_what_to_run(tmp_path: Path) -> None:
    with TestClient(create_app(private_settings(tmp_path / "missing"))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "make bootstrap-model" in ready.json()["problems"][0]
