"""The embedding path, put together in one place: resolve version -> cache -> tokenize -> batch -> cache fill.

Knows nothing about HTTP; raises ``service.errors`` for anything a client can fix.
"""

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from service.embeddings.batcher import Batcher
from service.embeddings.cache import CachedEmbedding, EmbeddingCache, text_digest
from service.embeddings.queue import InputTimes, Lane
from service.errors import DeadlineExceeded, EmptyInput, InvalidRequest, ModelNotFound, ServiceUnavailable
from service.models.store import ModelStore, ModelVersion
from service.models.tokenization import Token, TooManyTokens
from service.settings import Settings
from service.telemetry.drift import DriftMonitor, TextSample
from service.telemetry.metrics import Metrics

# Tokenising more characters than this (~2 ms) would hold up the event loop: it moves to a thread.
_TOKENIZE_INLINE_MAX_CHARS = 8_192
# How much of a client-sent model or version name an error message repeats.
MAX_NAME_ECHO = 64

RequestInput = str | list[str] | list[int] | list[list[int]]
# Who asked: a client, or the gateway itself (a shadow copy of a request, the rollout analysis, a re-index).
Purpose = Literal["client", "shadow", "analysis", "reindex"]
# What happens to an input over the model's token limit: refused (naming the limit), its end cut off, or its start.
Truncation = Literal["none", "right", "left"]


class VersionRouter(Protocol):
    """The canary rollouts this replica routes by (``service.rollouts.store.RolloutWatcher`` is one)."""

    def stable_version(self, model: str) -> int | None:
        """The stable version of ``model``'s rollout; None without a rollout."""
        ...

    def route(self, model: str, identity: str | None) -> int | None:
        """The version an unpinned request of ``model`` from the caller ``identity`` goes to; None without a
        rollout."""
        ...


@dataclass(frozen=True)
class StageTimes:
    """Mean seconds per distinct input of a request in each stage: tokenising, waiting in the batcher's queue,
    and its batch's inference. An input the cache answered counts 0 in each; one that joined a computation
    another request had started counts that computation's means."""

    tokenization_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0


@dataclass(frozen=True)
class EmbedResult:
    version: ModelVersion
    vectors: np.ndarray  # float32, (inputs, dimension), unit length
    prompt_tokens: int
    computed: int  # distinct inputs that were not in the cache (embedded now, or joined in flight)
    times: StageTimes = StageTimes()


