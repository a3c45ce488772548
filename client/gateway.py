"""A small typed client of the gateway over httpx: ``Gateway`` (blocking) here, ``AsyncGateway`` (asyncio, the same
methods as coroutines) in ``client.async_gateway``; for collections, models and rollouts.

    with Gateway("http://127.0.0.1:8000", api_key="...") as gateway:
        gateway.create_collection("faq", "minilm")
        gateway.upsert("faq", [{"id": "q1", "text": "How do I reset my password?"}])
        hits = gateway.search("faq", "forgot password", top_k=3).hits

Both send the requests ``client.calls`` describes and read the answers into ``client.protocol``'s models; an error
answer raises ``GatewayError`` with the gateway's status and message. A 429 (overloaded: the gateway did nothing
with the request) is sent again after its Retry-After, up to ``retries`` times.
"""

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from client import calls
from client.calls import (
    DEFAULT_STEPS,
    MAX_ITEMS_PER_REQUEST,
    Call,
    Deadline,
    FusionLike,
    GatewayError,
    ItemLike,
    ReindexFailed,
)
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

__all__ = ["Gateway", "GatewayError", "ReindexFailed"]


class Gateway:
    """One gateway, over blocking HTTP; use as ``with Gateway(url) as gateway``. ``api_key`` is sent as a bearer
    key: the ``search`` scope reads collections, ``write`` changes them, the admin key drives rollouts and reloads.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        *,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._http = httpx.Client(
            base_url=self.url, headers=calls.auth_headers(api_key), timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(call.method, call.path, json=call.body)
            except httpx.TransportError as error:
                raise calls.unreachable(call, self.url, self.timeout_s, error) from None
            if response.status_code != 429 or attempt == self.retries:
                break
            time.sleep(calls.retry_after_s(response))
        return calls.read_answer(call, response)

    # ── models ──────────────────────────────────────────────────────────────

    def models(self) -> list[Model]:
        """Every model of the repository with its versions: served (ready), refused (with why), not loaded."""
        return self._send(calls.models())

    def reload_models(self) -> ReloadReport:
        """Scan the model repository now (admin): what this replica newly serves, stopped serving, refused."""
        return self._send(calls.reload_models())

    # ── rollouts (admin) ────────────────────────────────────────────────────

    def rollouts(self) -> list[Rollout]:
        """Every model's rollout (each served model has one once served: phase promoted, no canary)."""
        return self._send(calls.rollouts())

    def rollout(self, model: str) -> Rollout | None:
        """``model``'s rollout, None when it has none."""
        return self._send(calls.rollout(model))

    def start_rollout(
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
        """Start a canary of ``canary_version`` at ``steps[0]`` percent. ``analysis``: True lets the analysis loop
        step, promote and roll back (False: the operator does), or the full settings (interval_s, thresholds...).
        ``revision``: act only if the rollout is still at it (else a 409 GatewayError)."""
        return self._send(calls.start_rollout(model, canary_version, steps, analysis, shadow_percent, reason, revision))

    def promote(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        """Begin promoting the canary (phase promoting: the model's collections are re-indexed to it, then it is
        stable, phase promoted); ``wait_rollout`` watches it end."""
        return self._send(calls.rollout_action(model, "promote", reason, revision))

    def rollback(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        """All traffic back to the stable version (phase rolled_back)."""
        return self._send(calls.rollout_action(model, "rollback", reason, revision))

    def pause(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        """Hold the canary's weight (the analysis loop stops stepping)."""
        return self._send(calls.rollout_action(model, "pause", reason, revision))

    def resume(self, model: str, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        return self._send(calls.rollout_action(model, "resume", reason, revision))

    def set_weight(self, model: str, weight: int, reason: str | None = None, *, revision: int | None = None) -> Rollout:
        """Route ``weight`` percent of callers to the canary."""
        return self._send(calls.set_weight(model, weight, reason, revision))

    def wait_rollout(
        self,
        model: str,
        *,
        until: Iterable[Phase] = ENDED_PHASES,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        progress: Callable[[Rollout], None] | None = None,
    ) -> Rollout:
        """Poll ``model``'s rollout until its phase is one of ``until`` (default: promoted, rolled back or failed);
        ``progress`` sees every state read. Raises GatewayError when it has no rollout, TimeoutError after
        ``timeout_s``."""
        phases, deadline = frozenset(until), Deadline(timeout_s, f"rollout of {model}")
        while True:
            state = self.rollout(model)
            if state is None:
                raise GatewayError(f"{model} has no rollout to wait for.", status=404)
            if progress is not None:
                progress(state)
            if state.phase in phases:
                return state
            deadline.check()
            time.sleep(poll_s)

    # ── releases (admin) ────────────────────────────────────────────────────

    def claim_release(self, model: str, trigger: str, release_id: str) -> ReleaseClaim:
        """Take a place in the release budget under ``release_id`` (claiming it again resumes that place); a 409
        (a release of the model runs) or 429 (budget spent; never retried by the gateway) is a GatewayError."""
        return self._send(calls.claim_release(model, trigger, release_id))

    def report_release(self, release_id: str, **fields: Any) -> Release:
        """Record the release's ``stage``, ``version``, ``training_hours``, ``detail`` and, once, its ``outcome``."""
        return self._send(calls.report_release(release_id, fields))

    def releases(self) -> ReleaseLedger:
        """The budget's window, what it used, and every release the ledger holds."""
        return self._send(calls.releases())

    def release_signals(self, model: str) -> ReleaseSignals:
        """Whether a release of ``model`` is due (staleness, drift), from the replica that answers."""
        return self._send(calls.release_signals(model))

    # ── collections ─────────────────────────────────────────────────────────

    def collections(self) -> list[Collection]:
        return self._send(calls.collections())

    def collection(self, name: str) -> Collection:
        """The collection's model version, item count, hybrid defaults and re-index state."""
        return self._send(calls.collection(name))

    def create_collection(
        self,
        name: str,
        model: str,
        *,
        fields: Mapping[str, str] | None = None,
        hybrid: Mapping[str, Any] | None = None,
    ) -> Collection:
        """Create ``name`` on ``model`` (a name: its default version, or name@version); ``fields``: declared
        metadata fields and their types (string, int, float, bool, string_list); ``hybrid``: fusion and candidates
        defaults. The same request again changes nothing; other settings for an existing name: 409."""
        return self._send(calls.create_collection(name, model, fields, hybrid))

    def delete_collection(self, name: str) -> None:
        self._send(calls.delete_collection(name))

    def upsert(
        self,
        name: str,
        items: Iterable[ItemLike],
        *,
        batch_size: int = MAX_ITEMS_PER_REQUEST,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Embed and store ``items`` (``Item`` or mappings with id, text and optionally metadata; an id that exists
        is replaced), ``batch_size`` (at most 1,000) a request, one request at a time; ``progress`` gets the count
        of each batch once stored. The items stored; a failed request raises, the batches before it stay stored."""
        stored = 0
        for chunk in calls.chunks(items, batch_size):
            stored += self._send(calls.upsert(name, chunk))
            if progress is not None:
                progress(len(chunk))
        return stored

    def get_item(self, name: str, item_id: str) -> Item:
        return self._send(calls.get_item(name, item_id))

    def delete_item(self, name: str, item_id: str) -> None:
        self._send(calls.delete_item(name, item_id))

    def search(
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
        """The ``top_k`` best hits, best first: ``mode`` dense (vectors), keyword (BM25) or hybrid (both legs fused
        with ``fusion``, each ``candidates`` deep; default: the collection's). ``output_fields``: any of text,
        metadata and declared field names (default text and metadata; [] for ids and scores only)."""
        return self._send(calls.search(name, query, mode, top_k, filter, output_fields, fusion, candidates))

    def reindex(self, name: str, version: int | None = None) -> Collection:
        """Start moving ``name`` to ``version`` of its model (default: the version its model serves by default);
        ``wait_reindexed`` watches it."""
        if version is None:
            version = calls.default_version(self.collection(name), self.models())
        return self._send(calls.reindex(name, version))

    def wait_reindexed(
        self,
        name: str,
        *,
        version: int | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        progress: Callable[[Collection], None] | None = None,
    ) -> Collection:
        """Poll ``name`` until no re-index runs, and return it; ``progress`` sees every state read (``reindex``
        holds copied/total). Raises ReindexFailed when the re-index failed, GatewayError when it ended on another
        version than ``version``, TimeoutError after ``timeout_s``."""
        deadline = Deadline(timeout_s, f"re-index of collection {name}")
        while True:
            state = self.collection(name)
            if progress is not None:
                progress(state)
            if (done := calls.reindex_outcome(state, version)) is not None:
                return done
            deadline.check()
            time.sleep(poll_s)
