"""The analysis loop: judges each canary against stable every interval, then steps, promotes or fails it;
and the promotion, which moves the model's collections to the canary before the canary becomes stable.

Only the replica holding a model's lease (``RolloutStore.hold_lease``) acts on its rollout; the others hand
their interval measures over to it (through Redis), so it judges the traffic of every replica. Its counts
of passes and failures in a row live in the rollout state, so another replica taking the lease over goes
on from them. Every change is a compare-and-set save: an operator's
change made meanwhile wins, and the loop judges again at its next interval.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from opentelemetry.context import Context
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue
from redis.exceptions import RedisError

from service.embeddings.embedder import Embedder
from service.errors import ApiError, Conflict
from service.models.store import ModelVersion
from service.periodic import Periodic
from service.rollouts.state import (
    AnalysisThresholds,
    Judgement,
    RolloutState,
    begin_promotion,
    fail,
    judged,
    promote,
    step,
)
from service.rollouts.store import RolloutMetrics, RolloutWatcher
from service.rollouts.window import CanaryWindow, VersionWindow
from service.telemetry.drift import DriftMonitor, TextSample, neighbour_agreement
from service.vectors.store import VectorStore

log = logging.getLogger(__name__)

ANALYSIS = "analysis"
TICK_S = 0.25
# Recently served texts embedded by both versions to compare their neighbourhoods (fewer than
# MIN_AGREEMENT_TEXTS can't judge); once AGREEMENT_TEXTS are there they stay the rollout's reference sample.
AGREEMENT_TEXTS = 100
MIN_AGREEMENT_TEXTS = 30
NEIGHBOURS = 10
# A collection whose re-index failed is restarted this many times before the promotion gives up.
MAX_REINDEX_ATTEMPTS = 3


class RolloutAnalysis:
    def __init__(
        self,
        rollouts: RolloutWatcher,
        window: CanaryWindow,
        drift: DriftMonitor,
        texts: TextSample,
        embedder: Embedder,
        vector_store: VectorStore,
        metrics: RolloutMetrics,
        tracer: Tracer,
    ) -> None:
        self._tracer = tracer
        self._rollouts = rollouts
        self._window = window
        self._drift = drift
        self._texts = texts
        self._embedder = embedder
        self._vector_store = vector_store
        self._metrics = metrics
        self.holder = uuid.uuid4().hex  # this replica's name on the leases it holds
        self._last_judged: dict[str, float] = {}
        self._judging: dict[str, tuple[int | None, datetime | None]] = {}
        # The stable version's last measured P95, for steps where stable serves too little to measure it (100 %).
        self._stable_p95: dict[tuple[str, int], float] = {}
        self._reindex_attempts: dict[tuple[str, str, int], int] = {}
        # Measures of intervals that ended in a wait, added to the next one's: a quiet canary's requests add
        # up until there are enough to judge.
        self._carried: dict[tuple[str, int], VersionWindow] = {}
        self._reference_texts: dict[tuple[str, int], list[str]] = {}
        self._loop = Periodic("rollout-analysis", TICK_S, self._tend_all)

    def start(self) -> None:
        self._loop.start()

    async def close(self) -> None:
        await self._loop.close()

    async def _tend_all(self) -> None:
        for state in self._rollouts.all():
            try:
                await self.tend(state)
            except Conflict:
                pass  # an operator changed it meanwhile: look again next tick
            except Exception:  # one model's failure must not hold up the others: logged, tried again next tick
                log.exception("rollout analysis failed", extra={"model": state.model})

    async def tend(self, state: RolloutState) -> None:
        """One look at ``state``: drive its promotion, or judge it when its interval has passed."""
        if not state.active:
            return
        if state.phase == "promoting":
            if await self._rollouts.store.hold_lease(state.model, self.holder, 10 * TICK_S + 5):
                await self._promote(state)
            return
        if state.phase != "progressing" or not state.analysis.enabled or state.canary_version is None:
            return
        now = time.monotonic()
        started = next((d.at for d in reversed(state.history) if d.action == "start"), None)
        if self._judging.get(state.model) != (state.canary_version, started):
            # A rollout seen for the first time: its first interval starts now, not at the last one's end.
            self._judging[state.model] = (state.canary_version, started)
            self._last_judged[state.model] = now
            self._window.take(state.model, state.stable_version)
            self._window.take(state.model, state.canary_version)
            return
        if now - self._last_judged[state.model] < state.analysis.interval_s:
            return
        self._last_judged[state.model] = now
        if not await self._rollouts.store.hold_lease(state.model, self.holder, 2 * state.analysis.interval_s + 5):
            await self._hand_over(state.model, (state.stable_version, state.canary_version))
            return
        attributes: dict[str, AttributeValue] = {
            "model": state.model,
            "version": state.canary_version,
            "stable_version": state.stable_version,
        }
        # One trace per judgement: the agreement's embeddings of both versions show under it.
        with self._tracer.start_as_current_span("rollout.judge", context=Context(), attributes=attributes) as span:
            judgement = await self.judge(state)
            span.set_attribute("result", judgement.result)
            await self._act(state, judgement)

    # ── judging ────────────────────────────────────────────────────────────

    async def judge(self, state: RolloutState) -> Judgement:
        """Canary vs stable over the interval that just ended, with the measures of the intervals before it
        that could not be judged. Too little traffic, or no sample to compare on, is a wait: the loop never
        passes a canary it could not measure (and ``max_wait_intervals`` waits in a row fail it)."""
        assert state.canary_version is not None
        thresholds = state.analysis.thresholds
        canary = await self._interval(state.model, state.canary_version)
        stable = await self._interval(state.model, state.stable_version)
        if stable.p95_s is not None and stable.requests >= thresholds.min_requests:
            self._stable_p95[(state.model, state.stable_version)] = stable.p95_s
        stable_p95 = self._stable_p95.get((state.model, state.stable_version))
        drift = await asyncio.to_thread(self._drift.scores, state.model, state.canary_version)
        stable_drift = await asyncio.to_thread(self._drift.scores, state.model, state.stable_version)
        mmd = None if drift is None else drift.mmd
        stable_mmd = None if stable_drift is None else stable_drift.mmd
        agreement = await self._agreement(state)
        if agreement is not None:
            self._metrics.agreement.labels(state.model, str(state.canary_version)).set(agreement)
        measures = _Measures(canary, stable_p95, mmd, stable_mmd, agreement)
        failed = _failed_checks(thresholds, measures)
        if failed:
            result, reason = "fail", "; ".join(failed)
        else:
            missing = _missing_measures(thresholds, measures)
            if missing:
                result, reason = "wait", "cannot judge yet: " + "; ".join(missing)
            else:
                result, reason = "pass", "every threshold met"
        for version, window in ((state.canary_version, canary), (state.stable_version, stable)):
            if result == "wait":
                self._carried[(state.model, version)] = window
            else:
                self._carried.pop((state.model, version), None)
        self._metrics.analysis.labels(state.model, str(state.canary_version), result).inc()
        return Judgement(
            at=datetime.now(UTC),
            result=result,
            reason=reason,
            canary_requests=canary.requests,
            canary_error_rate=canary.error_rate,
            stable_p95_s=stable_p95,
            canary_p95_s=canary.p95_s,
            drift_mmd=mmd,
            stable_drift_mmd=stable_mmd,
            neighbour_agreement=agreement,
        )

    async def _interval(self, model: str, version: int) -> VersionWindow:
        """What every replica measured of ``model@version`` over the interval (this one's and those handed over),
        added to what was carried from intervals that could not be judged."""
        measured = [self._window.take(model, version)]
        carried = self._carried.pop((model, version), None)
        if carried is not None:
            measured.append(carried)
        try:
            handed = await self._rollouts.store.handed_over(model, version)
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("other replicas' measures unavailable", extra={"model": model, "error": type(error).__name__})
            handed = []
        return VersionWindow.merged([*measured, *(VersionWindow.from_json(value) for value in handed)])

    async def _hand_over(self, model: str, versions: tuple[int, int]) -> None:
        """Another replica judges this rollout: give it what this one measured over the interval."""
        for version in versions:
            window = self._window.take(model, version)
            if not window.requests:
                continue
            try:
                await self._rollouts.store.hand_over(model, version, window.to_json())
            except (RedisError, OSError, TimeoutError) as error:
                log.warning("measures not handed over", extra={"model": model, "error": type(error).__name__})

    async def _agreement(self, state: RolloutState) -> float | None:
        """Mean top-10 neighbour overlap of stable's and canary's embeddings of recently served texts."""
        assert state.canary_version is not None
        key = (state.model, state.canary_version)
        texts = self._reference_texts.get(key) or self._texts.sample(state.model)[-AGREEMENT_TEXTS:]
        if len(texts) < MIN_AGREEMENT_TEXTS:
            return None
        if len(texts) == AGREEMENT_TEXTS:
            # The rollout's reference sample from now on: the same texts every interval, embedded once (cached).
            self._reference_texts[key] = texts
        try:
            stable = self._version(state.model, state.stable_version)
            canary = self._version(state.model, state.canary_version)
            stable_vectors = (await self._embedder.embed(texts, stable, "analysis")).vectors
            canary_vectors = (await self._embedder.embed(texts, canary, "analysis")).vectors
        except ApiError as error:  # overloaded, timed out, or a version this replica can't serve: no measure
            log.warning("neighbour agreement not measured", extra={"model": state.model, "reason": error.message})
            return None
        return await asyncio.to_thread(neighbour_agreement, stable_vectors, canary_vectors, NEIGHBOURS)

    def _version(self, model: str, version: int) -> ModelVersion:
        return self._embedder.resolve(f"{model}@{version}")

    # ── acting ─────────────────────────────────────────────────────────────

    async def _act(self, state: RolloutState, judgement: Judgement) -> None:
        log.info(
            "canary judged",
            extra={
                "model": state.model,
                "version": state.canary_version,
                "result": judgement.result,
                "reason": judgement.reason,
                "weight": state.weight,
            },
        )
        analysis = state.analysis

        def change(current: RolloutState | None) -> RolloutState:
            if current is None or current.revision != state.revision:
                raise Conflict(f"rollout of {state.model} changed while it was judged")
            counted = judged(current, judgement)
            if counted.failures >= analysis.failures_to_rollback:
                return fail(counted, f"{judgement.reason} ({counted.failures} judgements in a row)", ANALYSIS)
            if counted.waits >= analysis.max_wait_intervals:
                # Fail closed: a canary that can't be measured is never left taking traffic unjudged.
                reason = f"no verdict in {counted.waits} intervals in a row, {judgement.reason}"
                return fail(counted, reason, ANALYSIS)
            if counted.passes >= analysis.passes_to_step:
                reason = f"{counted.passes} judgements passed in a row at {counted.weight} %"
                if counted.weight >= counted.steps[-1]:
                    return begin_promotion(counted, counted.model, reason, ANALYSIS)
                return step(counted, reason, ANALYSIS)
            return counted

        saved = await self._rollouts.update(state.model, change)
        if saved.phase == "promoting":
            await self._promote(saved)

    async def _promote(self, state: RolloutState) -> None:
        """Re-index every collection of the model to the canary; once all serve it, the canary becomes stable."""
        assert state.canary_version is not None
        pending = []
        for record in await self._vector_store.collections_on(state.model):
            name = record.name
            if record.active.version == state.canary_version:
                continue
            pending.append(name)
            reindex = record.reindex
            if reindex is not None and reindex.state == "running":
                continue  # to the canary (or an operator's re-index, which finishes first)
            key = (state.model, name, state.canary_version)
            attempts = self._reindex_attempts.get(key, 0)
            if reindex is not None and reindex.state == "failed" and attempts >= MAX_REINDEX_ATTEMPTS:
                version = state.canary_version
                await self._give_up(state, f"collection '{name}' could not be re-indexed to {version}: {reindex.error}")
                return
            self._reindex_attempts[key] = attempts + 1
            await self._vector_store.reindex(name, state.canary_version)
            log.info("promotion re-indexes a collection", extra={"collection": name, "version": state.canary_version})
        if pending:
            return
        reason = f"collections of {state.model} serve version {state.canary_version}; it is stable now"
        await self._rollouts.update(state.model, lambda current: promote(_at(current, state), state.model, reason))
        log.info("canary promoted", extra={"model": state.model, "version": state.canary_version})

    async def _give_up(self, state: RolloutState, reason: str) -> None:
        await self._rollouts.update(state.model, lambda current: fail(_at(current, state), reason, ANALYSIS))
        log.error("promotion failed", extra={"model": state.model, "reason": reason})


def _at(current: RolloutState | None, expected: RolloutState) -> RolloutState:
    """``current``, refused when it is no longer the state this decision was based on."""
    if current is None or current.revision != expected.revision:
        raise Conflict(f"rollout of {expected.model} changed meanwhile")
    return current


@dataclass(frozen=True)
class _Measures:
    """What one judgement measured: the canary's interval, stable's P95, both versions' drift from their own
    references, and the neighbourhood agreement."""

    canary: VersionWindow
    stable_p95: float | None
    mmd: float | None
    stable_mmd: float | None
    agreement: float | None

    @property
    def excess_drift(self) -> float | None:
        """The canary's drift beyond stable's. Vectors of two versions live in different spaces, so their
        samples can't be compared directly; each version's distance from its own reference, on the same
        traffic, can: traffic that moved away from the reference texts moves both, a broken canary only one."""
        return None if self.mmd is None or self.stable_mmd is None else self.mmd - self.stable_mmd


def _failed_checks(thresholds: AnalysisThresholds, measures: _Measures) -> list[str]:
    """The thresholds the canary broke, each with its measure (only measures taken on enough traffic count)."""
    failed = []
    canary, stable_p95 = measures.canary, measures.stable_p95
    enough = canary.requests >= thresholds.min_requests
    if enough and canary.error_rate is not None and canary.error_rate > thresholds.max_error_rate:
        failed.append(f"error rate {canary.error_rate:.3f} > {thresholds.max_error_rate}")
    if enough and canary.p95_s is not None and stable_p95:
        ratio = canary.p95_s / stable_p95
        if ratio > thresholds.max_p95_latency_ratio:
            failed.append(
                f"P95 latency {canary.p95_s * 1000:.1f} ms is {ratio:.2f}x stable's {stable_p95 * 1000:.1f} ms "
                f"> {thresholds.max_p95_latency_ratio}x"
            )
    excess = measures.excess_drift
    if excess is not None and excess > thresholds.max_drift_mmd:
        failed.append(
            f"drift MMD {measures.mmd:.4f} is {excess:.4f} beyond stable's {measures.stable_mmd:.4f} "
            f"> {thresholds.max_drift_mmd}"
        )
    if measures.agreement is not None and measures.agreement < thresholds.min_neighbour_agreement:
        failed.append(f"neighbour agreement {measures.agreement:.3f} < {thresholds.min_neighbour_agreement}")
    return failed


def _missing_measures(thresholds: AnalysisThresholds, measures: _Measures) -> list[str]:
    missing = []
    if measures.canary.requests < thresholds.min_requests:
        missing.append(f"{measures.canary.requests} canary requests < {thresholds.min_requests}")
    if measures.stable_p95 is None:
        missing.append("no stable latency measured yet")
    if measures.mmd is None:
        missing.append("too few canary embeddings for a drift score")
    if measures.stable_mmd is None:
        missing.append("too few stable embeddings for a drift score")
    if measures.agreement is None:
        missing.append(f"fewer than {MIN_AGREEMENT_TEXTS} sampled texts to compare neighbourhoods on")
    return missing
