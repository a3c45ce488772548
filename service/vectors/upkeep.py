"""A replica's background work on collections. At start, bring every collection back: load and warm it, bind a
record written before physical collections named their content, resume its re-index and the drops of its previous
versions. With several replicas (Redis), every second: drive the re-indexes nobody drives (their replica stopped),
drop previous versions due to go (whichever replica comes first), and signal catalog changes Redis missed."""

import asyncio
import logging
from pathlib import Path

from pymilvus.exceptions import MilvusException

from service.errors import ApiError, ModelNotFound, NotFound, ServiceUnavailable
from service.periodic import Periodic
from service.settings import Settings
from service.vectors.catalog import Catalog, CollectionRecord, Encoder, Physical
from service.vectors.coordination import Coordination
from service.vectors.metrics import VectorMetrics
from service.vectors.milvus import Milvus
from service.vectors.reindex import RETRY_DELAYS_S, Reindexer

log = logging.getLogger(__name__)

# With several replicas: how often each looks for re-indexes nobody drives and previous versions due to go.
TEND_S = 1.0


class Upkeep:
    def __init__(
        self,
        settings: Settings,
        milvus: Milvus,
        catalog: Catalog,
        coordination: Coordination,
        reindexer: Reindexer,
        encoder: Encoder,
        metrics: VectorMetrics,
    ) -> None:
        self._milvus = milvus
        self._catalog = catalog
        self._coordination = coordination
        self._reindexer = reindexer
        self._encoder = encoder
        self._metrics = metrics
        self._startup: asyncio.Task[None] | None = None
        self._tending = Periodic("collections", TEND_S, self._tend) if settings.redis_url else None
        self._tend_failing = False

    def start(self) -> None:
        """Resume in the background (retried until Milvus answers). A Milvus Lite file that does not exist yet
        holds nothing to resume: it is created on first use."""
        if self._tending is not None:
            self._tending.start()
        if self._milvus.in_process and not Path(self._milvus.uri).exists():
            return
        self._startup = asyncio.create_task(self._start_when_reachable())

    @property
    def started(self) -> bool:
        """Whether every collection was resumed at start (or there was nothing to resume)."""
        return self._startup is None or self._startup.done()

    async def close(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        if self._tending is not None:
            await self._tending.close()

    async def _start_when_reachable(self) -> None:
        """Resume every collection once. Milvus unreachable, or one collection failing to load (a timeout
        included), is retried with backoff; it never stops the other collections from resuming."""
        resumed: set[str] = set()
        attempt = 0
        while True:
            failed = 0
            try:
                records = await self._catalog.records()
                for record in records.values():
                    if record.name in resumed:
                        continue
                    try:
                        await self._resume(record)
                        resumed.add(record.name)
                    except NotFound as error:  # gone from Milvus: nothing to retry
                        resumed.add(record.name)
                        log.error("collection not resumed", extra={"collection": record.name, "reason": error.message})
                    except (ApiError, MilvusException) as error:
                        failed += 1
                        reason = str(error)
                        log.warning("collection not resumed yet", extra={"collection": record.name, "reason": reason})
                if not failed:
                    log.info("vector store ready", extra={"collections": len(records), "uri": self._milvus.uri})
                    return
            except ServiceUnavailable as error:
                log.warning("vector store unreachable", extra={"reason": error.message})
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            attempt += 1
            log.warning("vector store start retrying", extra={"retry_s": delay, "failed_collections": failed})
            await asyncio.sleep(delay)

    async def _resume(self, record: CollectionRecord) -> None:
        record = await self._bind_content(record)
        # Milvus Lite opens collections released: loading (and warming) now keeps that off the first search.
        await self._milvus.load(record.active.name)
        await self._milvus.warm(record.active.name)
        self._metrics.set_items(
            record.name, record.model, record.active.version, await self._milvus.count(record.active.name)
        )
        await self._reindexer.resume(record)

    async def _bind_content(self, record: CollectionRecord) -> CollectionRecord:
        """A record written before physical collections named their version's content gets the content this
        gateway serves under those version numbers (trust on first use: nothing else can tell what made them)."""
        if record.active.sha256 is not None and (record.reindex is None or record.reindex.target.sha256 is not None):
            return record
        async with self._coordination.holding(record.name, exclusive=True) as held:
            record = await self._catalog.get(record.name, held)
            active = self._served_content(record, record.active)
            update: dict[str, object] = {"active": active}
            if record.reindex is not None:
                target = self._served_content(record, record.reindex.target)
                update["reindex"] = record.reindex.model_copy(update={"target": target})
            bound = record.model_copy(update=update)
            if bound != record:
                await self._catalog.save(bound)
                log.info("collection bound to its version's content", extra={"collection": record.name})
            return bound

    def _served_content(self, record: CollectionRecord, physical: Physical) -> Physical:
        if physical.sha256 is not None:
            return physical
        try:
            version = self._encoder.resolve(f"{record.model}@{physical.version}")
        except ModelNotFound:
            return physical  # not served here: another replica (or a later start) binds it
        return physical.model_copy(update={"sha256": version.manifest.sha256})

    async def _tend(self) -> None:
        """With several replicas: drive re-indexes whose driver stopped, drop previous versions due to go (any
        replica may), and signal catalog changes that Redis missed."""
        if not self._catalog.loaded:
            return
        try:
            await self._catalog.signal_pending()
            for record in (await self._catalog.records()).values():
                await self._reindexer.resume(record)
        except ServiceUnavailable as error:
            if not self._tend_failing:
                log.warning("collections not tended", extra={"reason": error.message})
            self._tend_failing = True
            return
        self._tend_failing = False