class Embedder:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        batchers: dict[tuple[str, int], Batcher],
        cache: EmbeddingCache | None,
        metrics: Metrics,
        rollouts: VersionRouter | None = None,
        drift: DriftMonitor | None = None,
        texts: TextSample | None = None,
    ) -> None:
        self._settings = settings
        self._drift = drift
        self._texts = texts
        self._rollouts = rollouts
        self._store = store
        self._batchers = batchers
        self._cache = cache
        self._metrics = metrics
        self._in_flight: dict[tuple[str, int, Truncation, str], _Computation] = {}

    def default_version(self, model: str) -> ModelVersion:
        """The version served for ``model`` when a request does not pin one (its rollout's stable version first)."""
        from_rollout = self._rollouts.stable_version(model) if self._rollouts else None
        pinned = from_rollout if from_rollout is not None else self._settings.stable_versions.get(model)
        if pinned is not None:
            version = self._store.get(model, pinned)
            if version is None:
                refusal = self._store.refusal(model, pinned)
                why = refusal.reason if refusal else "it is not in the model repository"
                raise ServiceUnavailable(f"stable version {model}@{pinned} cannot be served: {why}.")
            return version
        versions = self._store.versions_of(model)
        if not versions:
            raise ServiceUnavailable(f"model {model} has no verified version to serve; see /readyz.")
        return versions[-1]

    def route(
        self, requested: str | None, header_version: str | None = None, identity: str | None = None
    ) -> tuple[ModelVersion, bool]:
        """The version an embeddings request gets, and whether it pinned one. A pinned version (name@version or
        ``x-model-version``) wins; unpinned, a model's canary rollout picks stable or canary by the caller's
        ``identity`` (sticky), and a caller without one gets stable."""
        name, pinned = self._parse(requested, header_version)
        if pinned:
            return self._pinned(name, pinned), True
        routed = self._rollouts.route(name, identity) if self._rollouts else None
        version = self._store.get(name, routed) if routed is not None else None
        return version or self.default_version(name), False

    def resolve(self, requested: str | None, header_version: str | None = None) -> ModelVersion:
        """Map ``model`` (name, alias or name@version) and ``x-model-version`` to a version; unpinned, the
        model's stable version (collections are created on it: a canary never gets them by chance)."""
        name, pinned = self._parse(requested, header_version)
        return self._pinned(name, pinned) if pinned else self.default_version(name)

    def _parse(self, requested: str | None, header_version: str | None) -> tuple[str, str]:
        """(model name, pinned version or "") of a request; 404 for a model that does not exist."""
        reference = requested or self._settings.default_model
        name, at, pinned = reference.partition("@")
        name = self._settings.model_aliases.get(name, name)
        if name not in self._store.models():
            raise ModelNotFound(
                f"model '{name[:MAX_NAME_ECHO]}' does not exist; "
                f"available: {', '.join(self._store.models()) or 'none'}.",
                param="model",
            )
        if at and not pinned:
            raise InvalidRequest(
                f"'{reference[:MAX_NAME_ECHO]}' names no version; pin one as {name}@<n>, or send {name}.", param="model"
            )
        return name, pinned or (header_version or "").removeprefix(f"{name}@")

    def _pinned(self, name: str, pinned: str) -> ModelVersion:
        # ASCII digits only ("²".isdigit() is True, and int() reads other scripts' digits); 9 of them at most.
        if not (pinned.isascii() and pinned.isdecimal() and len(pinned) <= 9):
            raise InvalidRequest(
                f"version '{pinned[:MAX_NAME_ECHO]}' is not a version number; pin a version as {name}@<n>.",
                param="model",
            )
        version = self._store.get(name, int(pinned))
        if version is not None:
            return version
        refusal = self._store.refusal(name, int(pinned))
        if refusal is not None:
            raise ModelNotFound(
                f"version {name}@{pinned} is not served: {refusal.reason}.", param="model", code="version_refused"
            )
        served = ", ".join(str(v.version) for v in self._store.versions_of(name))
        raise ModelNotFound(f"model {name} has no version {pinned}; served versions: {served}.", param="model")

    def check_inputs(self, raw: RequestInput, param: str = "input") -> list[str]:
        """The request's inputs (its body's ``param``) as a list of strings, or a 400 that says what to fix (their
        count was checked before the body was validated: ``EmbeddingRequest.check_size``)."""
        texts = [raw] if isinstance(raw, str) else raw
        if not texts:
            raise EmptyInput(f"'{param}' is an empty list; send at least one string.", param=param)
        if not all(isinstance(text, str) for text in texts):
            raise InvalidRequest(
                f"'{param}' holds token ids; send text instead: each model uses its own tokenizer. "
                "(LangChain: set check_embedding_ctx_length=False.)",
                param=param,
            )
        strings: list[str] = texts  # type: ignore[assignment]  # checked just above
        limit = self._settings.max_input_chars
        for index, text in enumerate(strings):
            if not text:
                raise InvalidRequest(f"{param}[{index}] is an empty string; remove it.", param=param)
            if len(text) > limit:
                raise InvalidRequest(
                    f"{param}[{index}] has {len(text)} characters, over the limit of {limit}; shorten it.",
                    param=param,
                )
        return strings

    async def tokens(
        self, texts: list[str], version: ModelVersion, add_special_tokens: bool = True
    ) -> list[list[Token]]:
        """Each text's tokens by ``version``'s tokenizer, whole (never truncated), in input order."""
        if sum(map(len, texts)) > _TOKENIZE_INLINE_MAX_CHARS:
            return await asyncio.to_thread(version.tokenizer.tokens, texts, add_special_tokens=add_special_tokens)
        return version.tokenizer.tokens(texts, add_special_tokens=add_special_tokens)

    async def embed(
        self, texts: list[str], version: ModelVersion, purpose: Purpose = "client", truncation: Truncation | None = None
    ) -> EmbedResult:
        """Unit vectors of ``texts`` made by ``version``, in input order; 504 past the request deadline.
        ``purpose``: a client's request, or the gateway's own work (shadow copies, the rollout analysis,
        re-indexing), which is counted apart and kept out of drift and text samples. ``truncation``: what
        happens to an input over the token limit (None: ``EMBEDSERVE_TRUNCATE`` decides, cutting its end)."""
        mode: Truncation = truncation or ("right" if self._settings.truncate else "none")
        lane: Lane = "bulk" if len(texts) > self._settings.bulk_min_inputs else "interactive"
        # Shed load before any work: no hashing, cache lookup or tokenising for inputs the queue can't take.
        self._batcher(version).admit(len(texts), lane)
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                digests = [_digest(text, mode) for text in texts]
                entries, computed, times = await self._lookup_or_compute(texts, digests, version, lane, mode)
        except TimeoutError:
            self._metrics.rejected.labels(version.model, str(version.version), "timeout").inc()
            raise DeadlineExceeded(
                f"embedding took longer than {self._settings.request_timeout_s:g}s; retry with fewer inputs."
            ) from None
        vectors = np.stack([entries[digest].vector for digest in digests])
        if purpose == "client":
            # Cache hits too: drift is about what is served, whatever answered it.
            if self._drift is not None:
                self._drift.observe(version, vectors)
            if self._texts is not None:
                self._texts.observe(version.model, texts)
        prompt_tokens = sum(entries[digest].tokens for digest in digests)
        labels = (version.model, str(version.version))
        if purpose == "client":
            self._metrics.inputs.labels(*labels).inc(len(texts))
            self._metrics.tokens.labels(*labels).inc(prompt_tokens)
        else:  # the gateway's own work: apart, so client traffic and rollout judgements never include it
            self._metrics.internal_inputs.labels(*labels, purpose).inc(len(texts))
        return EmbedResult(version, vectors, prompt_tokens, computed, times)

    async def _lookup_or_compute(
        self, texts: list[str], digests: list[str], version: ModelVersion, lane: Lane, truncation: Truncation
    ) -> tuple[dict[str, CachedEmbedding], int, StageTimes]:
        """Each distinct text once: from the cache, from a computation already in flight, or computed now;
        how many were not in the cache, and the request's mean times."""
        by_digest = dict(zip(digests, texts, strict=True))
        found = await self._cache.get_many(version, list(by_digest)) if self._cache else {}
        if truncation == "none":
            # An entry as long as the limit may hold a truncated input's vector (another request's): checked anew.
            found = {d: entry for d, entry in found.items() if entry.tokens < version.tokenizer.max_seq_length}
        missing = [digest for digest in by_digest if digest not in found]
        if not missing:
            return found, 0, StageTimes()
        keys = {d: (version.model, version.version, truncation, d) for d in missing}
        new = [d for d in missing if not self._joinable(keys[d])]
        if new:
            self._start_computation(version, new, [by_digest[d] for d in new], lane, truncation)
        owners = [self._in_flight[keys[d]] for d in missing]
        shared = set(owners)
        for computation in shared:
            computation.waiters += 1
        try:
            await asyncio.gather(*(asyncio.shield(c.task) for c in shared))
        finally:
            for computation in shared:
                computation.waiters -= 1
                # The last request waiting for it went away (deadline, client gone): what is computed goes to the
                # cache now, before this request's answer, so a retry at once pays only for the rest; the inputs
                # still queued are dropped before inference.
                if computation.waiters == 0 and not computation.task.done():
                    self._keep_computed(version, computation)
                    computation.task.cancel()
        limit = version.tokenizer.max_seq_length
        for computation in shared:
            found.update(computation.task.result())
            for index, digest in enumerate(digests):
                if digest in computation.too_long:  # named as this request numbers its inputs
                    raise TooManyTokens(index, computation.too_long[digest], limit)
        return found, len(missing), _mean_times(owners, len(by_digest))

    def _keep_computed(self, version: ModelVersion, computation: "_Computation") -> None:
        done = {d: CachedEmbedding(f.result(), tokens) for d, tokens, f in computation.queued if _succeeded(f)}
        if done and self._cache:
            self._cache.put_many(version, done)

    def _batcher(self, version: ModelVersion) -> Batcher:
        batcher = self._batchers.get((version.model, version.version))
        if batcher is None:  # unloaded (hot-loading) between routing and now
            raise ServiceUnavailable(f"{version.name} is no longer served; retry (another version answers).")
        return batcher

    def _joinable(self, key: tuple[str, int, Truncation, str]) -> bool:
        computation = self._in_flight.get(key)
        # A computation cancelled by its last waiter can't be joined: the input is computed anew.
        return computation is not None and not computation.task.cancelling() and not computation.task.cancelled()

    def _start_computation(
        self, version: ModelVersion, digests: list[str], texts: list[str], lane: Lane, truncation: Truncation
    ) -> None:
        batcher = self._batcher(version)
        encode = functools.partial(
            version.tokenizer.encode,
            texts,
            truncate=truncation != "none",
            direction="left" if truncation == "left" else "right",
        )
        computation = _Computation(inputs=len(digests))
        too_long = computation.too_long

        async def compute() -> dict[str, CachedEmbedding]:
            started = time.perf_counter()
            if sum(map(len, texts)) > _TOKENIZE_INLINE_MAX_CHARS:
                token_ids = await asyncio.to_thread(encode)
            else:
                token_ids = encode()
            computation.tokenization_s = time.perf_counter() - started
            # An input over the limit fails the requests that sent it, not the others sharing this computation.
            limit = version.tokenizer.max_seq_length
            too_long.update((d, len(ids)) for d, ids in zip(digests, token_ids, strict=True) if len(ids) > limit)
            fitting = [(d, ids) for d, ids in zip(digests, token_ids, strict=True) if d not in too_long]
            if not fitting:
                return {}
            futures = batcher.submit([ids for _, ids in fitting], lane, computation.times)
            computation.queued = [(d, len(ids), f) for (d, ids), f in zip(fitting, futures, strict=True)]
            try:
                vectors = await asyncio.gather(*futures)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            return {
                digest: CachedEmbedding(vector=vector, tokens=len(ids))
                for (digest, ids), vector in zip(fitting, vectors, strict=True)
            }

        computation.task = asyncio.create_task(compute())
        keys = [(version.model, version.version, truncation, digest) for digest in digests]
        for key in keys:
            self._in_flight[key] = computation

        def finished(task: asyncio.Task[dict[str, CachedEmbedding]]) -> None:
            for key in keys:
                if self._in_flight.get(key) is computation:
                    del self._in_flight[key]
            if self._cache and not task.cancelled() and task.exception() is None:
                self._cache.put_many(version, task.result())

        computation.task.add_done_callback(finished)


