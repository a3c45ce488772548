"""The inputs waiting for one version's batches: two lanes, each bounded, and which batch goes next.

``interactive``: requests of at most ``EMBEDSERVE_BULK_MIN_INPUTS`` inputs (a search query, a few
sentences). ``bulk``: larger ones (a document batch, a collection upsert, a re-index batch). Each lane is
a queue with its own bound (beyond it the request gets a 429 whose ``Retry-After`` comes from the measured
drain rate) and its own batch limits: on CPU bulk batches are small, so an interactive input never waits
behind more than one of them. While both lanes hold inputs, bulk gets ``bulk_share`` of the inference time
(time, not batches: one bulk batch can cost as much as several interactive ones); alone, it gets it all.
Within a lane the oldest input is always in the next batch, with the queued inputs closest to it in
length, so padding stays small and nothing starves.
"""

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from opentelemetry import context as otel_context

Lane = Literal["interactive", "bulk"]
LANES: tuple[Lane, ...] = ("interactive", "bulk")
# How many of a lane's oldest inputs are considered when grouping by length: bounds the cost of forming a
# batch and how far a short input can overtake a long one.
_SELECTION_WINDOW_FACTOR = 4
# Weight of the newest batch in the drain-rate estimate (an exponential moving average).
_DRAIN_SMOOTHING = 0.2
# The share is kept over recent contended batches (each one's weight fades by this factor per batch): a lane
# that had little to do for an hour must not then be owed a long run of turns.
_SHARE_MEMORY = 0.95
RETRY_AFTER_MAX_S = 30


@dataclass(frozen=True)
class LaneLimits:
    max_batch_size: int
    max_batch_tokens: int
    max_queue_inputs: int


@dataclass(frozen=True)
class QueueLimits:
    interactive: LaneLimits
    bulk: LaneLimits
    bulk_share: float  # share of the inference time bulk gets while interactive inputs wait too
    max_wait_ms: float  # longest the oldest input waits for its batch to fill while nothing runs

    def of(self, lane: Lane) -> LaneLimits:
        return self.interactive if lane == "interactive" else self.bulk


@dataclass
class InputTimes:
    """Seconds summed over the inputs of ``submit`` calls once their batches ran: waiting in the queue, and
    their batches' inference (a request's timing headers)."""

    inputs: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0


@dataclass(eq=False)
class Origin:
    """The ``submit`` call an input came from: the trace context it was called in, when it queued (ns), and
    where its inputs' times go."""

    context: otel_context.Context
    times: InputTimes | None = None
    enqueued_ns: int = field(default_factory=time.time_ns)


@dataclass(eq=False)
class Pending:
    token_ids: list[int]
    future: asyncio.Future[np.ndarray]
    origin: Origin
    enqueued_at: float = field(default_factory=time.monotonic)


class InputQueue:
    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self._lanes: dict[Lane, list[Pending]] = {lane: [] for lane in LANES}
        # Inference seconds of the batches formed while both lanes waited, by lane: what the share is kept on.
        self._contended_s: dict[Lane, float] = {lane: 0.0 for lane in LANES}
        self._drain_per_s: float | None = None

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._lanes.values())

    def queued(self, lane: Lane) -> int:
        return len(self._lanes[lane])

    def fits(self, count: int, lane: Lane) -> bool:
        """Whether ``count`` more inputs fit ``lane`` (an empty lane takes any one request)."""
        waiting = len(self._lanes[lane])
        return not waiting or waiting + count <= self.limits.of(lane).max_queue_inputs

    def retry_after_s(self) -> int:
        """Seconds until the queue (both lanes) has drained at the measured rate (1 until one is measured)."""
        if not self._drain_per_s:
            return 1
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(len(self) / self._drain_per_s)))

    def push(self, pending: list[Pending], lane: Lane) -> None:
        self._lanes[lane].extend(pending)

    def drop_abandoned(self) -> int:
        """Drop inputs whose request went away (cancelled, timed out); how many."""
        dropped = 0
        for lane, waiting in self._lanes.items():
            kept = [item for item in waiting if not item.future.done()]
            dropped += len(waiting) - len(kept)
            self._lanes[lane] = kept
        return dropped

    def next_lane(self) -> Lane | None:
        """The lane whose batch goes next: interactive, except for bulk's share while both wait."""
        interactive, bulk = self._lanes["interactive"], self._lanes["bulk"]
        if not bulk:
            return "interactive" if interactive else None
        if not interactive:
            return "bulk"
        spent = self._contended_s["interactive"] + self._contended_s["bulk"]
        return "bulk" if self._contended_s["bulk"] <= self.limits.bulk_share * spent else "interactive"

    def select(self, lane: Lane) -> list[Pending]:
        """The lane's oldest input plus its queued inputs closest to it in length, within the lane's limits."""
        limits = self.limits.of(lane)
        waiting = self._lanes[lane]
        oldest = waiting[0]
        window = waiting[1 : 1 + limits.max_batch_size * _SELECTION_WINDOW_FACTOR]
        window.sort(key=lambda item: abs(len(item.token_ids) - len(oldest.token_ids)))
        batch = [oldest]
        longest = len(oldest.token_ids)
        for item in window:
            if len(batch) >= limits.max_batch_size:
                break
            candidate_longest = max(longest, len(item.token_ids))
            if candidate_longest * (len(batch) + 1) > limits.max_batch_tokens:
                continue
            batch.append(item)
            longest = candidate_longest
        return batch

    def complete(self, lane: Lane, batch: list[Pending]) -> bool:
        """Whether ``batch`` is as full as ``lane`` allows (no need to wait for more inputs)."""
        max_size = self.limits.of(lane).max_batch_size
        return len(batch) >= max_size or len(batch) < min(len(self._lanes[lane]), max_size)

    def oldest_wait_ms(self, lane: Lane) -> float:
        return (time.monotonic() - self._lanes[lane][0].enqueued_at) * 1000

    def take(self, lane: Lane, batch: list[Pending]) -> bool:
        """Remove ``batch`` from ``lane``: it goes to inference. Whether the other lane waited too (then its
        time counts towards the share: pass it back to ``drained``)."""
        contended = bool(self._lanes["interactive"] and self._lanes["bulk"])
        taken = set(map(id, batch))
        self._lanes[lane] = [item for item in self._lanes[lane] if id(item) not in taken]
        return contended

    def drained(self, lane: Lane, inputs: int, seconds: float, in_flight: int, contended: bool) -> None:
        """A batch of ``inputs`` of ``lane`` ran in ``seconds``, with ``in_flight`` batches running at once at
        most; ``contended``: the other lane waited meanwhile."""
        if contended:
            for each in LANES:
                self._contended_s[each] *= _SHARE_MEMORY
            self._contended_s[lane] += seconds
        rate = inputs * in_flight / max(seconds, 1e-3)
        previous = self._drain_per_s
        self._drain_per_s = rate if previous is None else (1 - _DRAIN_SMOOTHING) * previous + _DRAIN_SMOOTHING * rate

    def clear(self) -> list[Pending]:
        """Every waiting input, taken out of the queue."""
        waiting = [item for lane in LANES for item in self._lanes[lane]]
        self._lanes = {lane: [] for lane in LANES}
        return waiting
