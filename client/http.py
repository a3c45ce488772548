"""A small typed client of the gateway's collection routes, over httpx (no web framework, no torch)."""

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from service.vectors.fusion import ResolvedHybrid

SearchMode = Literal["dense", "keyword", "hybrid"]


class GatewayError(Exception):
    """The gateway answered with an error, or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class CollectionSummary:
    name: str
    model: str  # name@version
    items: int | None
    hybrid: ResolvedHybrid


class CollectionsClient:
    """``/v1/collections`` of one gateway, asynchronously; use as ``async with CollectionsClient(url) as client``."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self._http.aclose()

    async def collection(self, name: str) -> CollectionSummary:
        info = await self._call("GET", f"/v1/collections/{name}")
        return CollectionSummary(
            name=info["name"],
            model=f"{info['model']}@{info['version']}",
            items=info.get("items"),
            hybrid=ResolvedHybrid.model_validate(info["hybrid"]),
        )

    async def search(
        self, name: str, query: str, mode: SearchMode, top_k: int, **hybrid: Any
    ) -> list[tuple[str, float]]:
        """The (id, score) of the ``top_k`` best hits, best first; ``hybrid``: ``fusion`` and ``candidates``."""
        body = {"query": query, "mode": mode, "top_k": top_k, "output_fields": [], **hybrid}
        answer = await self._call("POST", f"/v1/collections/{name}/search", body)
        return [(str(hit["id"]), float(hit["score"])) for hit in answer["hits"]]

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as error:
            raise GatewayError(f"cannot reach the gateway at {self._http.base_url}: {error}") from None
        if response.is_success:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise GatewayError(f"{method} {path}: {response.status_code} {message}")
