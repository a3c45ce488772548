"""Each gateway operation as data — method, path, body, and how its answer is read — so the synchronous and the
asynchronous client (``client.gateway``) send the same requests and read the same answers; only the transport
differs. Also the one error both raise, and the pieces of their loops (chunks of items, re-index outcomes)."""

import email.utils
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from client.protocol import (
    Collection,
    Item,
    Model,
    Release,
    ReleaseClaim,
    ReleaseLedger,
    ReleaseSignals,
    ReloadReport,
    Rollout,
    SearchMode,
    SearchResult,
)
from service.vectors.fusion import RrfFusion, WeightedFusion

T = TypeVar("T")

# The upsert route takes at most this many items a request (service/vectors/protocol.py, MAX_ITEMS_PER_REQUEST).
MAX_ITEMS_PER_REQUEST = 1000
DEFAULT_STEPS = (5, 10, 25, 50, 100)
# A 429 (overloaded) means the gateway did nothing with the request, so it is sent again, after Retry-After.
MAX_RETRY_WAIT_S = 30.0

ItemLike = Item | Mapping[str, Any]
FusionLike = RrfFusion | WeightedFusion | Mapping[str, Any]
JsonBody = dict[str, Any]


class GatewayError(Exception):
    """The gateway answered with an error, or could not be reached (``status`` None); ``message`` is the gateway's
    own, which says what to change."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        request: str | None = None,
    ) -> None:
        super().__init__(f"{request}: {status} {message}" if request and status is not None else message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.request = request


class ReindexFailed(GatewayError):
    """The re-index that ``wait_reindexed`` watched failed; ``collection`` says where it stopped and why."""

    def __init__(self, collection: Collection) -> None:
        reindex = collection.reindex
        why = reindex.error if reindex is not None and reindex.error else "no reason given"
        target = f" to version {reindex.version}" if reindex is not None else ""
        super().__init__(
            f"re-index of collection '{collection.name}'{target} failed: {why}. It still serves version "
            f"{collection.version}; fix the cause and start it again."
        )
        self.collection = collection


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request: ``read`` turns the answer's status and JSON into the result; statuses in ``accept`` (besides
    2xx) are read too instead of raising."""

    method: str
    path: str
    read: Callable[[int, Any], T]
    body: JsonBody | None = None
    accept: frozenset[int] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def segment(value: str) -> str:
    """``value`` as one path segment (a collection or model name that holds '/' or '?' stays one segment)."""
    return quote(value, safe="")


def _as(model: type[BaseModel]) -> Callable[[int, Any], Any]:
    return lambda status, answer: model.model_validate(answer)


def _list_of(model: type[BaseModel]) -> Callable[[int, Any], Any]:
    return lambda status, answer: [model.model_validate(entry) for entry in answer["data"]]


def _nothing(status: int, answer: Any) -> None:
    return None


# ── models ──────────────────────────────────────────────────────────────────


def models() -> Call[list[Model]]:
    return Call("GET", "/v1/models", _list_of(Model))


def reload_models() -> Call[ReloadReport]:
    return Call("POST", "/v1/admin/models/reload", _as(ReloadReport))


# ── rollouts ────────────────────────────────────────────────────────────────


def rollouts() -> Call[list[Rollout]]:
    return Call("GET", "/v1/rollouts", _list_of(Rollout))


def rollout(model: str) -> Call[Rollout | None]:
    def read(status: int, answer: Any) -> Rollout | None:
        return None if status == 404 else Rollout.model_validate(answer)

    return Call("GET", f"/v1/rollouts/{segment(model)}", read, accept=frozenset({404}))


def _action_body(reason: str | None, revision: int | None) -> JsonBody:
    body: JsonBody = {}
    if reason is not None:
        body["reason"] = reason
    if revision is not None:
        body["revision"] = revision
    return body


