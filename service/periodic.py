"""A background loop: one async step every few seconds, from start until close.

The rollout watcher, the rollout analysis and the drift monitor each run one. A failed step is logged
and the loop goes on (it is the boundary of background work). Close ends it for sure: the flag, not
only the cancellation, stops the loop, because a client library (redis-py) can turn a cancellation that
lands inside a command into an error that the step catches.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._step = step
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._step()
            except Exception:
                log.exception("background step failed", extra={"loop": self.name})
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
