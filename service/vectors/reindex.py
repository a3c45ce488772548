"""Re-index: move a collection to another version of its model without losing a write.

A new physical collection is filled by re-embedding the stored texts in batches (a query iterator in id
order; the cursor is saved in the catalog after every batch, so a restart resumes where it stopped). While
it runs, upserts and deletes go to both collections (``CollectionRecord.write_targets``), each holding the
collection exclusively (``Coordination``), as each copied batch does: a batch is written only for the items whose
text and metadata are still what was read, checked while holding, so a concurrent upsert or delete always wins.
Then the alias moves, and the old collection is dropped after a grace period: searches that chose it before the
move finish on it.

With several replicas, the one holding the re-index's lease drives it (the one that started it, as a rule); the
others take the lease over when it lapses (that replica stopped) and go on from the saved cursor. Every batch
and the cut-over check, while holding, that this replica still drives this very re-index.
"""

import asyncio
import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Tracer

from service.errors import ApiError, DeadlineExceeded, Overloaded, ServiceUnavailable
from service.settings import Settings
from service.telemetry.tracing import version_attributes
from service.vectors.catalog import (
    Catalog,
    CollectionRecord,
    ContentChanged,
    Encoder,
    Physical,
    Reindex,
    Retired,
    embed,
    served_version,
)
from service.vectors.coordination import Coordination
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus

log = logging.getLogger(__name__)

# Failures other than Milvus or the embedding backend being unavailable or busy, after which it gives up.
MAX_FAILURES = 3
RETRY_DELAYS_S = (1, 2, 5, 10, 30)


@dataclass(frozen=True)
class _Job:
    """One re-index of a collection: a collection dropped and created again, or re-indexed again, is another."""

    target: str
    started_at: float


def _job(record: CollectionRecord | None) -> _Job | None:
    if record is None or record.reindex is None or record.reindex.state != "running":
        return None
    return _Job(record.reindex.target.name, record.reindex.started_at)


class _Superseded(Exception):
    """This replica no longer drives this re-index: it finished, failed or was dropped, or another replica took
    its lease."""


class _CursorMoved(Exception):
    """The saved cursor is not where this copy left it (a previous driver's last batch landed meanwhile)."""


