"""``AsyncGateway``: ``client.gateway.Gateway``'s methods as coroutines, for asyncio programs (``client.evaluate``
fetches its legs concurrently through it). The same requests (``client.calls``), answers and errors."""

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from client import calls
from client.calls import DEFAULT_STEPS, MAX_ITEMS_PER_REQUEST, Call, Deadline, FusionLike, GatewayError, ItemLike
from client.protocol import (
    ENDED_PHASES,
    Collection,
    Item,
    Model,
    Phase,
    Release,
    ReleaseClaim,
    ReleaseLedger,
    ReleaseSignals,
    ReloadReport,
    Rollout,
    SearchMode,
    SearchResult,
)

T = TypeVar("T")


class AsyncGateway:
    """``Gateway``'s methods, awaited: use as ``async with AsyncGateway(url) as gateway``; see ``Gateway`` for what
    each promises."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        *,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=calls.auth_headers(api_key), timeout=timeout_s, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(call.method, call.path, json=call.body)
            except httpx.TransportError as error:
                raise calls.unreachable(call, self.url, self.timeout_s, error) from None
            if response.status_code != 429 or attempt == self.retries:
                break
            await asyncio.sleep(calls.retry_after_s(response))
        return calls.read_answer(call, response)

    async def models(self) -> list[Model]:
        return await self._send(calls.models())

    async def reload_models(self) -> ReloadReport:
        return await self._send(calls.reload_models())

    async def rollouts(self) -> list[Rollout]:
        return await self._send(calls.rollouts())

    async def rollout(self, model: str) -> Rollout | None:
        return await self._send(calls.rollout(model))

    async def start_rollout(
        self,
        model: str,
        canary_version: int,
        *,
        steps: Sequence[int] = DEFAULT_STEPS,
        analysis: bool | Mapping[str, Any] = True,
        shadow_percent: float = 0.0,
        reason: str | None = None,
        revision: int | None = None,
    ) -> Rollout:
        return await self._send(
            calls.start_rollout(model, canary_version, steps, analysis, shadow_percent, reason, revision)
        )

    async def promote(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        return await self._send(calls.rollout_action(model, "promote", reason, revision))

    async def rollback(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        return await self._send(calls.rollout_action(model, "rollback", reason, revision))

    async def pause(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        return await self._send(calls.rollout_action(model, "pause", reason, revision))

    async def resume(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        return await self._send(calls.rollout_action(model, "resume", reason, revision))

    async def set_weight(
        self, model: str, weight: int, reason: str | None = None, *, revision: int | None = None
    ) -> Rollout:
        return await self._send(calls.set_weight(model, weight, reason, revision))

    async def wait_rollout(
        self,
        model: str,
        *,
        until: Iterable[Phase] = ENDED_PHASES,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        progress: Callable[[Rollout], None] | None = None,
    ) -> Rollout:
        phases, deadline = frozenset(until), Deadline(timeout_s, f"rollout of {model}")
        while True:
            state = await self.rollout(model)
            if state is None:
                raise GatewayError(f"{model} has no rollout to wait for.", status=404)
            if progress is not None:
                progress(state)
            if state.phase in phases:
                return state
            deadline.check()
            await asyncio.sleep(poll_s)

    async def claim_release(self, model: str, trigger: str, release_id: str) -> ReleaseClaim:
        return await self._send(calls.claim_release(model, trigger, release_id))

    async def report_release(self, release_id: str, **fields: Any) -> Release:
        return await self._send(calls.report_release(release_id, fields))

    async def releases(self) -> ReleaseLedger:
        return await self._send(calls.releases())

    async def release_signals(self, model: str) -> ReleaseSignals:
        return await self._send(calls.release_signals(model))

    async def collections(self) -> list[Collection]:
        return await self._send(calls.collections())

    async def collection(self, name: str) -> Collection:
        return await self._send(calls.collection(name))

    async def create_collection(
        self,
        name: str,
        model: str,
        *,
        fields: Mapping[str, str] | None = None,
        hybrid: Mapping[str, Any] | None = None,
    ) -> Collection:
        return await self._send(calls.create_collection(name, model, fields, hybrid))

    async def delete_collection(self, name: str) -> None:
        await self._send(calls.delete_collection(name))

    async def upsert(
        self,
        name: str,
        items: Iterable[ItemLike],
        *,
        batch_size: int = MAX_ITEMS_PER_REQUEST,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        stored = 0
        for chunk in calls.chunks(items, batch_size):
            stored += await self._send(calls.upsert(name, chunk))
            if progress is not None:
                progress(len(chunk))
        return stored

    async def get_item(self, name: str, item_id: str) -> Item:
        return await self._send(calls.get_item(name, item_id))

    async def delete_item(self, name: str, item_id: str) -> None:
        await self._send(calls.delete_item(name, item_id))

    async def search(
        self,
        name: str,
        query: str,
        mode: SearchMode = "dense",
        top_k: int = 10,
        *,
        filter: Mapping[str, Any] | None = None,
        output_fields: Sequence[str] | None = None,
        fusion: FusionLike | None = None,
        candidates: int | None = None,
    ) -> SearchResult:
        return await self._send(calls.search(name, query, mode, top_k, filter, output_fields, fusion, candidates))

    async def reindex(self, name: str, version: int | None = None) -> Collection:
        if version is None:
            version = calls.default_version(await self.collection(name), await self.models())
        return await self._send(calls.reindex(name, version))

    async def wait_reindexed(
        self,
        name: str,
        *,
        version: int | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        progress: Callable[[Collection], None] | None = None,
    ) -> Collection:
        deadline = Deadline(timeout_s, f"re-index of collection {name}")
        while True:
            state = await self.collection(name)
            if progress is not None:
                progress(state)
            if (done := calls.reindex_outcome(state, version)) is not None:
                return done
            deadline.check()
            await asyncio.sleep(poll_s)
