"""OpenTelemetry through the real app: the span tree of a request, version attributes, W3C trace context,
trace ids in the JSON logs, OTLP export only when an endpoint is set."""

import asyncio
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr

from service.settings import Settings
from service.telemetry.logs import JsonFormatter
from service.telemetry.tracing import NO_TRACING, create_tracing
from tests.helpers import running_gateway
from tests.otlp_collector import otlp_collector

Gateway = tuple[FastAPI, httpx.AsyncClient]
# Long enough that two requests sent together share a batch, so each trace shows its part of it.
MAX_WAIT_MS = 100


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
async def gateway(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, exporter: InMemorySpanExporter
) -> AsyncIterator[Gateway]:
    milvus = tmp_path_factory.mktemp("tracing") / "milvus.db"
    traced = settings.model_copy(update={"milvus_uri": str(milvus), "max_wait_ms": MAX_WAIT_MS})
    async with running_gateway(traced, span_exporter=exporter) as running:
        yield running


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The exporter, emptied: a test sees only its own spans."""
    exporter.clear()
    yield exporter


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The JSON access-log lines written while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("embedserve.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def request_span(finished: InMemorySpanExporter, name: str) -> ReadableSpan:
    servers = [s for s in finished.get_finished_spans() if s.kind == SpanKind.SERVER and s.name == name]
    assert len(servers) == 1, [s.name for s in finished.get_finished_spans()]
    return servers[0]


def children(finished: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in finished.get_finished_spans() if s.parent and s.parent.span_id == parent.context.span_id]


def in_trace(finished: InMemorySpanExporter, root: ReadableSpan) -> list[ReadableSpan]:
    assert root.context is not None
    return [s for s in finished.get_finished_spans() if s.context and s.context.trace_id == root.context.trace_id]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def embed(client: httpx.AsyncClient, texts: list[str], **headers: str) -> httpx.Response:
    response = await client.post("/v1/embeddings", json={"input": texts, "model": "tiny@1"}, headers=headers)
    assert response.status_code == 200, response.text
    return response


async def test_a_computed_request_has_cache_queue_and_inference_spans_with_its_version(
    gateway: Gateway, spans: InMemorySpanExporter, access_log: io.StringIO
) -> None:
    _, client = gateway
    secret = f"never in a span {uuid.uuid4().hex}"
    response = await embed(client, [secret, "second input"])

    root = request_span(spans, "POST /v1/embeddings")
    assert attributes(root) == {
        "http.request.method": "POST",
        "http.route": "/v1/embeddings",
        "http.response.status_code": 200,
        "embedserve.request_id": response.headers["x-request-id"],
        "model": "tiny",
        "version": 1,
    }
    assert root.parent is None
    by_name = {span.name: span for span in children(spans, root)}
    assert sorted(by_name) == ["batch.queue_wait", "cache.lookup", "inference"]
    for span in by_name.values():
        assert attributes(span)["model"] == "tiny" and attributes(span)["version"] == 1
    assert attributes(by_name["cache.lookup"]) | {"inputs": 2, "hits": 0, "memory_hits": 0} == attributes(
        by_name["cache.lookup"]
    )
    inference = attributes(by_name["inference"])
    assert inference["inputs"] == 2 and inference["batch_size"] == 2 and inference["requests"] == 1
    assert inference["padded_tokens"] >= 2 * 5  # CLS, SEP and at least 3 word pieces each
    queue_wait = by_name["batch.queue_wait"]
    assert queue_wait.start_time is not None and queue_wait.end_time is not None
    assert queue_wait.end_time - queue_wait.start_time >= (MAX_WAIT_MS - 10) * 1_000_000  # waited for the batch
    assert by_name["inference"].start_time == queue_wait.end_time
    assert len(in_trace(spans, root)) == 4

    # Sizes and ids only: the text is in no span.
    for span in spans.get_finished_spans():
        assert secret not in json.dumps(attributes(span), default=str) and secret not in span.name
    # The access-log line carries the request span's ids.
    assert root.context is not None
    line = next(line for line in log_lines(access_log) if line.get("request_id") == response.headers["x-request-id"])
    assert line["trace_id"] == f"{root.context.trace_id:032x}" and line["span_id"] == f"{root.context.span_id:016x}"


async def test_a_shadow_copy_is_a_trace_of_its_own_linked_to_the_request(settings: Settings) -> None:
    exporter = InMemorySpanExporter()
    configured = settings.model_copy(update={"admin_api_key": SecretStr("admin"), "stable_versions": {"tiny": 1}})
    async with running_gateway(configured, span_exporter=exporter) as (app, client):
        body = {"canary_version": 2, "steps": [0, 50], "shadow_percent": 100}
        started = await client.put("/v1/rollouts/tiny", json=body, headers={"authorization": "Bearer admin"})
        assert started.status_code == 200, started.text
        exporter.clear()
        response = await client.post("/v1/embeddings", json={"model": "tiny", "input": "mirrored"})
        assert response.headers["x-model-version"] == "1"
        await asyncio.gather(*app.state.shadow._in_flight)
    root = request_span(exporter, "POST /v1/embeddings")
    assert {attributes(span)["version"] for span in in_trace(exporter, root)} == {1}  # the client's trace: stable
    (mirror,) = [span for span in exporter.get_finished_spans() if span.name == "shadow"]
    assert mirror.parent is None and attributes(mirror) == {"model": "tiny", "version": 2, "inputs": 1}
    assert root.context is not None and mirror.context is not None
    assert mirror.context.trace_id != root.context.trace_id
    assert [link.context.span_id for link in mirror.links] == [root.context.span_id]
    assert {span.name for span in children(exporter, mirror)} == {"cache.lookup", "batch.queue_wait", "inference"}
    assert {attributes(span)["version"] for span in in_trace(exporter, mirror)} == {2}


async def test_a_cached_request_has_no_inference(gateway: Gateway, spans: InMemorySpanExporter) -> None:
    _, client = gateway
    texts = [f"cached {uuid.uuid4().hex}"]
    await embed(client, texts)
    spans.clear()
    await embed(client, texts)

    root = request_span(spans, "POST /v1/embeddings")
    (lookup,) = children(spans, root)
    assert lookup.name == "cache.lookup"
    assert attributes(lookup) == {"model": "tiny", "version": 1, "inputs": 1, "hits": 1, "memory_hits": 1}
    assert [span.name for span in in_trace(spans, root)] == ["cache.lookup", "POST /v1/embeddings"]


async def test_requests_sharing_a_batch_each_get_their_part_of_it(
    gateway: Gateway, spans: InMemorySpanExporter
) -> None:
    _, client = gateway
    await asyncio.gather(embed(client, [f"one {uuid.uuid4().hex}"]), embed(client, [f"two {uuid.uuid4().hex}"]))

    roots = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(roots) == 2
    inferences = []
    for root in roots:
        (inference,) = [s for s in children(spans, root) if s.name == "inference"]
        assert attributes(inference) | {"inputs": 1, "batch_size": 2, "requests": 2} == attributes(inference)
        inferences.append(inference)
    assert inferences[0].start_time == inferences[1].start_time  # one batch, one backend call
    assert roots[0].context is not None and roots[1].context is not None
    assert roots[0].context.trace_id != roots[1].context.trace_id


async def test_an_incoming_traceparent_is_continued_and_reaches_the_logs(
    gateway: Gateway, spans: InMemorySpanExporter, access_log: io.StringIO
) -> None:
    _, client = gateway
    trace_id, caller_span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    response = await embed(client, [f"traced {uuid.uuid4().hex}"], traceparent=f"00-{trace_id}-{caller_span_id}-01")

    root = request_span(spans, "POST /v1/embeddings")
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == trace_id
    assert f"{root.parent.span_id:016x}" == caller_span_id and root.parent.is_remote
    assert {span.name for span in in_trace(spans, root)} == {
        "POST /v1/embeddings",
        "cache.lookup",
        "batch.queue_wait",
        "inference",
    }
    line = next(line for line in log_lines(access_log) if line.get("request_id") == response.headers["x-request-id"])
    assert line["trace_id"] == trace_id


async def test_a_caller_that_did_not_sample_is_followed_and_its_trace_id_still_logged(
    gateway: Gateway, spans: InMemorySpanExporter, access_log: io.StringIO
) -> None:
    _, client = gateway
    trace_id = uuid.uuid4().hex
    response = await embed(client, ["not sampled"], traceparent=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-00")

    assert spans.get_finished_spans() == ()
    line = next(line for line in log_lines(access_log) if line.get("request_id") == response.headers["x-request-id"])
    assert line["trace_id"] == trace_id


async def test_collection_requests_have_vector_store_spans(gateway: Gateway, spans: InMemorySpanExporter) -> None:
    _, client = gateway
    created = await client.put("/v1/collections/traced", json={"model": "tiny@1"})
    assert created.status_code == 201, created.text
    items = [{"id": f"i{i}", "text": f"item number {i}"} for i in range(3)]
    assert (await client.post("/v1/collections/traced/items", json={"items": items})).status_code == 200
    spans.clear()
    found = await client.post("/v1/collections/traced/search", json={"query": "which item is first?", "top_k": 2})
    assert found.status_code == 200, found.text

    root = request_span(spans, "POST /v1/collections/{name}/search")
    assert attributes(root)["http.route"] == "/v1/collections/{name}/search"
    assert attributes(root)["model"] == "tiny" and attributes(root)["version"] == 1
    (search,) = children(spans, root)
    assert search.name == "vector_store.search"
    assert attributes(search) == {"collection": "traced", "model": "tiny", "version": 1, "mode": "dense", "top_k": 2}
    # The query is embedded under the search span.
    assert {span.name for span in children(spans, search)} == {"cache.lookup", "batch.queue_wait", "inference"}
    for span in in_trace(spans, root):
        assert attributes(span)["model"] == "tiny" and attributes(span)["version"] == 1


async def test_probes_and_scrapes_make_no_spans(gateway: Gateway, spans: InMemorySpanExporter) -> None:
    _, client = gateway
    for path in ("/healthz", "/metrics"):
        assert (await client.get(path)).status_code == 200
    assert spans.get_finished_spans() == ()


async def test_a_process_wide_tracer_provider_gets_no_spans_from_fastapi_itself(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's spans are its own (no global provider). A process-wide provider, as ``opentelemetry-instrument``
    sets one, must not get FastAPI's native HTTP spans: they would double every request span."""
    process_wide = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(process_wide))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    async with running_gateway(settings) as (_, client):
        response = await client.post("/v1/embeddings", json={"input": "one input", "model": "tiny"})
        assert response.status_code == 200, response.text
    assert process_wide.get_finished_spans() == ()


