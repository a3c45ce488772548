"""Shared test helpers: an in-process gateway over real ASGI, and reading its Prometheus metrics."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings


def private_settings(repository: Path) -> Settings:
    """Settings for a gateway on ``repository`` with a Milvus Lite file of its own beside it (never the
    developer's data/milvus.db, which the gateway would open, resume and tidy at start); no keys, and
    anonymous collection writes allowed as on a trusted network (key tests set their own)."""
    milvus_file = repository.parent / f"{repository.name}-milvus.db"
    return Settings(model_repository=repository, milvus_uri=str(milvus_file), allow_anonymous_writes=True)


@asynccontextmanager
async def running_gateway(
    settings: Settings, span_exporter: SpanExporter | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan run, and an async client on its real ASGI stack."""
    app = create_app(settings, span_exporter)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            yield app, client


def parse_metrics(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def metric(found: dict[str, list], sample_name: str, **labels: str) -> float:
    """Sum of the samples called ``sample_name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for samples in found.values()
        for sample in samples
        if sample.name == sample_name and labels.items() <= sample.labels.items()
    )


async def read_metrics(client: httpx.AsyncClient) -> dict[str, list]:
    return parse_metrics((await client.get("/metrics")).text)


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds; the deadline only keeps a broken gateway from hanging the test."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        await asyncio.sleep(0.01)


async def queued_at_least(client: httpx.AsyncClient, count: int, model: str = "minilm") -> bool:
    """Whether ``model``'s batchers hold at least ``count`` queued inputs."""
    return metric(await read_metrics(client), "embedserve_queue_depth", model=model) >= count
