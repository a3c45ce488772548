"""Re-index: move a collection to another version of its model without losing a write.

A new physical collection is filled by re-embedding the stored texts in batches (a query iterator in id
order; the cursor is saved in the catalog after every batch, so a restart resumes where it stopped). While
it runs, upserts and deletes go to both collections (``CollectionRecord.write_targets``). A copied batch
is written only for the items whose text and metadata are still what was read, checked under the
collection's write lock, so a concurrent upsert or delete always wins. Then the alias moves, and the old
collection is dropped after a grace period: searches that chose it before the move finish on it.
"""

import asyncio
import contextlib
import contextvars
import logging
import time
from typing import Any

from opentelemetry.trace import Tracer

from service.errors import ApiError, DeadlineExceeded, Overloaded, ServiceUnavailable
from service.settings import Settings
from service.telemetry.tracing import version_attributes
from service.vectors.catalog import (
    Catalog,
    CollectionRecord,
    Encoder,
    Physical,
    Reindex,
    Retired,
    embed,
    served_version,
)
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus

log = logging.getLogger(__name__)

# Failures other than Milvus or the embedding backend being unavailable or busy, after which it gives up.
MAX_FAILURES = 3
RETRY_DELAYS_S = (1, 2, 5, 10, 30)


class Reindexer:
    """Runs re-indexes and the drops of previous versions, as background tasks of the store."""

    def __init__(
        self,
        settings: Settings,
        milvus: Milvus,
        catalog: Catalog,
        encoder: Encoder,
        metrics: VectorMetrics,
        tracer: Tracer,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._milvus = milvus
        self._catalog = catalog
        self._encoder = encoder
        self._metrics = metrics
        self._running: dict[str, asyncio.Task[None]] = {}
        self._droppers: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        tasks = [*self._running.values(), *self._droppers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def begin(self, record: CollectionRecord, target: Physical) -> CollectionRecord:
        """Start re-indexing ``record`` into ``target`` (hold the collection's write lock, create ``target``
        first): from here on, writes go to both."""
        total = await self._milvus.count(record.active.name)
        retired = [r for r in record.retired if r.name != target.name]
        reindex = Reindex(target=target, total=total, started_at=time.time())
        record = record.model_copy(update={"reindex": reindex, "retired": retired})
        await self._catalog.save(record)
        self._metrics.set_progress(record.name, record.model, target.version, 0.0)
        self._start(record.name)
        log.info("re-index started", extra={"collection": record.name, "target": target.name, "items": total})
        return record

    async def resume(self, record: CollectionRecord) -> None:
        """Go on with what a previous process left: a re-index, drops of previous versions."""
        reindex = record.reindex
        if reindex is not None and reindex.state == "running":
            if await self._milvus.alias_target(record.name) == reindex.target.name:
                # It stopped between moving the alias and saving the catalog: finish the bookkeeping.
                async with self._milvus.write_lock(record.name):
                    await self._finish(record)
            else:
                await self._milvus.load(reindex.target.name)
                self._start(record.name)
                log.info("re-index resumed", extra={"collection": record.name, "cursor": reindex.cursor})
        for retired in record.retired:
            self._drop_later(record.name, retired)

    async def cancel(self, name: str) -> None:
        task = self._running.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start(self, name: str) -> None:
        # A job of its own, not part of the request that started it: its batches are traces of their own.
        self._running[name] = asyncio.create_task(self._run(name), context=contextvars.Context())

    async def _run(self, name: str) -> None:
        failures = 0
        attempt = 0
        while True:
            try:
                await self._copy(name)
                await self._switch(name)
                return
            except (ServiceUnavailable, Overloaded, DeadlineExceeded) as error:
                reason = error.message
            except Exception as error:  # a background task's boundary: counted, logged, retried a few times
                failures += 1
                reason = error.message if isinstance(error, ApiError) else type(error).__name__
                log.exception("re-index batch failed", extra={"collection": name, "failures": failures})
                if failures >= MAX_FAILURES:
                    await self._fail(name, reason)
                    return
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            attempt += 1
            log.warning("re-index paused", extra={"collection": name, "reason": reason, "retry_s": delay})
            await asyncio.sleep(delay)

    async def _copy(self, name: str) -> None:
        """Re-embed every item of the active collection into the target, from the saved cursor on."""
        record = await self._catalog.get(name)
        assert record.reindex is not None
        source, target = record.active, record.reindex.target
        version = served_version(self._encoder, record, target.version)
        batches = self._milvus.iterate(source.name, self._settings.reindex_batch_size, after=record.reindex.cursor)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                attributes = {**version_attributes(version), "collection": name, "items": len(batch)}
                with self._tracer.start_as_current_span("reindex.batch", attributes=attributes):
                    vectors = await embed(self._encoder, [row["text"] for row in batch], version, "reindex")
                    async with self._milvus.write_lock(name):
                        # Only rows nobody changed since they were read: a concurrent upsert or delete has already
                        # written the newer state to the target, and must not be overwritten by this older one.
                        ids = [row["id"] for row in batch]
                        current = {row["id"]: row for row in await self._milvus.get(source.name, ids)}
                        unchanged = [
                            {**row, "vector": vector}
                            for row, vector in zip(batch, vectors, strict=True)
                            if _same_item(current.get(row["id"]), row)
                        ]
                        if unchanged:
                            await self._milvus.upsert(name, target.name, unchanged)
                        record = await self._catalog.get(name)
                        assert record.reindex is not None
                        reindex = record.reindex.model_copy(
                            update={"copied": record.reindex.copied + len(batch), "cursor": batch[-1]["id"]}
                        )
                        await self._catalog.save(record.model_copy(update={"reindex": reindex}))
                    self._metrics.set_progress(name, record.model, target.version, reindex.progress)

    async def _switch(self, name: str) -> None:
        async with self._milvus.write_lock(name):
            record = await self._catalog.get(name)
            assert record.reindex is not None
            await self._reconcile(record)
            await self._milvus.point_alias(name, record.reindex.target.name)
            await self._finish(record)

    async def _reconcile(self, record: CollectionRecord) -> None:
        """Make the target hold exactly the source's ids (under the write lock). Copying under the lock keeps
        them equal already; they differ only when a process stopped between the two writes of an upsert."""
        assert record.reindex is not None
        source, target = record.active, record.reindex.target
        if await self._milvus.count(source.name) == await self._milvus.count(target.name):
            return
        source_ids = await self._milvus.all_ids(source.name)
        target_ids = await self._milvus.all_ids(target.name)
        extra = sorted(target_ids - source_ids)
        missing = sorted(source_ids - target_ids)
        log.warning(
            "re-index reconciling", extra={"collection": record.name, "missing": len(missing), "extra": len(extra)}
        )
        if extra:
            await self._milvus.delete(record.name, target.name, extra)
        version = served_version(self._encoder, record, target.version)
        size = self._settings.reindex_batch_size
        for start in range(0, len(missing), size):
            rows = await self._milvus.get(source.name, missing[start : start + size])
            vectors = await embed(self._encoder, [row["text"] for row in rows], version, "reindex")
            batch = [{**row, "vector": vector} for row, vector in zip(rows, vectors, strict=True)]
            await self._milvus.upsert(record.name, target.name, batch)

    async def _finish(self, record: CollectionRecord) -> None:
        assert record.reindex is not None
        retired = Retired(name=record.active.name, drop_after=time.time() + self._settings.reindex_grace_s)
        target = record.reindex.target
        switched = record.model_copy(update={"active": target, "reindex": None, "retired": [*record.retired, retired]})
        await self._catalog.save(switched)
        self._metrics.set_progress(record.name, record.model, target.version, 1.0)
        self._metrics.set_items(record.name, record.model, target.version, await self._milvus.count(target.name))
        self._metrics.forget(record.name, record.active.version)
        self._drop_later(record.name, retired)
        log.info("re-index done: alias moved", extra={"collection": record.name, "active": target.name})

    async def _fail(self, name: str, reason: str) -> None:
        async with self._milvus.write_lock(name):
            record = await self._catalog.get(name)
            if record.reindex is None:
                return
            await self._milvus.drop_physical(record.reindex.target.name)
            failed = record.reindex.model_copy(update={"state": "failed", "error": reason})
            await self._catalog.save(record.model_copy(update={"reindex": failed}))
        log.error("re-index abandoned", extra={"collection": name, "reason": reason})

    def _drop_later(self, name: str, retired: Retired) -> None:
        async def drop() -> None:
            await asyncio.sleep(max(0.0, retired.drop_after - time.time()))
            try:
                async with self._milvus.write_lock(name):
                    record = await self._catalog.find(name)
                    # The collection may have been dropped, re-created or re-indexed back onto that name since.
                    if record is None or retired not in record.retired:
                        return
                    await self._milvus.drop_physical(retired.name)
                    kept = [r for r in record.retired if r != retired]
                    await self._catalog.save(record.model_copy(update={"retired": kept}))
            except ApiError as error:
                log.warning(
                    "dropping a previous version failed; retried at the next start",
                    extra={"collection": name, "physical": retired.name, "reason": error.message},
                )
                return
            log.info("previous version dropped", extra={"collection": name, "physical": retired.name})

        task = asyncio.create_task(drop())
        self._droppers.add(task)
        task.add_done_callback(self._droppers.discard)


def _same_item(current: dict[str, Any] | None, read: dict[str, Any]) -> bool:
    return current is not None and current["text"] == read["text"] and current.get("metadata") == read.get("metadata")
