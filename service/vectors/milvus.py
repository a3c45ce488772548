"""The Milvus plumbing under ``VectorStore``: one pymilvus client, blocking calls run in a small thread
pool, Milvus errors mapped to ``service.errors``, the physical collections' schema and indexes, and Milvus
Lite's write rules.

Milvus Lite runs inside this process (a ``.db`` path), or as a server that several gateways share
(``python -m service.vectors.lite_server``, found out from its server info at connection). Two of its rules shape
this module:
- writes to one collection must not run concurrently, so this process runs its writes (and flushes) to one
  collection one at a time (``_serialised``); several processes sharing a Lite server rely on the server to
  serialise theirs, which ``service.vectors.lite_server`` does and ``python -m milvus_lite server`` does not (a
  gateway connected to that one logs an error: one gateway is safe on it, several are not);
- rows not yet flushed sit in a memtable that every search scans row by row (about 70 µs per row at
  384 dimensions), while flushed segments are searched through their HNSW index, which Lite builds in a
  background thread right after the flush, while its BM25 index waits for the first keyword search. So Lite
  collections are flushed once ``LITE_FLUSH_ROWS`` rows are pending, and after ``IDLE_S`` without writes,
  followed by one keyword search: a search right after a bulk load is not slow.
A Milvus server needs neither: its growing segments are indexed, and Strong consistency makes every
acknowledged write visible.
"""

import asyncio
import contextlib
import functools
import logging
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from pymilvus import DataType, Function, FunctionType, MilvusClient
from pymilvus.exceptions import MilvusException

from service.errors import ApiError, Conflict, NotFound, ServiceUnavailable
from service.settings import Settings
from service.vectors.filters import quote
from service.vectors.keywords import KeywordAnalyzer, analyzer_params, bm25_index_params

log = logging.getLogger(__name__)

T = TypeVar("T")

CATALOG = "_embedserve_catalog"
# Milvus Lite's server info: its build tag, and the deploy mode service.vectors.lite_server reports.
LITE_BUILD_TAG = "milvus_lite"
SERIALISED_LITE = "embedded, writes serialised (embedserve)"
CALL_TIMEOUT_S = 30.0
LITE_FLUSH_ROWS = 2048
IDLE_S = 0.5
MAX_ID_BYTES = 1024
_CONNECT_FAILED = 2  # pymilvus: "Fail connecting to server"
_COLLECTION_NOT_FOUND = 100
_COLLECTION_NOT_LOADED = 101
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class MissingCollection(NotFound):
    """A collection the catalog knows is gone from Milvus (dropped outside the gateway)."""


