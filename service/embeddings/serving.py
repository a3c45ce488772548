"""What every embedding route does around the embedder, whatever its wire format (OpenAI's, TEI's): the canary
window records each request's latency and outcome, a client that leaves cancels its work, stable's answers
are mirrored to the canary, the access log gets the counts, and the response gets TEI's timing headers."""

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from fastapi import Request

from service.embeddings.embedder import Embedder, EmbedResult, Truncation
from service.errors import ApiError
from service.models.store import ModelVersion

T = TypeVar("T")
# nginx's code for "client closed request": nobody reads it, but the access log and metrics do.
CLIENT_CLOSED_REQUEST = 499


class ServedRecorder(Protocol):
    """Where each request's latency and outcome go (the rollout analysis's ``service.rollouts.window``)."""

    def record(self, model: str, version: int, seconds: float, failed: bool, computed: bool = True) -> None: ...


class Mirror(Protocol):
    """What sees each served request afterwards (shadow traffic: ``service.rollouts.shadow``)."""

    def after_served(self, texts: list[str], served: ModelVersion, pinned: bool) -> None: ...


async def serve(
    request: Request, texts: list[str], version: ModelVersion, pinned: bool, truncation: Truncation | None = None
) -> EmbedResult | None:
    """``texts`` embedded by ``version`` for a client (``Embedder.embed``), recorded for the canary analysis,
    mirrored to a canary and counted in the access log; None, its queued inputs dropped before inference, when
    the client disconnected first (answer ``CLIENT_CLOSED_REQUEST`` then)."""
    embedder: Embedder = request.app.state.embedder
    work = embedder.embed(texts, version, truncation=truncation)
    result = await _unless_client_leaves(request, _recorded(request, work, version))
    if result is None:
        return None
    shadow: Mirror = request.app.state.shadow
    shadow.after_served(texts, version, pinned)
    request.state.log_fields = {"inputs": len(texts), "tokens": result.prompt_tokens}
    return result


def timing_headers(result: EmbedResult, texts: list[str], started: float) -> dict[str, str]:
    """TEI's timing headers, whole milliseconds as TEI writes them: the request's time since ``started``
    (``time.perf_counter()``), and the mean per input of tokenising, queueing and inference (cache hits: 0)."""
    total = _milliseconds(time.perf_counter() - started)
    return {
        "x-compute-time": total,
        "x-total-time": total,
        "x-compute-characters": str(sum(map(len, texts))),
        "x-compute-tokens": str(result.prompt_tokens),
        "x-tokenization-time": _milliseconds(result.times.tokenization_s),
        "x-queue-time": _milliseconds(result.times.queue_s),
        "x-inference-time": _milliseconds(result.times.inference_s),
    }


def _milliseconds(seconds: float) -> str:
    return str(int(seconds * 1000))


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work``; None, with ``work`` cancelled (its queued inputs dropped before inference), if the client
    disconnects first."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _recorded(request: Request, work: Coroutine[Any, Any, EmbedResult], version: ModelVersion) -> EmbedResult:
    """``work``, its latency and outcome recorded in the canary window (what the rollout analysis judges)."""
    window: ServedRecorder = request.app.state.canary_window
    started = time.perf_counter()
    try:
        result = await work
    except ApiError as error:
        window.record(version.model, version.version, time.perf_counter() - started, error.status_code >= 500)
        raise
    except Exception:
        window.record(version.model, version.version, time.perf_counter() - started, failed=True)
        raise
    elapsed = time.perf_counter() - started
    window.record(version.model, version.version, elapsed, failed=False, computed=result.computed > 0)
    return result
