"""Hot-loading: the versions this gateway serves follow the model repository without a restart.

Every ``EMBEDSERVE_MODEL_RESCAN_S`` seconds, and on ``POST /v1/admin/models/reload``, the repository is
scanned again (``ModelStore.changes``). A new version folder is verified against its manifest, loaded into
the backend (timed: ``embedserve_model_load_seconds``), given its batcher, and only then served. A served
version whose folder disappears or changes stops being served first — requests that name it get 404, or
route to another version — then its queued inputs fail with a 503 and the backend releases it. Replicas
that share the repository volume converge within one rescan interval. One reload runs at a time.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from service.backends.contract import Backend
from service.embeddings.batcher import Batcher
from service.models.store import ModelStore, ModelVersion, RefusedVersion
from service.periodic import Periodic
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class ReloadFailure(BaseModel):
    version: str = Field(description="name@version")
    reason: str


class ReloadReport(BaseModel):
    """What one reload changed: versions now served, no longer served, newly refused, failed to load."""

    loaded: list[str] = Field(default_factory=list, description="name@version, now served")
    unloaded: list[str] = Field(default_factory=list, description="name@version, folder gone or changed")
    refused: list[ReloadFailure] = Field(default_factory=list, description="new folders that failed verification")
    failed: list[ReloadFailure] = Field(
        default_factory=list, description="verified, but the backend could not load them (retried next time)"
    )


class VersionLoader:
    def __init__(
        self,
        store: ModelStore,
        backend: Backend,
        batchers: dict[tuple[str, int], Batcher],
        make_batcher: Callable[[ModelVersion], Batcher],
        metrics: Metrics,
        rescan_s: float,
    ) -> None:
        self._store = store
        self._backend = backend
        self._batchers = batchers
        self._make_batcher = make_batcher
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._loop = Periodic("model-rescan", rescan_s, self._rescan) if rescan_s > 0 else None

    def start(self) -> None:
        if self._loop is not None:
            self._loop.start()

    async def close(self) -> None:
        if self._loop is not None:
            await self._loop.close()

    async def _rescan(self) -> None:
        await self.reload()

    async def reload(self) -> ReloadReport:
        """Bring the served versions in line with the repository; what changed."""
        async with self._lock:
            changes = await asyncio.to_thread(self._store.changes)
            report = ReloadReport()
            for version, refusal in changes.removed:
                await self._unload(version, refusal)
                report.unloaded.append(version.name)
            for refused in changes.refused:
                self._store.refuse(refused)
                report.refused.append(
                    ReloadFailure(version=f"{refused.model}@{refused.version}", reason=refused.reason)
                )
            for version in changes.added:
                failure = await self._load(version)
                if failure is None:
                    report.loaded.append(version.name)
                else:
                    report.failed.append(ReloadFailure(version=version.name, reason=failure))
            if report.loaded or report.unloaded or report.refused:
                self._metrics.describe_store(self._store)
                log.info("model versions reloaded", extra=report.model_dump())
            return report

    async def _load(self, version: ModelVersion) -> str | None:
        started = time.perf_counter()
        try:
            await self._backend.load(version)
        except Exception as error:  # the boundary of a background load: logged, retried at the next rescan
            log.exception("model version failed to load", extra={"model": version.model, "version": version.version})
            return f"the backend could not load it ({type(error).__name__}); see the gateway's log"
        self._metrics.model_load_seconds.labels(version.model, str(version.version)).set(time.perf_counter() - started)
        self._batchers[(version.model, version.version)] = self._make_batcher(version)
        self._store.add(version)  # served from here on
        return None

    async def _unload(self, version: ModelVersion, refusal: RefusedVersion | None) -> None:
        why = "its files changed on disk" if refusal else "its folder was removed from the model repository"
        # Out of the store first, so no new request routes to it; then what was queued fails, and it is freed.
        self._store.remove(version, refusal)
        batcher = self._batchers.pop((version.model, version.version), None)
        if batcher is not None:
            await batcher.retire(f"{version.name} is no longer served: {why}; retry (another version answers).")
        await self._backend.unload(version)
        self._metrics.version_unloaded(version)