class Milvus:
    """Async access to one Milvus (a server, or Milvus Lite in this process or as a server)."""

    def __init__(self, settings: Settings) -> None:
        self.uri = settings.milvus_uri
        self.in_process = not re.match(r"^(https?|tcp|unix):", self.uri)
        # Whether Milvus Lite's rules apply: known for a local file, found out at connection for a server.
        self.lite = self.in_process
        self._settings = settings
        self._client: MilvusClient | None = None
        self._connecting = threading.Lock()
        # Lite serves calls from its own threads; a few of ours are enough to keep them busy.
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="milvus")
        self._locks: dict[str, asyncio.Lock] = {}
        self._unflushed: dict[str, int] = {}
        self._last_write: dict[str, float] = {}
        self._idle: dict[str, asyncio.Task[None]] = {}

    @contextlib.asynccontextmanager
    async def _serialised(self, name: str) -> AsyncIterator[None]:
        """Milvus Lite: this process's writes and flushes of collection ``name`` one at a time."""
        if self._client is None:  # whether a server is Milvus Lite is known once connected
            await self._in_thread(self._connect)
        if not self.lite:
            yield
            return
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        async with lock:
            yield

    async def close(self) -> None:
        for task in self._idle.values():
            task.cancel()
        await asyncio.gather(*self._idle.values(), return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await asyncio.get_running_loop().run_in_executor(self._threads, client.close)
            if self.in_process:
                await asyncio.get_running_loop().run_in_executor(self._threads, _release_lite, self.uri)
        self._threads.shutdown(wait=False)

    # ── calls ───────────────────────────────────────────────────────────────

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``MilvusClient.<method>(*args, **kwargs)`` in a thread, errors mapped."""
        kwargs.setdefault("timeout", CALL_TIMEOUT_S)

        def call() -> Any:
            return getattr(self._connect(), method)(*args, **kwargs)

        return await self._in_thread(call, args[0] if args and isinstance(args[0], str) else None)

    async def _in_thread(self, call: Callable[[], T], collection: str | None = None) -> T:
        """``call()`` in a thread, Milvus errors mapped. Never abandons a running call: when cancelled it waits
        for the call to end first, so the caller's write lock stays held meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, functools.partial(self._mapping_errors, call, collection))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:
                    continue
            raise

    def _mapping_errors(self, call: Callable[[], T], collection: str | None) -> T:
        try:
            return call()
        except MilvusException as error:
            mapped = self._mapped(error, collection)
            if mapped is None:
                raise
            raise mapped from error
        except grpc.RpcError as error:
            if error.code() in _UNREACHABLE:
                raise self._unreachable() from error
            raise

    def _connect(self) -> MilvusClient:
        with self._connecting:  # the calls of several threads share one client
            if self._client is None:
                if self.in_process:
                    Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
                try:
                    client = MilvusClient(uri=self.uri, token=self._settings.milvus_token, timeout=CALL_TIMEOUT_S)
                except MilvusException as error:
                    log.warning("cannot connect to Milvus", extra={"uri": self.uri, "reason": str(error.message)})
                    raise self._unreachable() from error
                if not self.in_process:
                    try:
                        info = client.get_server_version(detail=True, timeout=CALL_TIMEOUT_S)
                    except MilvusException:
                        info = {}  # a server that does not say what it is: not Milvus Lite, whose servers do
                    self._learn_server(info)
                self._client = client
            return self._client

    def _learn_server(self, info: dict[str, Any]) -> None:
        """Apply Milvus Lite's rules to a Milvus Lite server; say when several gateways must not share it."""
        self.lite = info.get("version") == LITE_BUILD_TAG
        if self.lite and info.get("deploy_mode") != SERIALISED_LITE:
            log.error(
                "Milvus Lite server does not serialise writes: safe for one gateway only; for several, run "
                "python -m service.vectors.lite_server (make milvus) instead of python -m milvus_lite server",
                extra={"uri": self.uri},
            )
        log.info("connected to Milvus", extra={"uri": self.uri, "milvus_lite": self.lite})

    def _mapped(self, error: MilvusException, collection: str | None) -> ApiError | None:
        if error.code == _CONNECT_FAILED or error.code in _UNREACHABLE:
            return self._unreachable()
        if error.code == _COLLECTION_NOT_FOUND:
            name = collection or "a collection"
            return MissingCollection(
                f"the Milvus collection {name} is missing (was it dropped outside the gateway?); delete the "
                "collection and create it again."
            )
        return None

    def _unreachable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the vector store (Milvus at {self.uri}) is unreachable; collection routes answer 503 until it is back."
        )

    # ── collections ─────────────────────────────────────────────────────────

    async def create_physical(
        self,
        name: str,
        dimension: int,
        index_type: str,
        index_params: dict[str, int | float | str],
        keyword_analyzer: KeywordAnalyzer,
    ) -> None:
        """A collection of items with ``dimension``-dimensional vectors and text analysed by ``keyword_analyzer``,
        indexed and loaded (so searching it never waits for an index build)."""
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        analyzer = analyzer_params(keyword_analyzer)
        analysis = {} if analyzer is None else {"analyzer_params": analyzer}
        schema.add_field("text", DataType.VARCHAR, max_length=65_535, enable_analyzer=True, **analysis)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("metadata", DataType.JSON)
        schema.add_function(
            Function(
                name="bm25", function_type=FunctionType.BM25, input_field_names=["text"], output_field_names=["sparse"]
            )
        )
        indexes = MilvusClient.prepare_index_params()
        indexes.add_index(
            "vector",
            index_type=index_type,
            metric_type="COSINE",
            params=dict(index_params),
        )
        # Nested under "params" (the JSON form Milvus has always taken): Milvus Lite reads index parameters only there.
        bm25 = bm25_index_params(keyword_analyzer)
        indexes.add_index(
            "sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25", params={"params": bm25} if bm25 else {}
        )
        await self.call(
            "create_collection",
            name,
            schema=schema,
            index_params=indexes,
            consistency_level=self._settings.vector_consistency,
        )
        await self.load(name)

    async def load(self, name: str) -> None:
        await self.call("load_collection", name)

    async def warm(self, name: str) -> None:
        """Milvus Lite builds a segment's BM25 index on the first keyword search that reaches the segment:
        make that search now, off the request path (a Milvus server indexes sparse vectors on its own)."""
        if self.lite:
            params = {"metric_type": "BM25"}
            await self.call(
                "search", name, data=["warm"], anns_field="sparse", limit=1, output_fields=[], search_params=params
            )

    async def drop_physical(self, name: str) -> None:
        async with self._serialised(name):
            if await self.call("has_collection", name):
                await self.call("drop_collection", name)
            self._unflushed.pop(name, None)

    async def point_alias(self, alias: str, physical: str) -> None:
        """Make ``alias`` name ``physical`` (atomically, when it named another collection)."""
        if await self.alias_target(alias) is None:
            if await self.call("has_collection", alias):
                raise Conflict(
                    f"Milvus already has a collection named '{alias}', not made by embedserve; choose another name."
                )
            await self.call("create_alias", physical, alias)
        else:
            await self.call("alter_alias", physical, alias)

    async def alias_target(self, alias: str) -> str | None:
        """The collection ``alias`` names; None when there is no such alias."""
        # Listing first: describing a missing alias is an error that pymilvus logs with a traceback.
        if alias not in (await self.call("list_aliases")).get("aliases", []):
            return None
        described = await self.call("describe_alias", alias)
        return str(described["collection_name"])

    async def drop_alias(self, alias: str) -> None:
        if await self.alias_target(alias) is not None:
            await self.call("drop_alias", alias)

    async def count(self, name: str) -> int:
        rows = await self.call("query", name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    # ── items ───────────────────────────────────────────────────────────────

    async def upsert(self, name: str, rows: list[dict[str, Any]]) -> None:
        async with self._serialised(name):
            await self.call("upsert", name, rows)
            await self._written(name, len(rows))

    async def delete(self, name: str, ids: list[str], key: str = "id") -> None:
        """Delete the rows of ``name`` whose primary ``key`` is one of ``ids``."""
        async with self._serialised(name):
            await self.call("delete", name, filter=_ids_expression(ids, key))
            await self._written(name, len(ids))

    async def get(
        self, name: str, ids: list[str], fields: tuple[str, ...] = ("text", "metadata")
    ) -> list[dict[str, Any]]:
        """The id and ``fields`` of the rows of ``name`` whose id is one of ``ids`` (in no particular order)."""
        return await self.query(name, _ids_expression(ids), ["id", *fields])

    async def query(
        self, name: str, expression: str, fields: list[str], limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The ``fields`` of the rows of ``name`` that match ``expression``."""
        limits = {} if limit is None else {"limit": limit}
        rows = await self._loaded(name, "query", name, filter=expression, output_fields=fields, **limits)
        return [dict(row) for row in rows]

    async def iterate(
        self, name: str, batch_size: int, after: str | None
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Every item of ``name`` in id order, from the first id after ``after``, in batches."""
        expression = f"id > {quote(after)}" if after is not None else ""
        iterator = await self.call(
            "query_iterator", name, batch_size=batch_size, filter=expression, output_fields=["id", "text", "metadata"]
        )
        try:
            while True:
                batch = await self._in_thread(iterator.next, name)
                if not batch:
                    return
                yield [dict(row) for row in batch]
        finally:
            await self._in_thread(iterator.close, name)

    async def all_ids(self, name: str) -> set[str]:
        ids: set[str] = set()
        async for batch in self.iterate(name, 4096, None):
            ids.update(row["id"] for row in batch)
        return ids

    # ── search ──────────────────────────────────────────────────────────────

    async def search(
        self,
        name: str,
        data: list[Any],
        field: str,
        limit: int,
        expression: str,
        outputs: list[str],
        params: dict[str, Any],
    ) -> list[dict[str, Any]]:
        results = await self._loaded(
            name,
            "search",
            name,
            data=data,
            anns_field=field,
            limit=limit,
            filter=expression,
            output_fields=outputs,
            search_params=params,
        )
        return [dict(hit) for hit in results[0]]

    async def _loaded(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method``; when ``name`` turns out not loaded (Milvus Lite after a restart), load it and retry."""
        try:
            return await self.call(method, *args, **kwargs)
        except MilvusException as error:
            if error.code != _COLLECTION_NOT_LOADED:
                raise
        await self.load(name)
        return await self.call(method, *args, **kwargs)

    # ── Milvus Lite flushing, item counts ───────────────────────────────────

    async def _written(self, name: str, rows: int) -> None:
        if not self.lite:
            return
        pending = self._unflushed.get(name, 0) + rows
        if pending >= LITE_FLUSH_ROWS:
            await self.call("flush", name)
            pending = 0
        self._unflushed[name] = pending

    def after_writes(self, key: str, on_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Once ``key``'s collections have seen no write for ``IDLE_S``: flush them (Milvus Lite), then ``on_idle``."""
        loop = asyncio.get_running_loop()
        self._last_write[key] = loop.time()
        task = self._idle.get(key)
        if task is None or task.done():
            self._idle[key] = asyncio.create_task(self._when_idle(key, on_idle))

    async def _when_idle(self, key: str, on_idle: Callable[[], Awaitable[None]] | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while (wait := self._last_write[key] + IDLE_S - loop.time()) > 0:
                await asyncio.sleep(wait)
            started = loop.time()
            try:
                for name in [n for n, rows in self._unflushed.items() if rows and _belongs(n, key)]:
                    async with self._serialised(name):
                        # Dropped meanwhile, here or by another replica (a previous version after a re-index).
                        if not self._unflushed.get(name) or not await self.call("has_collection", name):
                            self._unflushed.pop(name, None)
                            continue
                        await self.call("flush", name)
                        self._unflushed[name] = 0
                    if name != CATALOG:
                        await self.warm(name)
                if on_idle is not None:
                    await on_idle()
            except MissingCollection:
                pass  # dropped by another replica since: nothing to flush or count
            except (ApiError, MilvusException) as error:
                log.warning("idle maintenance failed", extra={"collection": key, "reason": str(error)})
            if self._last_write[key] <= started:
                return


def _ids_expression(ids: list[str], key: str = "id") -> str:
    """The filter matching exactly ``ids``, each escaped (pymilvus's own ``ids=`` pastes them in raw)."""
    return f"{key} in [{', '.join(quote(item_id) for item_id in ids)}]"


def _belongs(physical: str, key: str) -> bool:
    return physical == key or physical.startswith(f"{key}__")


def _release_lite(uri: str) -> None:
    """Stop this process's Milvus Lite server for ``uri``: it flushes, and frees the data folder's lock."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)