def start_rollout(
    model: str,
    canary_version: int,
    steps: Sequence[int],
    analysis: bool | Mapping[str, Any],
    shadow_percent: float,
    reason: str | None,
    revision: int | None,
) -> Call[Rollout]:
    body = {
        "canary_version": canary_version,
        "steps": list(steps),
        "shadow_percent": shadow_percent,
        "analysis": {"enabled": analysis} if isinstance(analysis, bool) else dict(analysis),
        **_action_body(reason, revision),
    }
    return Call("PUT", f"/v1/rollouts/{segment(model)}", _as(Rollout), body)


def rollout_action(model: str, action: str, reason: str | None, revision: int | None) -> Call[Rollout]:
    """promote, rollback, pause or resume."""
    return Call("POST", f"/v1/rollouts/{segment(model)}/{action}", _as(Rollout), _action_body(reason, revision))


def set_weight(model: str, weight: int, reason: str | None, revision: int | None) -> Call[Rollout]:
    body = {"weight": weight, **_action_body(reason, revision)}
    return Call("POST", f"/v1/rollouts/{segment(model)}/weight", _as(Rollout), body)


# ── releases ────────────────────────────────────────────────────────────────


def claim_release(model: str, trigger: str, release_id: str) -> Call[ReleaseClaim]:
    body = {"model": model, "trigger": trigger, "release_id": release_id}
    return Call("POST", "/v1/admin/releases", _as(ReleaseClaim), body)


def report_release(release_id: str, fields: Mapping[str, Any]) -> Call[Release]:
    body = {key: value for key, value in fields.items() if value is not None}
    return Call("PATCH", f"/v1/admin/releases/{segment(release_id)}", _as(Release), body)


def releases() -> Call[ReleaseLedger]:
    return Call("GET", "/v1/admin/releases", _as(ReleaseLedger))


def release_signals(model: str) -> Call[ReleaseSignals]:
    return Call("GET", f"/v1/admin/releases/signals/{segment(model)}", _as(ReleaseSignals))


# ── collections ─────────────────────────────────────────────────────────────


def collections() -> Call[list[Collection]]:
    return Call("GET", "/v1/collections", _list_of(Collection))


def collection(name: str) -> Call[Collection]:
    return Call("GET", f"/v1/collections/{segment(name)}", _as(Collection))


def create_collection(
    name: str, model: str, fields: Mapping[str, str] | None, hybrid: Mapping[str, Any] | None
) -> Call[Collection]:
    body: JsonBody = {"model": model, "fields": dict(fields or {})}
    if hybrid is not None:
        body["hybrid"] = dict(hybrid)
    return Call("PUT", f"/v1/collections/{segment(name)}", _as(Collection), body)