def _succeeded(future: "asyncio.Future[np.ndarray]") -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _digest(text: str, truncation: Truncation) -> str:
    """What ``text``'s vector is cached and shared under: its sha256; cut at its start, an input over the limit
    has another vector, kept apart by a prefix no plain digest has."""
    digest = text_digest(text)
    return f"left:{digest}" if truncation == "left" else digest


@dataclass(eq=False)
class _Computation:
    """Embedding of a group of distinct inputs, shared by every request that asked for one of them."""

    inputs: int
    task: asyncio.Task[dict[str, CachedEmbedding]] = field(init=False)
    too_long: dict[str, int] = field(default_factory=dict)  # digest -> tokens of inputs over the limit (not embedded)
    tokenization_s: float = 0.0
    times: InputTimes = field(default_factory=InputTimes)  # the batcher's, for the inputs that fit
    waiters: int = 0
    # (digest, tokens, its vector's future) of each input given to the batcher
    queued: list[tuple[str, int, "asyncio.Future[np.ndarray]"]] = field(default_factory=list)


def _mean_times(owners: list[_Computation], distinct: int) -> StageTimes:
    """A request's mean times over its ``distinct`` inputs, given the computation of each one not cached."""
    tokenization = queue = inference = 0.0
    for computation in owners:
        tokenization += computation.tokenization_s / computation.inputs
        if computation.times.inputs:
            queue += computation.times.queue_s / computation.times.inputs
            inference += computation.times.inference_s / computation.times.inputs
    return StageTimes(tokenization / distinct, queue / distinct, inference / distinct)
