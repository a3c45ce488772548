"""OpenTelemetry's standard variables: endpoint, protocol, OTEL_SDK_DISABLED, service name and sampler, read as
settings (the EMBEDSERVE_ ones win); and a gateway process given only OTEL_EXPORTER_OTLP_ENDPOINT sends a
collector its request's spans, continuing the caller's trace."""

import time
import uuid
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ValidationError

from loadtests.processes import gateway
from service.settings import Settings
from service.telemetry.tracing import NO_TRACING, create_tracing
from tests.otlp_collector import otlp_collector


def settings_from(monkeypatch: pytest.MonkeyPatch, model_repository: Path, **environment: str) -> Settings:
    """Settings as the gateway reads them at start, with ``environment`` set too: a test's calls add up, so a
    later call shows which variable wins over the ones set before."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings(model_repository=model_repository)


def sampled(settings: Settings, parent_sampled: bool | None) -> bool:
    """Whether a span is recorded: a new trace (None), or under a remote caller's span that was (not) sampled."""
    tracing = create_tracing(settings, InMemorySpanExporter())
    context = None
    if parent_sampled is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if parent_sampled else TraceFlags.DEFAULT)
        caller = SpanContext(uuid.uuid4().int >> 64, uuid.uuid4().int >> 64, is_remote=True, trace_flags=flags)
        context = trace.set_span_in_context(NonRecordingSpan(caller))
    return tracing.tracer.start_span("request", context).is_recording()


def service_name(settings: Settings) -> object:
    provider = create_tracing(settings, InMemorySpanExporter()).provider
    assert provider is not None
    return provider.resource.attributes["service.name"]


def test_the_endpoint_comes_from_otel_variables_unless_embedserve_names_one(
    monkeypatch: pytest.MonkeyPatch, model_repository: Path
) -> None:
    generic = settings_from(monkeypatch, model_repository, OTEL_EXPORTER_OTLP_ENDPOINT="http://generic:4317")
    assert generic.otlp_endpoint == "http://generic:4317"
    assert create_tracing(generic).tracer is not NO_TRACING
    traces = settings_from(monkeypatch, model_repository, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://traces:4317")
    assert traces.otlp_endpoint == "http://traces:4317"
    ours = settings_from(monkeypatch, model_repository, EMBEDSERVE_OTLP_ENDPOINT="http://ours:4317")
    assert ours.otlp_endpoint == "http://ours:4317"


def test_otel_sdk_disabled_turns_tracing_off_whatever_else_is_set(
    monkeypatch: pytest.MonkeyPatch, model_repository: Path
) -> None:
    disabled = settings_from(
        monkeypatch, model_repository, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317", OTEL_SDK_DISABLED="true"
    )
    tracing = create_tracing(disabled, InMemorySpanExporter())
    assert tracing.tracer is NO_TRACING and tracing.provider is None


def test_a_protocol_other_than_grpc_refuses_to_start(monkeypatch: pytest.MonkeyPatch, model_repository: Path) -> None:
    with pytest.raises(ValidationError, match="grpc"):
        settings_from(monkeypatch, model_repository, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert settings_from(monkeypatch, model_repository, OTEL_EXPORTER_OTLP_PROTOCOL="grpc").otlp_protocol == "grpc"


def test_the_service_name_comes_from_otel_service_name_then_resource_attributes(
    monkeypatch: pytest.MonkeyPatch, model_repository: Path
) -> None:
    assert service_name(settings_from(monkeypatch, model_repository)) == "embedserve"
    from_attributes = settings_from(
        monkeypatch, model_repository, OTEL_RESOURCE_ATTRIBUTES="service.name=from-attributes,deployment.environment=t"
    )
    assert service_name(from_attributes) == "from-attributes"
    named = settings_from(monkeypatch, model_repository, OTEL_SERVICE_NAME="from-otel")
    assert named.otel_service_name == "from-otel" and service_name(named) == "from-otel"
    ours = settings_from(monkeypatch, model_repository, EMBEDSERVE_OTEL_SERVICE_NAME="ours")
    assert service_name(ours) == "ours"


@pytest.mark.parametrize(
    ("sampler", "ratio", "new_trace", "under_sampled", "under_unsampled"),
    [
        (None, None, True, True, False),  # the default: parentbased_traceidratio at 1.0
        ("parentbased_traceidratio", "0", False, True, False),
        ("traceidratio", "0", False, False, False),  # ignores the caller's decision
        ("traceidratio", "1", True, True, True),
        ("always_off", None, False, False, False),
        ("always_on", None, True, True, True),
        ("parentbased_always_off", None, False, True, False),
        ("parentbased_always_on", None, True, True, False),
    ],
)
def test_the_sampler_comes_from_otel_traces_sampler_and_its_arg(
    monkeypatch: pytest.MonkeyPatch,
    model_repository: Path,
    sampler: str | None,
    ratio: str | None,
    new_trace: bool,
    under_sampled: bool,
    under_unsampled: bool,
) -> None:
    environment = {"OTEL_TRACES_SAMPLER": sampler} if sampler else {}
    if ratio is not None:
        environment["OTEL_TRACES_SAMPLER_ARG"] = ratio
    settings = settings_from(monkeypatch, model_repository, **environment)
    assert (sampled(settings, None), sampled(settings, True), sampled(settings, False)) == (
        new_trace,
        under_sampled,
        under_unsampled,
    )


def test_an_unknown_sampler_refuses_to_start(monkeypatch: pytest.MonkeyPatch, model_repository: Path) -> None:
    with pytest.raises(ValidationError, match="parentbased_traceidratio"):
        settings_from(monkeypatch, model_repository, OTEL_TRACES_SAMPLER="jaeger_remote")


def test_a_gateway_given_only_the_otel_endpoint_exports_spans_that_continue_the_callers_trace(
    model_repository: Path, tmp_path: Path
) -> None:
    trace_id, caller_span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with otlp_collector() as collector:
        env = {
            "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
            "EMBEDSERVE_MILVUS_URI": str(tmp_path / "milvus.db"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,  # nothing else about tracing
        }
        with gateway(env, tmp_path / "gateway.log") as url:
            response = httpx.post(
                f"{url}/embed?model=tiny@1",
                json={"inputs": [f"traced {uuid.uuid4().hex}"]},
                headers={"traceparent": f"00-{trace_id}-{caller_span_id}-01"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            # Spans leave in batches (every 5 s by default): wait for the request's server span.
            deadline = time.monotonic() + 30
            while not any(span.name == "POST /embed" for _, span in collector.spans()):
                assert time.monotonic() < deadline, "no span reached the collector"
                time.sleep(0.2)
    received = [(resource, span) for resource, span in collector.spans() if span.trace_id.hex() == trace_id]
    by_name = {span.name: span for _, span in received}
    assert sorted(by_name) == ["POST /embed", "batch.queue_wait", "cache.lookup", "inference"]
    server = by_name["POST /embed"]
    assert server.parent_span_id.hex() == caller_span_id  # the caller's span is its parent
    for name in ("cache.lookup", "batch.queue_wait", "inference"):
        assert by_name[name].parent_span_id == server.span_id
    names = {a.value.string_value for resource, _ in received for a in resource.attributes if a.key == "service.name"}
    assert names == {"embedserve"}
