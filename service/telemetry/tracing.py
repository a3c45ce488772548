"""OpenTelemetry tracing: the app's own tracer, exporting over OTLP only when an endpoint is set.

Spans: one server span per HTTP request (``service.edge.access``); under it ``cache.lookup``
(``service.embeddings.cache``), ``batch.queue_wait`` and ``inference`` (``service.embeddings.batcher``),
``vector_store.<operation>`` (``service.vectors.store``) and ``reindex.batch`` roots for re-index work
(``service.vectors.reindex``). Each carries the ``model`` and ``version``
it concerns; attributes hold sizes, counts and ids, never input text or vectors.

The provider belongs to the app, not to the process (no global provider), so two apps in one process keep
their spans apart. Without an endpoint the tracer is OpenTelemetry's no-op one: a span costs a context lookup,
and an incoming ``traceparent`` still reaches the JSON logs.

OpenTelemetry's standard variables are read as settings (``service.settings``: endpoint, protocol,
OTEL_SDK_DISABLED, service name, sampler), so what each does is decided here, not left to which SDK path
happens to read it. The SDK itself still reads the exporter's own (``OTEL_EXPORTER_OTLP_HEADERS``,
certificates, timeout) and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NoOpTracer, Tracer
from opentelemetry.util.types import AttributeValue

from service.models.store import ModelVersion
from service.settings import Settings

# What a part gets when nobody gives it a tracer: spans that record nothing.
NO_TRACING: Tracer = NoOpTracer()
# service.name when neither the settings nor OTEL_RESOURCE_ATTRIBUTES name one.
DEFAULT_SERVICE_NAME = "embedserve"


@dataclass(frozen=True)
class Tracing:
    """One app's tracer, and where its spans go."""

    tracer: Tracer
    exporter: SpanExporter | None  # None: spans go nowhere and ``tracer`` is a no-op
    provider: TracerProvider | None

    def shutdown(self) -> None:
        """Send the spans still queued and stop exporting (blocks: call it off the event loop)."""
        if self.provider is not None:
            self.provider.shutdown()


def create_tracing(settings: Settings, exporter: SpanExporter | None = None) -> Tracing:
    """Spans to ``exporter`` as each ends, when given (tests, debugging); else in batches over OTLP/gRPC to
    ``settings.otlp_endpoint`` when set; else nowhere, through the no-op tracer. Nowhere too with
    ``settings.otel_sdk_disabled``, whatever else is set."""
    if settings.otel_sdk_disabled or (exporter is None and settings.otlp_endpoint is None):
        return Tracing(tracer=NO_TRACING, exporter=None, provider=None)
    provider = TracerProvider(
        resource=_resource(settings.otel_service_name),
        sampler=sampler(settings),
        shutdown_on_exit=False,  # the app's lifespan shuts it down
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(tracer=provider.get_tracer("embedserve"), exporter=exporter, provider=provider)


def sampler(settings: Settings) -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER names (``settings.otel_traces_sampler``), with its ratio."""
    ratio = TraceIdRatioBased(settings.otel_sample_ratio)
    root: Sampler = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF, "traceidratio": ratio}[
        settings.otel_traces_sampler.removeprefix("parentbased_")
    ]
    return ParentBased(root) if settings.otel_traces_sampler.startswith("parentbased_") else root


def _resource(service_name: str | None) -> Resource:
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES (and OTEL_SERVICE_NAME, which the settings have read too).
    detected = Resource.create()
    named = str(detected.attributes.get(SERVICE_NAME, ""))
    if service_name is None:
        service_name = DEFAULT_SERVICE_NAME if named.startswith("unknown_service") else named
    return detected.merge(Resource({SERVICE_NAME: service_name}))


def version_attributes(version: ModelVersion) -> dict[str, AttributeValue]:
    """The attributes every span about one model version carries."""
    return {"model": version.model, "version": version.version}
