"""The client's view of the wire agrees with the gateway's models, and its transport behaviour without a gateway:
an error body read into GatewayError, a 429 sent again after Retry-After, upserts cut at the route's limit."""

import inspect
import json
from datetime import UTC, datetime
from typing import Any, get_args

import httpx
import pytest
from pydantic import BaseModel

from client import calls, protocol
from client.async_gateway import AsyncGateway
from client.gateway import Gateway, GatewayError
from service.embeddings import versions
from service.models import protocol as models_protocol
from service.releases import ledger as release_ledger
from service.releases import protocol as release_protocol
from service.releases import signals as release_signals
from service.rollouts import state as rollout_state
from service.rollouts.protocol import StartRollout
from service.vectors import protocol as vectors_protocol

# Each client model and the gateway model it reads.
COUNTERPARTS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (protocol.Collection, vectors_protocol.CollectionInfo),
    (protocol.ReindexProgress, vectors_protocol.ReindexInfo),
    (protocol.Item, vectors_protocol.Item),
    (protocol.Hit, vectors_protocol.Hit),
    (protocol.SearchResult, vectors_protocol.SearchResponse),
    (protocol.ModelVersion, models_protocol.VersionCard),
    (protocol.Model, models_protocol.ModelCard),
    (protocol.ReloadReport, versions.ReloadReport),
    (protocol.ReloadFailure, versions.ReloadFailure),
    (protocol.Rollout, rollout_state.RolloutState),
    (protocol.Decision, rollout_state.Decision),
    (protocol.Judgement, rollout_state.Judgement),
    (protocol.RolloutAnalysis, rollout_state.AnalysisSettings),
    (protocol.Release, release_ledger.ReleaseRecord),
    (protocol.ReleaseClaim, release_protocol.ReleaseClaim),
    (protocol.ReleaseLedger, release_protocol.ReleaseLedgerView),
    (protocol.ReleaseSignals, release_signals.ReleaseSignalsView),
]


@pytest.mark.parametrize(("mine", "theirs"), COUNTERPARTS, ids=lambda model: model.__name__)
def test_every_field_the_client_reads_is_one_the_gateway_sends(mine: type[BaseModel], theirs: type[BaseModel]) -> None:
    assert set(mine.model_fields) <= set(theirs.model_fields)
    # Required on the client only where the gateway always sends it.
    for name, field in mine.model_fields.items():
        if field.is_required():
            assert theirs.model_fields[name].is_required() or theirs.model_fields[name].default is not None, name


def test_phases_and_limits_are_the_gateways() -> None:
    assert get_args(protocol.Phase) == rollout_state.PHASES
    assert set(rollout_state.PHASES) - rollout_state.ACTIVE_PHASES == protocol.ENDED_PHASES
    assert calls.MAX_ITEMS_PER_REQUEST == vectors_protocol.MAX_ITEMS_PER_REQUEST
    assert list(calls.DEFAULT_STEPS) == StartRollout(canary_version=2).steps


def test_both_clients_offer_the_same_methods_with_the_same_parameters() -> None:
    def methods(cls: type) -> dict[str, list[tuple[str, object, object]]]:
        return {
            name: [(p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()]
            for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and name not in {"close", "aclose"}
        }

    synchronous, asynchronous = methods(Gateway), methods(AsyncGateway)
    assert synchronous == asynchronous and len(synchronous) == 25
    assert all(inspect.iscoroutinefunction(getattr(AsyncGateway, name)) for name in asynchronous)


def test_a_rollout_and_a_model_list_read_as_the_gateway_writes_them() -> None:
    state = rollout_state.start(None, "m", 1, 2, [5, 50], 0.0, rollout_state.AnalysisSettings(enabled=True))
    judgement = rollout_state.Judgement(at=datetime.now(UTC), result="fail", reason="error rate 0.2 > 0.01")
    state = rollout_state.fail(rollout_state.judged(state, judgement), "error rate 0.2 > 0.01 (2 in a row)", "analysis")
    mine = protocol.Rollout.model_validate_json(state.model_dump_json())
    assert (mine.phase, mine.ended, mine.weight, mine.canary_version) == ("failed", True, 0, 2)
    assert mine.last_judgement is not None and mine.last_judgement.reason == "error rate 0.2 > 0.01"
    assert [d.action for d in mine.history] == ["start", "fail"] and mine.analysis.enabled
    assert mine.analysis.thresholds["max_error_rate"] == 0.01

    cards = models_protocol.ModelList(
        data=[
            models_protocol.ModelCard(
                id="m",
                created=0,
                versions=[
                    models_protocol.VersionCard(version=1, state="ready", is_default=True, dimension=8),
                    models_protocol.VersionCard(version=2, state="refused", is_default=False, reason="sha256 differs"),
                ],
            )
        ]
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=cards.model_dump_json()))
    with Gateway("http://gateway", transport=transport) as gateway:
        (model,) = gateway.models()
    assert (model.id, model.default_version) == ("m", 1)
    assert [(v.version, v.reason) for v in model.refused] == [(2, "sha256 differs")]


