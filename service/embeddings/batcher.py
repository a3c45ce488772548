"""Dynamic batching: one batcher per (model, version) turns many small requests into few inference batches.

Inputs (token ids) join a bounded queue of two lanes, interactive and bulk (``service.embeddings.queue``
says which batch goes next). A worker closes a batch at its lane's ``max_batch_size`` inputs or
``max_batch_tokens`` padded tokens, or ``max_wait_ms`` after its oldest input arrived, whichever comes
first, and sends it to the backend; up to ``batches_in_flight`` batches run at once (one per inference thread
in process, several to keep a remote GPU busy through each round trip). With ``bulk_alone`` (in process) a bulk
batch takes every slot: it runs alone, on every thread, so an interactive batch waits behind one bulk batch at
most, never behind two on one thread each (``make bench-lanes``: interactive P99 under a bulk upsert 3.54x its
idle P99 with bulk batches side by side, 2.33x alone). While every slot is taken the next
batch fills, so under load batches form without any waiting and an idle gateway adds no delay. A full lane
refuses new work (429, ``Retry-After`` from the measured drain rate) instead of letting waits grow without
bound; inputs whose request was cancelled or timed out are dropped before inference.

A worker that dies (a bug, a stray cancellation) is restarted after a pause that grows while it keeps
dying, and counted (``embedserve_batcher_restarts_total``); the inputs it held fail at once with a 503,
and so do new ones until it runs again (``running`` is False meanwhile: /readyz reports the version).

Tracing: a batch serves several requests, so each request gets its own spans for its part of a batch,
children of the span that was current when it queued its inputs: ``batch.queue_wait`` (from queueing to the
batch's start) and ``inference`` (the backend call, with the batch's size and padded tokens, the request's
``inputs`` in it and how many ``requests`` share it). Each request's trace shows where its time went; the
requests of one batch have ``inference`` spans with the same times.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from service.backends.contract import Backend
from service.embeddings.queue import InputQueue, InputTimes, Lane, Origin, Pending, QueueLimits
from service.errors import ApiError, InferenceFailed, Overloaded, ServiceUnavailable
from service.models.store import ModelVersion
from service.models.tokenization import pad_batch
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import NO_TRACING, version_attributes

log = logging.getLogger(__name__)

# Seconds before a dead worker is restarted, by how many times in a row it died without forming a batch.
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class Batcher:
    def __init__(
        self,
        version: ModelVersion,
        backend: Backend,
        limits: QueueLimits,
        metrics: Metrics,
        tracer: Tracer = NO_TRACING,
        batches_in_flight: int = 1,
        bulk_alone: bool = False,
    ) -> None:
        self.version = version
        self._backend = backend
        self._metrics = metrics
        self._tracer = tracer
        self._labels = (version.model, str(version.version))
        self._queue = InputQueue(limits)
        self._arrived = asyncio.Event()
        self._batches_in_flight = batches_in_flight
        self._bulk_alone = bulk_alone
        self._slots = asyncio.Semaphore(batches_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._deaths_in_a_row = 0
        self._stopping = False
        self.last_death: str | None = None  # why the worker last died, while it is down

    @property
    def running(self) -> bool:
        """Whether the worker that forms this version's batches is alive (False while it waits to restart)."""
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        self._stopping = False
        self._start_worker()

    def _start_worker(self) -> None:
        self._restart = None
        self.last_death = None
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.version.name}")
        self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        error = None if worker.cancelled() else worker.exception()
        error_type = type(error).__name__ if error else "CancelledError"
        delay = RESTART_DELAYS_S[min(self._deaths_in_a_row, len(RESTART_DELAYS_S) - 1)]
        self._deaths_in_a_row += 1
        self.last_death = f"its batcher worker stopped ({error_type}) and restarts in {delay:g} s"
        self._metrics.batcher_restarts.labels(*self._labels).inc()
        log.error(
            "batcher worker stopped; restarting",
            extra={
                "model": self.version.model,
                "version": self.version.version,
                "error_type": error_type,
                "restart_in_s": delay,
            },
            exc_info=error,
        )
        # Nothing would take the queued inputs until the restart: they fail now rather than at their deadline.
        self._fail_queued()
        self._restart = asyncio.get_running_loop().call_later(delay, self._start_worker)

    def _fail_queued(self) -> None:
        for pending in self._queue.clear():
            if not pending.future.done():
                pending.future.set_exception(self._restarting())
        self._metrics.queue_depth.labels(*self._labels).set(0)

    def _restarting(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the batcher of {self.version.name} stopped and is restarting; retry in a few seconds (see /readyz)."
        )

    async def stop(self) -> None:
        await self._stop_worker()
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        for pending in self._queue.clear():
            pending.future.cancel()

    async def retire(self, why: str) -> None:
        """Stop for good because the version stopped being served (``why``: what the waiting requests are told,
        503): queued inputs fail now, batches already running finish."""
        await self._stop_worker()
        for pending in self._queue.clear():
            if not pending.future.done():
                pending.future.set_exception(ServiceUnavailable(why))
        self._metrics.queue_depth.labels(*self._labels).set(0)
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _stop_worker(self) -> None:
        """No batch forms from here on (and no restart is pending)."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    def admit(self, count: int, lane: Lane) -> None:
        """Refuse now, before any work is done for them, ``count`` inputs that ``lane`` can't take: 429 with the
        seconds its queue needs to drain; 503 while the worker restarts."""
        if not self.running:
            raise self._restarting()
        if not self._queue.fits(count, lane):
            self._metrics.rejected.labels(*self._labels, "queue_full").inc()
            raise Overloaded(
                f"{self.version.name} has {self._queue.queued(lane)} {lane} inputs waiting; retry shortly.",
                retry_after_s=self._queue.retry_after_s(),
            )

    def submit(
        self, token_ids: list[list[int]], lane: Lane, times: InputTimes | None = None
    ) -> list[asyncio.Future[np.ndarray]]:
        """Queue ``token_ids`` in ``lane``; each input's future gets its vector (or the error), and ``times`` each
        input's wait and its batch's inference. Cancel a future to drop its input before inference."""
        self.admit(len(token_ids), lane)
        loop = asyncio.get_running_loop()
        origin = Origin(otel_context.get_current(), times)
        inputs = [Pending(ids, loop.create_future(), origin) for ids in token_ids]
        self._queue.push(inputs, lane)
        self._metrics.queue_depth.labels(*self._labels).set(len(self._queue))
        self._arrived.set()
        return [item.future for item in inputs]

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # A free slot first: while every batch in flight runs, the queue keeps filling the next one.
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if batch is None:
                self._slots.release()
                continue
            self._deaths_in_a_row = 0
            slots = await self._every_slot(batch) if batch.lane == "bulk" and self._bulk_alone else 1
            task = asyncio.create_task(self._infer(batch), name=f"batch-{self.version.name}")
            self._in_flight.add(task)
            self._metrics.batches_in_flight.labels(*self._labels).set(len(self._in_flight))
            task.add_done_callback(functools.partial(self._batch_done, slots))

    async def _every_slot(self, batch: "_Batch") -> int:
        """Take the other slots too, once the batches running in them are done (``batch`` holds one already)."""
        taken = 1
        try:
            while taken < self._batches_in_flight:
                await self._slots.acquire()
                taken += 1
        except BaseException:
            for _ in range(taken):
                self._slots.release()
            for item in batch.inputs:
                item.future.cancel()
            raise
        return taken

    def _batch_done(self, slots: int, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        for _ in range(slots):
            self._slots.release()
        self._metrics.batches_in_flight.labels(*self._labels).set(len(self._in_flight))

    async def _next_batch(self) -> "_Batch | None":
        """Wait until a batch should close, then take it out of the queue (None: nothing left to run)."""
        while True:
            dropped = self._queue.drop_abandoned()
            if dropped:
                self._metrics.dropped.labels(*self._labels, "abandoned").inc(dropped)
            lane = self._queue.next_lane()
            if lane is None:
                return None
            batch = self._queue.select(lane)
            remaining_ms = self._queue.limits.max_wait_ms - self._queue.oldest_wait_ms(lane)
            if self._queue.complete(lane, batch) or remaining_ms <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining_ms / 1000)
        contended = self._queue.take(lane, batch)
        self._metrics.queue_depth.labels(*self._labels).set(len(self._queue))
        return _Batch(lane, batch, contended)

    async def _infer(self, formed: "_Batch") -> None:
        """Run the batch and settle every input's future: its vector, or the error (whatever raised it)."""
        batch = formed.inputs
        try:
            vectors = await self._run_batch(formed)
            if len(vectors) != len(batch):
                raise ValueError(f"the backend returned {len(vectors)} vectors for {len(batch)} inputs")
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        except Exception as error:
            if not isinstance(error, ApiError):
                log.exception("inference failed", extra={"model": self.version.model, "version": self.version.version})
                # The cause stays in the log: the client learns which version failed, never its internals.
                error = InferenceFailed(f"inference failed in {self.version.name}; it has been logged.")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        for item, vector in zip(batch, vectors, strict=True):
            if not item.future.done():
                item.future.set_result(vector)

    async def _run_batch(self, formed: "_Batch") -> np.ndarray:
        batch = formed.inputs
        started = time.monotonic()
        tokens = pad_batch([item.token_ids for item in batch], self.version.tokenizer.pad_id)
        for item in batch:
            self._metrics.queue_wait.labels(*self._labels).observe(started - item.enqueued_at)
        self._metrics.batch_size.labels(*self._labels).observe(len(batch))
        self._metrics.batch_padded_tokens.labels(*self._labels).observe(tokens.padded_tokens)
        self._metrics.padding_ratio.labels(*self._labels).observe(1 - tokens.real_tokens / tokens.padded_tokens)
        spans = self._start_spans(batch, tokens.padded_tokens)
        try:
            vectors = await self._backend.embed(self.version, tokens)
        except Exception as error:
            _record_error(spans, error)
            raise
        finally:
            for span in spans:
                span.end()
        elapsed = time.monotonic() - started
        self._metrics.inference_latency.labels(*self._labels).observe(elapsed)
        for item in batch:
            if item.origin.times is not None:
                item.origin.times.inputs += 1
                item.origin.times.queue_s += started - item.enqueued_at
                item.origin.times.inference_s += elapsed
        self._queue.drained(formed.lane, len(batch), elapsed, self._batches_in_flight, formed.contended)
        return vectors

    def _start_spans(self, batch: list[Pending], padded_tokens: int) -> list[Span]:
        """Per request in ``batch``: its ``batch.queue_wait`` span (ended now) and its ``inference`` span (open)."""
        now_ns = time.time_ns()
        inputs_per_origin = Counter(item.origin for item in batch)
        version = version_attributes(self.version)
        spans: list[Span] = []
        for origin, inputs in inputs_per_origin.items():
            queue_wait = self._tracer.start_span(
                "batch.queue_wait",
                origin.context,
                attributes={**version, "inputs": inputs},
                start_time=origin.enqueued_ns,
            )
            queue_wait.end(now_ns)
            attributes = {
                **version,
                "inputs": inputs,
                "batch_size": len(batch),
                "padded_tokens": padded_tokens,
                "requests": len(inputs_per_origin),
            }
            spans.append(self._tracer.start_span("inference", origin.context, attributes=attributes, start_time=now_ns))
        return spans


@dataclass(frozen=True)
class _Batch:
    """Inputs taken from a lane for one inference; ``contended``: the other lane waited too."""

    lane: Lane
    inputs: list[Pending]
    contended: bool


def _record_error(spans: list[Span], error: Exception) -> None:
    for span in spans:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
