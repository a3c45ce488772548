"""The embedding path, put together in one place: resolve version -> cache -> tokenize -> batch -> cache fill.

Knows nothing about HTTP; raises ``service.errors`` for anything a client can fix.
"""

import asyncio
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from service.embeddings.batcher import Batcher
from service.embeddings.cache import CachedEmbedding, EmbeddingCache, text_digest
from service.embeddings.queue import Lane
from service.errors import DeadlineExceeded, InvalidRequest, ModelNotFound, ServiceUnavailable
from service.models.store import ModelStore, ModelVersion
from service.models.tokenization import TooManyTokens
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
class EmbedResult:
    version: ModelVersion
    vectors: np.ndarray  # float32, (inputs, dimension), unit length
    prompt_tokens: int
    computed: int  # distinct inputs that were not in the cache (embedded now, or joined in flight)


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
        self._in_flight: dict[tuple[str, int, str], _Computation] = {}

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

    def check_inputs(self, raw: RequestInput) -> list[str]:
        """The request's inputs as a list of strings, or a 400 that says what to fix (their count was checked
        before the body was validated: ``EmbeddingRequest.check_size``)."""
        texts = [raw] if isinstance(raw, str) else raw
        if not texts:
            raise InvalidRequest("'input' is an empty list; send at least one string.", param="input")
        if not all(isinstance(text, str) for text in texts):
            raise InvalidRequest(
                "'input' holds token ids; send text instead: each model uses its own tokenizer. "
                "(LangChain: set check_embedding_ctx_length=False.)",
                param="input",
            )
        strings: list[str] = texts  # type: ignore[assignment]  # checked just above
        limit = self._settings.max_input_chars
        for index, text in enumerate(strings):
            if not text:
                raise InvalidRequest(f"input[{index}] is an empty string; remove it.", param="input")
            if len(text) > limit:
                raise InvalidRequest(
                    f"input[{index}] has {len(text)} characters, over the limit of {limit}; shorten it.",
                    param="input",
                )
        return strings

    async def embed(self, texts: list[str], version: ModelVersion, purpose: Purpose = "client") -> EmbedResult:
        """Unit vectors of ``texts`` made by ``version``, in input order; 504 past the request deadline.
        ``purpose``: a client's request, or the gateway's own work (shadow copies, the rollout analysis,
        re-indexing), which is counted apart and kept out of drift and text samples."""
        lane: Lane = "bulk" if len(texts) > self._settings.bulk_min_inputs else "interactive"
        # Shed load before any work: no hashing, cache lookup or tokenising for inputs the queue can't take.
        self._batchers[(version.model, version.version)].admit(len(texts), lane)
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                digests = [text_digest(text) for text in texts]
                entries, computed = await self._lookup_or_compute(texts, digests, version, lane)
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
        return EmbedResult(version=version, vectors=vectors, prompt_tokens=prompt_tokens, computed=computed)

    async def _lookup_or_compute(
        self, texts: list[str], digests: list[str], version: ModelVersion, lane: Lane
    ) -> tuple[dict[str, CachedEmbedding], int]:
        """Each distinct text once: from the cache, from a computation already in flight, or computed now;
        and how many were not in the cache."""
        by_digest = dict(zip(digests, texts, strict=True))
        found = await self._cache.get_many(version, list(by_digest)) if self._cache else {}
        missing = [digest for digest in by_digest if digest not in found]
        if not missing:
            return found, 0
        new = [d for d in missing if not self._joinable((version.model, version.version, d))]
        if new:
            self._start_computation(version, new, [by_digest[d] for d in new], lane)
        shared = {self._in_flight[(version.model, version.version, d)] for d in missing}
        for computation in shared:
            computation.waiters += 1
        try:
            await asyncio.gather(*(asyncio.shield(c.task) for c in shared))
        finally:
            for computation in shared:
                computation.waiters -= 1
                # The last request waiting for it went away: drop the inputs before inference.
                if computation.waiters == 0 and not computation.task.done():
                    computation.task.cancel()
        limit = version.tokenizer.max_seq_length
        for computation in shared:
            found.update(computation.task.result())
            for index, digest in enumerate(digests):
                if digest in computation.too_long:  # named as this request numbers its inputs
                    raise TooManyTokens(index, computation.too_long[digest], limit)
        return found, len(missing)

    def _joinable(self, key: tuple[str, int, str]) -> bool:
        computation = self._in_flight.get(key)
        # A computation cancelled by its last waiter can't be joined: the input is computed anew.
        return computation is not None and not computation.task.cancelling() and not computation.task.cancelled()

    def _start_computation(self, version: ModelVersion, digests: list[str], texts: list[str], lane: Lane) -> None:
        batcher = self._batchers[(version.model, version.version)]
        truncate = self._settings.truncate

        too_long: dict[str, int] = {}

        async def compute() -> dict[str, CachedEmbedding]:
            if sum(map(len, texts)) > _TOKENIZE_INLINE_MAX_CHARS:
                token_ids = await asyncio.to_thread(version.tokenizer.encode, texts, truncate=truncate)
            else:
                token_ids = version.tokenizer.encode(texts, truncate=truncate)
            # An input over the limit fails the requests that sent it, not the others sharing this computation.
            limit = version.tokenizer.max_seq_length
            too_long.update((d, len(ids)) for d, ids in zip(digests, token_ids, strict=True) if len(ids) > limit)
            fitting = [(d, ids) for d, ids in zip(digests, token_ids, strict=True) if d not in too_long]
            if not fitting:
                return {}
            futures = batcher.submit([ids for _, ids in fitting], lane)
            try:
                vectors = await asyncio.gather(*futures)
            except BaseException:
                # Deadline passed or client gone: the batches already run are kept, so a retry pays for the rest.
                done = [(d, ids, f) for (d, ids), f in zip(fitting, futures, strict=True) if _succeeded(f)]
                if done and self._cache:
                    self._cache.put_many(version, {d: CachedEmbedding(f.result(), len(ids)) for d, ids, f in done})
                for future in futures:
                    future.cancel()
                raise
            return {
                digest: CachedEmbedding(vector=vector, tokens=len(ids))
                for (digest, ids), vector in zip(fitting, vectors, strict=True)
            }

        computation = _Computation(asyncio.create_task(compute()), too_long)
        keys = [(version.model, version.version, digest) for digest in digests]
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


@dataclass(eq=False)
class _Computation:
    """Embedding of a group of distinct inputs, shared by every request that asked for one of them."""

    task: asyncio.Task[dict[str, CachedEmbedding]]
    too_long: dict[str, int]  # digest -> tokens of the inputs over the model's limit (never embedded)
    waiters: int = 0