def answers(*responses: httpx.Response) -> tuple[list[httpx.Request], httpx.MockTransport]:
    sent: list[httpx.Request] = []
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return queue.pop(0)

    return sent, httpx.MockTransport(handle)


ITEM = {"id": "a", "text": "x", "metadata": {}}


def test_a_429_is_sent_again_after_retry_after_and_an_error_body_is_read() -> None:
    sent, transport = answers(
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "busy", "code": "overloaded"}}),
        httpx.Response(200, json=ITEM),
        httpx.Response(400, json={"error": {"message": "bad top_k", "param": "top_k", "code": "invalid_request"}}),
        httpx.Response(502, text="<html>bad gateway</html>"),
    )
    with Gateway("http://gateway/", api_key="k", transport=transport) as gateway:
        assert gateway.get_item("c", "a") == protocol.Item(**ITEM)
        with pytest.raises(GatewayError) as invalid:
            gateway.search("c", "q", top_k=0)
        with pytest.raises(GatewayError) as proxy:
            gateway.collections()
    assert [r.url.path for r in sent] == ["/v1/collections/c/items/a"] * 2 + [
        "/v1/collections/c/search",
        "/v1/collections",
    ]
    assert sent[0].headers["authorization"] == "Bearer k"
    assert (invalid.value.status, invalid.value.param, invalid.value.message) == (400, "top_k", "bad top_k")
    assert str(invalid.value) == "POST /v1/collections/c/search: 400 bad top_k"
    assert (proxy.value.status, proxy.value.message) == (502, "<html>bad gateway</html>")


async def test_the_async_client_retries_and_reads_errors_alike() -> None:
    sent, transport = answers(
        httpx.Response(429, headers={"Retry-After": "0"}),
        httpx.Response(429, headers={"Retry-After": "0"}),
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "still busy"}}),
    )
    async with AsyncGateway("http://gateway", transport=transport, retries=2) as gateway:
        with pytest.raises(GatewayError) as busy:
            await gateway.collection("c")
    assert len(sent) == 3 and (busy.value.status, busy.value.message) == (429, "still busy")


def test_upserts_are_cut_at_the_routes_limit_and_names_stay_one_path_segment() -> None:
    bodies: list[Any] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append((request.url.raw_path, len(json.loads(request.content)["items"])))
        return httpx.Response(200, json={"upserted": bodies[-1][1], "model": "m@1"})

    items = ({"id": str(i), "text": "t"} for i in range(2345))  # read lazily
    with Gateway("http://gateway", transport=httpx.MockTransport(handle)) as gateway:
        assert gateway.upsert("a/b c", items) == 2345
        with pytest.raises(ValueError, match="between 1 and 1000"):
            gateway.upsert("c", [], batch_size=1001)
    assert bodies == [(b"/v1/collections/a%2Fb%20c/items", n) for n in (1000, 1000, 345)]


def test_a_gateway_that_cannot_be_reached_or_answers_late_is_said_so() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def late(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with Gateway("http://gateway", transport=httpx.MockTransport(refuse)) as gateway, pytest.raises(GatewayError) as e:
        gateway.models()
    assert e.value.status is None and str(e.value) == "cannot reach the gateway at http://gateway: connection refused"
    too_late = pytest.raises(GatewayError, match="no answer from the gateway at http://gateway within 2 s")
    with Gateway("http://gateway", timeout_s=2, transport=httpx.MockTransport(late)) as gateway, too_late:
        gateway.models()