class Reindexer:
    """Runs re-indexes and the drops of previous versions, as background tasks of the store."""

    def __init__(
        self,
        settings: Settings,
        milvus: Milvus,
        catalog: Catalog,
        coordination: Coordination,
        encoder: Encoder,
        metrics: VectorMetrics,
        tracer: Tracer,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._milvus = milvus
        self._catalog = catalog
        self._coordination = coordination
        self._encoder = encoder
        self._metrics = metrics
        self._running: dict[str, asyncio.Task[None]] = {}
        self._droppers: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def close(self) -> None:
        """Stop; the leases this replica held are given back, so another replica goes on at once."""
        tasks = [*self._running.values(), *self._droppers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def begin(self, record: CollectionRecord, target: Physical) -> CollectionRecord:
        """Start re-indexing ``record`` into ``target`` (hold the collection exclusively, create ``target``
        first): from here on, writes go to both."""
        total = await self._milvus.count(record.active.name)
        retired = [r for r in record.retired if r.name != target.name]
        reindex = Reindex(target=target, total=total, started_at=time.time())
        record = record.model_copy(update={"reindex": reindex, "retired": retired})
        await self._catalog.save(record)
        self._metrics.set_progress(record.name, record.model, target.version, 0.0)
        log.info("re-index started", extra={"collection": record.name, "target": target.name, "items": total})
        try:
            await self.drive(record.name)
        except ServiceUnavailable as error:  # saved as running: a replica's next look for undriven ones takes it
            log.warning("re-index not driven yet", extra={"collection": record.name, "reason": error.message})
        return record

    async def resume(self, record: CollectionRecord) -> None:
        """Go on with what this or another replica left: a re-index nobody drives, drops of previous versions."""
        if record.reindexing:
            await self.drive(record.name)
        for retired in record.retired:
            self._drop_later(record.name, retired)

    async def drive(self, name: str) -> None:
        """Run ``name``'s re-index here, unless it runs here already or another replica holds its lease."""
        task = self._running.get(name)
        if task is not None and not task.done():
            return
        if not await self._coordination.lead_reindex(name):
            return
        # A job of its own, not part of the request that started it: its batches are traces of their own.
        self._running[name] = asyncio.create_task(self._run(name), context=contextvars.Context())

    async def cancel(self, name: str) -> None:
        task = self._running.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, name: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        renewal = asyncio.create_task(self._keep_lease(name, task))
        try:
            job = _job(await self._catalog.find(name))
            if job is not None:
                log.info("re-index driven by this replica", extra={"collection": name, "target": job.target})
                await self._attempts(name, job)
        except _Superseded as reason:
            log.info("re-index left to another replica, or over", extra={"collection": name, "reason": str(reason)})
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await self._coordination.release_reindex(name)

    async def _keep_lease(self, name: str, task: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(self._settings.vector_lease_s / 3)
            try:
                if not await self._coordination.lead_reindex(name):
                    log.warning("re-index lease lost: another replica drives it now", extra={"collection": name})
                    task.cancel()
                    return
            except ServiceUnavailable:
                continue  # every batch checks the lease again before it is written

    async def _attempts(self, name: str, job: _Job) -> None:
        failures = 0
        attempt = 0
        while True:
            try:
                await self._copy(name, job)
                await self._switch(name, job)
                return
            except _CursorMoved:
                continue
            except ContentChanged as error:  # the target's version is other content now: it cannot be finished
                await self._fail(name, job, error.message)
                return
            except (ServiceUnavailable, Overloaded, DeadlineExceeded) as error:
                reason = error.message
            except _Superseded:
                raise
            except Exception as error:  # a background task's boundary: counted, logged, retried a few times
                if _job(await self._catalog.find(name)) != job:
                    raise _Superseded("the collection changed") from None
                failures += 1
                reason = error.message if isinstance(error, ApiError) else type(error).__name__
                log.exception("re-index batch failed", extra={"collection": name, "failures": failures})
                if failures >= MAX_FAILURES:
                    await self._fail(name, job, reason)
                    return
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            attempt += 1
            log.warning("re-index paused", extra={"collection": name, "reason": reason, "retry_s": delay})
            await asyncio.sleep(delay)

    async def _held(self, name: str, job: _Job, version: int) -> CollectionRecord:
        """The record as of the hold's ``version``, when this replica still drives ``job``."""
        record = await self._catalog.held(name, version)
        if _job(record) != job:
            raise _Superseded("the collection changed")
        if not await self._coordination.lead_reindex(name):
            raise _Superseded("another replica holds the lease")
        assert record is not None and record.reindex is not None
        return record

    async def _copy(self, name: str, job: _Job) -> None:
        """Re-embed every item of the active collection into the target, from the saved cursor on."""
        record = await self._catalog.find(name)
        if _job(record) != job:
            raise _Superseded("the collection changed")
        assert record is not None and record.reindex is not None
        source, target = record.active, record.reindex.target
        if await self._milvus.alias_target(name) == target.name:
            return  # a driver stopped between moving the alias and saving the catalog: only the bookkeeping is left
        await self._milvus.load(target.name)
        version = served_version(self._encoder, record, target)
        cursor = record.reindex.cursor
        batches = self._milvus.iterate(source.name, self._settings.reindex_batch_size, after=cursor)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                attributes = {**version_attributes(version), "collection": name, "items": len(batch)}
                with self._tracer.start_as_current_span("reindex.batch", attributes=attributes):
                    vectors = await embed(self._encoder, [row["text"] for row in batch], version, "reindex")
                    async with self._coordination.holding(name, exclusive=True) as held:
                        record = await self._held(name, job, held)
                        assert record.reindex is not None
                        if record.reindex.cursor != cursor:
                            raise _CursorMoved
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
                            await self._milvus.upsert(target.name, unchanged)
                        reindex = record.reindex.model_copy(
                            update={"copied": record.reindex.copied + len(batch), "cursor": batch[-1]["id"]}
                        )
                        await self._catalog.save(record.model_copy(update={"reindex": reindex}))
                        cursor = reindex.cursor
                    self._metrics.set_progress(name, record.model, target.version, reindex.progress)

    async def _switch(self, name: str, job: _Job) -> None:
        async with self._coordination.holding(name, exclusive=True) as held:
            record = await self._held(name, job, held)
            assert record.reindex is not None
            await self._reconcile(record)
            await self._milvus.point_alias(name, record.reindex.target.name)
            await self._finish(record)

    async def _reconcile(self, record: CollectionRecord) -> None:
        """Make the target hold exactly the source's ids (holding the collection). Copying while holding keeps
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
            await self._milvus.delete(target.name, extra)
        version = served_version(self._encoder, record, target)
        size = self._settings.reindex_batch_size
        for start in range(0, len(missing), size):
            rows = await self._milvus.get(source.name, missing[start : start + size])
            vectors = await embed(self._encoder, [row["text"] for row in rows], version, "reindex")
            batch = [{**row, "vector": vector} for row, vector in zip(rows, vectors, strict=True)]
            await self._milvus.upsert(target.name, batch)

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

    async def _fail(self, name: str, job: _Job, reason: str) -> None:
        async with self._coordination.holding(name, exclusive=True) as held:
            record = await self._catalog.held(name, held)
            if record is None or record.reindex is None or _job(record) != job:
                return
            await self._milvus.drop_physical(record.reindex.target.name)
            failed = record.reindex.model_copy(update={"state": "failed", "error": reason})
            await self._catalog.save(record.model_copy(update={"reindex": failed}))
        log.error("re-index abandoned", extra={"collection": name, "reason": reason})

    def _drop_later(self, name: str, retired: Retired) -> None:
        key = (name, retired.name)
        task = self._droppers.get(key)
        if task is not None and not task.done():
            return

        async def drop() -> None:
            await asyncio.sleep(max(0.0, retired.drop_after - time.time()))
            try:
                async with self._coordination.holding(name, exclusive=True) as held:
                    record = await self._catalog.held(name, held)
                    # The collection may have been dropped, re-created or re-indexed back onto that name since (or
                    # another replica dropped it already).
                    if record is None or retired not in record.retired:
                        return
                    await self._milvus.drop_physical(retired.name)
                    kept = [r for r in record.retired if r != retired]
                    await self._catalog.save(record.model_copy(update={"retired": kept}))
            except ApiError as error:
                log.warning(
                    "dropping a previous version failed; tried again later",
                    extra={"collection": name, "physical": retired.name, "reason": error.message},
                )
                return
            log.info("previous version dropped", extra={"collection": name, "physical": retired.name})

        task = self._droppers[key] = asyncio.create_task(drop())
        task.add_done_callback(lambda done: self._droppers.pop(key) if self._droppers.get(key) is done else None)


def _same_item(current: dict[str, Any] | None, read: dict[str, Any]) -> bool:
    return current is not None and current["text"] == read["text"] and current.get("metadata") == read.get("metadata")