def test_without_an_endpoint_nothing_is_exported(settings: Settings) -> None:
    tracing = create_tracing(settings)
    assert settings.otlp_endpoint is None
    assert tracing.exporter is None and tracing.provider is None and tracing.tracer is NO_TRACING
    with tracing.tracer.start_as_current_span("anything") as span:
        assert not span.is_recording()


async def test_with_an_endpoint_spans_go_to_the_collector_over_otlp(settings: Settings) -> None:
    with otlp_collector() as collector:
        exporting = settings.model_copy(
            update={"otlp_endpoint": collector.endpoint, "otel_service_name": "embedserve-test"}
        )
        async with running_gateway(exporting) as (app, client):
            assert isinstance(app.state.tracing.exporter, OTLPSpanExporter)
            await embed(client, [f"exported {uuid.uuid4().hex}"])
        # Leaving the lifespan flushed the batch of spans to the collector.
    exported = collector.spans()
    names = sorted(span.name for _, span in exported)
    assert names == ["POST /v1/embeddings", "batch.queue_wait", "cache.lookup", "inference"]
    service_names = {a.value.string_value for r, _ in exported for a in r.attributes if a.key == "service.name"}
    assert service_names == {"embedserve-test"}
    for _, span in exported:
        values = {a.key: a.value for a in span.attributes}
        assert values["model"].string_value == "tiny" and values["version"].int_value == 1