def delete_collection(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/collections/{segment(name)}", _nothing)


def upsert(name: str, items: list[JsonBody]) -> Call[int]:
    return Call(
        "POST",
        f"/v1/collections/{segment(name)}/items",
        lambda status, answer: int(answer["upserted"]),
        {"items": items},
    )


def get_item(name: str, item_id: str) -> Call[Item]:
    return Call("GET", f"/v1/collections/{segment(name)}/items/{segment(item_id)}", _as(Item))


def delete_item(name: str, item_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/collections/{segment(name)}/items/{segment(item_id)}", _nothing)


def search(
    name: str,
    query: str,
    mode: SearchMode,
    top_k: int,
    filter: Mapping[str, Any] | None,
    output_fields: Sequence[str] | None,
    fusion: FusionLike | None,
    candidates: int | None,
) -> Call[SearchResult]:
    body: JsonBody = {"query": query, "mode": mode, "top_k": top_k}
    if filter is not None:
        body["filter"] = dict(filter)
    if output_fields is not None:
        body["output_fields"] = list(output_fields)
    if fusion is not None:
        body["fusion"] = fusion.model_dump() if isinstance(fusion, BaseModel) else dict(fusion)
    if candidates is not None:
        body["candidates"] = candidates
    return Call("POST", f"/v1/collections/{segment(name)}/search", _as(SearchResult), body)


def reindex(name: str, version: int) -> Call[Collection]:
    return Call("POST", f"/v1/collections/{segment(name)}/reindex", _as(Collection), {"version": version})


# ── the pieces of the clients' loops ────────────────────────────────────────


def chunks(items: Iterable[ItemLike], size: int) -> Iterator[list[JsonBody]]:
    """``items`` as request bodies' item lists of at most ``size`` (1..1000), read lazily."""
    if not 1 <= size <= MAX_ITEMS_PER_REQUEST:
        raise ValueError(f"batch size {size} must be between 1 and {MAX_ITEMS_PER_REQUEST}, the upsert route's limit.")
    chunk: list[JsonBody] = []
    for item in items:
        chunk.append(item.model_dump() if isinstance(item, Item) else dict(item))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def default_version(collection: Collection, models: list[Model]) -> int:
    """The version a request naming only the collection's model gets: where ``reindex`` moves it by default."""
    model = next((m for m in models if m.id == collection.model), None)
    version = model.default_version if model is not None else None
    if version is None:
        raise GatewayError(
            f"model '{collection.model}' of collection '{collection.name}' has no version the gateway serves; "
            "name the version to re-index to."
        )
    return version


def reindex_outcome(collection: Collection, version: int | None) -> Collection | None:
    """The collection once its re-index has ended (None while it runs); raises ``ReindexFailed`` when it failed,
    and ``GatewayError`` when it ended on another version than ``version``."""
    if collection.state == "reindexing":
        return None
    if collection.state == "reindex_failed":
        raise ReindexFailed(collection)
    if version is not None and collection.version != version:
        raise GatewayError(
            f"collection '{collection.name}' is on version {collection.version}, not {version}, and no re-index runs; "
            f"start one with reindex('{collection.name}', {version})."
        )
    return collection


class Deadline:
    """``timeout_s`` from now (None: never); ``check`` raises TimeoutError, naming ``what``, once it has passed."""

    def __init__(self, timeout_s: float | None, what: str) -> None:
        self._end = None if timeout_s is None else time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._what = what

    def check(self) -> None:
        if self._end is not None and time.monotonic() > self._end:
            raise TimeoutError(f"{self._what}: still not done after {self._timeout_s:g} s")


def retry_after_s(response: httpx.Response) -> float:
    """Seconds a 429 asks to wait (Retry-After in seconds or as a date), at most ``MAX_RETRY_WAIT_S``."""
    value = response.headers.get("retry-after", "1")
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_WAIT_S)


def read_answer(call: Call[T], response: httpx.Response) -> T:
    """The result of ``call`` from ``response``, or the gateway's error as a ``GatewayError``."""
    if response.is_success or response.status_code in call.accept:
        try:
            answer = response.json() if response.content else None
        except ValueError:
            raise GatewayError(
                f"the answer is not JSON: {response.text[:200]!r}", status=response.status_code, request=call.name
            ) from None
        return call.read(response.status_code, answer)
    message, code, param = response.text[:200] or response.reason_phrase, None, None
    try:
        error = response.json()["error"]
        message, code, param = error["message"], error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError):
        pass
    raise GatewayError(message, status=response.status_code, code=code, param=param, request=call.name)


def unreachable(call: Call[Any], url: str, timeout_s: float, error: httpx.TransportError) -> GatewayError:
    """The error of a request that got no answer: the gateway could not be reached, or did not answer in time."""
    if isinstance(error, httpx.TimeoutException):
        return GatewayError(
            f"{call.name}: no answer from the gateway at {url} within {timeout_s:g} s; raise the timeout "
            "(timeout_s, --timeout-s) or check the gateway's load."
        )
    return GatewayError(f"cannot reach the gateway at {url}: {error or type(error).__name__}")
