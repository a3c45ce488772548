"""Hot-loading: versions exported, removed or changed while gateways run are served, dropped or refused
without a restart — on one gateway through the admin reload, and on two replica processes by their rescans."""

import asyncio
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from loadtests.processes import MilvusLiteServer
from service.errors import ServiceUnavailable
from service.models.tokenization import TextTokenizer
from service.settings import Settings
from tests.conftest import export_tiny
from tests.helpers import metric, private_settings, read_metrics, running_gateway, until
from tests.replicas import gateways, replica_env
from trainer.release.export import embed_with_onnx

ADMIN = {"authorization": "Bearer admin-key"}


def admin_settings(repository: Path, rescan_s: float = 0.0) -> Settings:
    return private_settings(repository).model_copy(
        update={"admin_api_key": SecretStr("admin-key"), "model_rescan_s": rescan_s}
    )


def served_vector(version_dir: Path, text: str) -> np.ndarray:
    return embed_with_onnx(version_dir / "model.onnx", TextTokenizer(version_dir / "tokenizer.json", 64), [text])[0]


async def embed(client: httpx.AsyncClient, model: str, text: str = "hot-loaded") -> httpx.Response:
    return await client.post("/v1/embeddings", json={"input": text, "model": model})


async def test_a_version_exported_while_the_gateway_runs_is_served_after_a_reload(repository_copy: Path) -> None:
    async with running_gateway(admin_settings(repository_copy)) as (_, client):
        assert (await embed(client, "tiny@3")).status_code == 404
        written = export_tiny(repository_copy, seed=5)
        assert written.name == "3"
        assert (await client.post("/v1/admin/models/reload")).status_code == 401  # admin only
        report = await client.post("/v1/admin/models/reload", headers=ADMIN)
        assert report.status_code == 200
        assert report.json() == {"loaded": ["tiny@3"], "unloaded": [], "refused": [], "failed": []}
        answer = await embed(client, "tiny@3")
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "3"
        vector = np.array(answer.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(vector, served_vector(written, "hot-loaded"), atol=1e-6)  # the new weights
        found = await read_metrics(client)
        assert metric(found, "embedserve_model_load_seconds", model="tiny", version="3") > 0
        assert metric(found, "embedserve_model_info", model="tiny", version="3") == 1
        # Unpinned requests stay on the stable version recorded at start: a new version moves nobody until a
        # rollout does (as with a rolling deploy that adds one).
        assert (await embed(client, "tiny")).headers["x-model-version"] == "2"
        # A second reload with nothing new changes nothing.
        again = await client.post("/v1/admin/models/reload", headers=ADMIN)
        assert again.json() == {"loaded": [], "unloaded": [], "refused": [], "failed": []}


async def test_a_removed_version_stops_serving_and_a_changed_one_is_refused_never_half_served(
    repository_copy: Path,
) -> None:
    async with running_gateway(admin_settings(repository_copy)) as (_, client):
        assert (await embed(client, "tiny@1")).status_code == 200
        shutil.rmtree(repository_copy / "tiny" / "2")
        with (repository_copy / "tiny" / "1" / "model.onnx").open("ab") as weights:
            weights.write(b"\0")  # weights changed in place under a served version
        report = (await client.post("/v1/admin/models/reload", headers=ADMIN)).json()
        assert sorted(report["unloaded"]) == ["tiny@1", "tiny@2"]
        gone = await embed(client, "tiny@2")
        assert gone.status_code == 404 and "no version 2" in gone.json()["error"]["message"]
        changed = await embed(client, "tiny@1")
        assert changed.status_code == 404 and changed.json()["error"]["code"] == "version_refused"
        assert "changed on disk" in changed.json()["error"]["message"]
        # Refused for good: putting the old bytes back does not bring it back before a restart.
        ready = (await client.get("/readyz", headers=ADMIN)).json()
        assert {"model": "tiny", "version": 1} in [
            {"model": v["model"], "version": v["version"]} for v in ready["versions"] if v["state"] == "refused"
        ]
        assert (await embed(client, "minilm")).status_code == 200  # the rest serves on
        found = await read_metrics(client)
        assert metric(found, "embedserve_model_version_refused", model="tiny", version="1") == 1
        assert metric(found, "embedserve_model_info", model="tiny", version="2") == 0


async def test_a_folder_refused_on_arrival_is_verified_again_once_fixed(repository_copy: Path) -> None:
    async with running_gateway(admin_settings(repository_copy)) as (_, client):
        broken = repository_copy / "tiny" / "3"
        shutil.copytree(repository_copy / "tiny" / "2", broken)  # its manifest says tiny@2
        report = (await client.post("/v1/admin/models/reload", headers=ADMIN)).json()
        assert [r["version"] for r in report["refused"]] == ["tiny@3"]
        assert (await embed(client, "tiny@3")).status_code == 404
        shutil.rmtree(broken)
        export_tiny(repository_copy, seed=7)  # a real version 3
        report = (await client.post("/v1/admin/models/reload", headers=ADMIN)).json()
        assert report["loaded"] == ["tiny@3"]
        assert (await embed(client, "tiny@3")).status_code == 200


async def test_replicas_sharing_a_repository_converge_by_their_rescans(
    repository_copy: Path, tmp_path: Path, shared_milvus: MilvusLiteServer, shared_redis_prefix: str
) -> None:
    env = replica_env(repository_copy, shared_milvus.uri, shared_redis_prefix, EMBEDSERVE_MODEL_RESCAN_S="0.2")
    with gateways(2, env, tmp_path / "logs") as urls:
        clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
        try:
            written = export_tiny(repository_copy, seed=11)

            async def every_replica_serves_it() -> bool:
                answers = await asyncio.gather(*(embed(c, "tiny@3", "converged") for c in clients))
                return all(a.status_code == 200 for a in answers)

            await until(every_replica_serves_it, timeout_s=60)
            expected = served_vector(written, "converged")
            for client in clients:
                vector = np.array((await embed(client, "tiny@3", "converged")).json()["data"][0]["embedding"])
                np.testing.assert_allclose(vector, expected, atol=1e-6)
        finally:
            for client in clients:
                await client.aclose()


async def test_a_repository_that_cannot_be_read_unloads_nothing(repository_copy: Path) -> None:
    """A storage hiccup (the volume gone for a moment) is not every version deleted."""
    async with running_gateway(admin_settings(repository_copy)) as (_, client):
        hidden = repository_copy.rename(repository_copy.parent / "unmounted")
        report = (await client.post("/v1/admin/models/reload", headers=ADMIN)).json()
        hidden.rename(repository_copy)
        assert report == {"loaded": [], "unloaded": [], "refused": [], "failed": []}
        assert (await embed(client, "tiny@1")).status_code == 200


async def test_a_version_added_under_load_fails_no_request_and_a_tampered_one_shows_in_models(
    repository_copy: Path,
) -> None:
    async with running_gateway(admin_settings(repository_copy)) as (_, client):
        statuses: list[int] = []
        loaded = asyncio.Event()

        async def keep_sending(worker: int) -> None:
            sent = 0
            while not loaded.is_set() or sent < 20:  # before, during and after the reload
                model = ("tiny", "tiny@2", "tiny@1", "minilm")[worker]
                statuses.append((await embed(client, model, f"under load {worker} {sent}")).status_code)
                sent += 1

        async def add_versions() -> None:
            await asyncio.sleep(0.2)
            export_tiny(repository_copy, seed=13)  # tiny@3
            tampered = repository_copy / "tiny" / "4"
            shutil.copytree(repository_copy / "tiny" / "3", tampered)
            with (tampered / "model.onnx").open("ab") as weights:
                weights.write(b"\0")
            report = (await client.post("/v1/admin/models/reload", headers=ADMIN)).json()
            assert report["loaded"] == ["tiny@3"] and [r["version"] for r in report["refused"]] == ["tiny@4"]
            loaded.set()

        await asyncio.gather(add_versions(), *(keep_sending(worker) for worker in range(4)))
        assert len(statuses) >= 80 and set(statuses) == {200}
        models = (await client.get("/v1/models", headers=ADMIN)).json()["data"]
        tiny = next(model for model in models if model["id"] == "tiny")
        states = {v["version"]: v["state"] for v in tiny["versions"]}
        assert (states[3], states[4]) == ("ready", "refused")


async def test_a_version_unloaded_between_routing_and_embedding_answers_503(repository_copy: Path) -> None:
    async with running_gateway(admin_settings(repository_copy)) as (app, _):
        embedder = app.state.embedder
        version, _ = embedder.route("tiny@2")
        batcher = app.state.batchers.pop(("tiny", 2))  # what a reload does while this request is on its way
        try:
            with pytest.raises(ServiceUnavailable, match="no longer served"):
                await embedder.embed(["raced"], version)
        finally:
            await batcher.stop()
