"""The typed client against a real gateway process: the same round trip through ``Gateway`` and ``AsyncGateway``
gives the same answers; an error answer is a ``GatewayError`` with the gateway's status and message."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client.async_gateway import AsyncGateway
from client.gateway import Gateway, GatewayError
from client.protocol import Item
from tests.client.conftest import ADMIN_KEY, READER_KEY, WRITER_KEY, RunningGateway

ROOT = Path(__file__).resolve().parents[2]
ITEMS = [
    Item(id="en-1", text="How do I reset my password?", metadata={"lang": "en"}),
    Item(id="en-2", text="Where can I download my invoices?", metadata={"lang": "en"}),
    Item(id="fr-1", text="Comment changer mon mot de passe ?", metadata={"lang": "fr"}),
]
MORE = [{"id": f"more-{i}", "text": f"another question about invoices, number {i}"} for i in range(7)]


def sync_round_trip(url: str, name: str) -> dict[str, Any]:
    seen: list[int] = []
    with Gateway(url, WRITER_KEY) as gateway:
        created = gateway.create_collection(name, "tiny@1", fields={"lang": "string"})
        stored = gateway.upsert(name, [*ITEMS, *MORE], batch_size=4, progress=seen.append)
        found = gateway.search(name, "reset my password", top_k=3)
        french = gateway.search(name, "mot de passe", mode="keyword", filter={"field": "lang", "eq": "fr"})
        hybrid = gateway.search(
            name, "invoices", mode="hybrid", top_k=5, fusion={"method": "rrf", "k": 10}, candidates=5
        )
        item = gateway.get_item(name, "en-2")
        gateway.delete_item(name, "en-2")
        with pytest.raises(GatewayError) as gone:
            gateway.get_item(name, "en-2")
        listed = [c.name for c in gateway.collections()]
        after = gateway.collection(name)
        gateway.delete_collection(name)
        models = gateway.models()
    return {
        "created": (created.model_version, created.items, created.fields, created.state),
        "stored": stored,
        "progress": seen,
        "found": (found.hits[0].id, found.model),
        "french": [(hit.id, hit.metadata) for hit in french.hits],
        "hybrid": [hit.id for hit in hybrid.hits],
        "item": item,
        "gone": (gone.value.status, gone.value.code),
        "listed": name in listed,
        "after": (after.items, after.hybrid.fusion.label),
        "models": {model.id: (model.default_version, [v.version for v in model.versions]) for model in models},
    }


async def async_round_trip(url: str, name: str) -> dict[str, Any]:
    seen: list[int] = []
    async with AsyncGateway(url, WRITER_KEY) as gateway:
        created = await gateway.create_collection(name, "tiny@1", fields={"lang": "string"})
        stored = await gateway.upsert(name, [*ITEMS, *MORE], batch_size=4, progress=seen.append)
        found = await gateway.search(name, "reset my password", top_k=3)
        french = await gateway.search(name, "mot de passe", mode="keyword", filter={"field": "lang", "eq": "fr"})
        hybrid = await gateway.search(
            name, "invoices", mode="hybrid", top_k=5, fusion={"method": "rrf", "k": 10}, candidates=5
        )
        item = await gateway.get_item(name, "en-2")
        await gateway.delete_item(name, "en-2")
        with pytest.raises(GatewayError) as gone:
            await gateway.get_item(name, "en-2")
        listed = [c.name for c in await gateway.collections()]
        after = await gateway.collection(name)
        await gateway.delete_collection(name)
        models = await gateway.models()
    return {
        "created": (created.model_version, created.items, created.fields, created.state),
        "stored": stored,
        "progress": seen,
        "found": (found.hits[0].id, found.model),
        "french": [(hit.id, hit.metadata) for hit in french.hits],
        "hybrid": [hit.id for hit in hybrid.hits],
        "item": item,
        "gone": (gone.value.status, gone.value.code),
        "listed": name in listed,
        "after": (after.items, after.hybrid.fusion.label),
        "models": {model.id: (model.default_version, [v.version for v in model.versions]) for model in models},
    }


async def test_sync_and_async_clients_make_the_same_round_trip(keyed_gateway: RunningGateway) -> None:
    synchronous = sync_round_trip(keyed_gateway.url, "roundtrip_sync")
    asynchronous = await async_round_trip(keyed_gateway.url, "roundtrip_async")
    assert synchronous == asynchronous
    assert synchronous["created"] == ("tiny@1", 0, {"lang": "string"}, "ready")
    assert synchronous["stored"] == 10 and synchronous["progress"] == [4, 4, 2]
    assert synchronous["found"] == ("en-1", "tiny@1")
    assert synchronous["french"] == [("fr-1", {"lang": "fr"})]
    assert synchronous["hybrid"] and set(synchronous["hybrid"]) <= {i.id for i in ITEMS} | {i["id"] for i in MORE}
    assert synchronous["item"] == ITEMS[1]
    assert synchronous["gone"] == (404, "not_found") and synchronous["listed"]
    assert synchronous["after"] == (9, "weighted zscore alpha=0.5")
    assert synchronous["models"] == {"minilm": (1, [1]), "tiny": (1, [1, 2])}


async def test_rollouts_through_both_clients(keyed_gateway: RunningGateway) -> None:
    with Gateway(keyed_gateway.url, ADMIN_KEY) as gateway:
        minilm = gateway.rollout("minilm")
        assert minilm is not None and (minilm.phase, minilm.stable_version, minilm.ended) == ("promoted", 1, True)
        assert minilm.history[-1].action == "adopt" and gateway.rollout("nosuch") is None
        report = gateway.reload_models()
        assert (report.loaded, report.unloaded, report.refused, report.failed) == ([], [], [], [])
    async with AsyncGateway(keyed_gateway.url, ADMIN_KEY) as gateway:
        listed = {state.model: state for state in await gateway.rollouts()}
        assert listed["minilm"] == minilm and await gateway.rollout("nosuch") is None


def test_an_error_answer_carries_the_gateway_status_and_message(keyed_gateway: RunningGateway) -> None:
    with Gateway(keyed_gateway.url, READER_KEY) as gateway:
        with pytest.raises(GatewayError) as missing:
            gateway.search("nowhere", "anything")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        assert (
            missing.value.message == "collection 'nowhere' does not exist; create it with PUT /v1/collections/nowhere."
        )
        assert str(missing.value).startswith("POST /v1/collections/nowhere/search: 404 collection 'nowhere'")
        with pytest.raises(GatewayError) as scope:
            gateway.create_collection("mine", "tiny")
        assert scope.value.status == 403 and "'write' scope" in scope.value.message
    with Gateway(keyed_gateway.url, WRITER_KEY) as gateway:
        with pytest.raises(GatewayError) as model:
            gateway.create_collection("mine", "nosuch@1")
        assert model.value.status == 404 and "nosuch" in model.value.message
        with pytest.raises(GatewayError) as admin:
            gateway.start_rollout("tiny", 2, steps=[10, 50])
        assert admin.value.status == 403
    with Gateway(keyed_gateway.url, ADMIN_KEY) as gateway, pytest.raises(GatewayError) as bad:
        gateway.start_rollout("tiny", 7, steps=[10, 50])
    assert (bad.value.status, bad.value.param) == (400, "canary_version")
    assert "tiny@7 cannot be served" in bad.value.message


def test_nothing_of_the_gateway_is_imported_by_the_client() -> None:
    """The client (and so the CLI) loads without the web framework or Milvus: quick to start."""
    heavy = ("fastapi", "starlette", "uvicorn", "pymilvus", "redis", "onnxruntime")
    probe = f"import sys, client.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
