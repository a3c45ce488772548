"""Triton Inference Server backend: token ids go over gRPC to the version's model, vectors come back.

One channel for every request (connections reused); every call has a timeout; every version is
addressed explicitly (``model_version``), so two versions are served side by side during a canary.
A batch larger than the version's ``max_batch_size`` in Triton (read from Triton's model config) is
sent as several requests and the rows put back in order. Triton's own error text never reaches a
client: it is logged (it names models and tensors, never request text), and the client gets a 503
that says what is unavailable.
"""

import asyncio
import logging

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from service.errors import ServiceUnavailable
from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch

log = logging.getLogger(__name__)

# The tensors of every version's Triton model config (trainer/release/triton_config.py writes them).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT = "embedding"

# gRPC statuses (as tritonclient spells them) that get a message of their own.
_DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
_NOT_FOUND = "StatusCode.NOT_FOUND"


class TritonBackend:
    name = "triton"

    def __init__(self, url: str, timeout_s: float, ready_timeout_s: float = 1.0) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._client = triton_grpc.InferenceServerClient(url=url)
        # (model, version) -> rows per request Triton accepts (0: no limit); read from Triton on first use.
        self._batch_limits: dict[tuple[str, int], int] = {}

    async def start(self, versions: list[ModelVersion]) -> None:
        # Triton may come up after the gateway: not being ready yet is reported by /readyz, not fatal.
        for version in versions:
            if not await self.ready(version):
                log.warning(
                    "version not ready in triton yet",
                    extra={"model": version.model, "version": version.version, "triton_url": self.url},
                )
                continue
            try:
                await self._batch_limit(version)
            except InferenceServerException as error:
                self._log_error("reading the triton model config failed", version, error)

    async def ready(self, version: ModelVersion) -> bool:
        try:
            ready = bool(
                await self._client.is_model_ready(
                    version.model, str(version.version), client_timeout=self._ready_timeout_s
                )
            )
        except InferenceServerException:
            ready = False
        if not ready:
            # Triton may come back with another config: read it again then.
            self._batch_limits.pop((version.model, version.version), None)
        return ready

    async def embed(self, version: ModelVersion, batch: TokenBatch) -> np.ndarray:
        rows = int(batch.input_ids.shape[0])
        try:
            step = await self._batch_limit(version) or max(rows, 1)
            chunks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
            parts = await asyncio.gather(
                *(self._infer(version, batch.input_ids[a:b], batch.attention_mask[a:b]) for a, b in chunks)
            )
        except InferenceServerException as error:
            self._batch_limits.pop((version.model, version.version), None)
            self._log_error("triton inference failed", version, error, rows=rows)
            if error.status() == _DEADLINE_EXCEEDED:
                raise ServiceUnavailable(
                    f"the inference server did not answer for {version.name} within {self._timeout_s:g} s; "
                    "retry later (see /readyz)."
                ) from None
            if error.status() == _NOT_FOUND:
                raise ServiceUnavailable(f"the inference server has not loaded {version.name} (see /readyz).") from None
            raise ServiceUnavailable(
                f"the inference server is unavailable for {version.name}; retry later (see /readyz)."
            ) from None
        return np.concatenate(parts)

    async def _batch_limit(self, version: ModelVersion) -> int:
        """The most rows one request to ``version`` may carry: its max_batch_size in Triton (0 = no limit)."""
        key = (version.model, version.version)
        if key not in self._batch_limits:
            response = await self._client.get_model_config(
                version.model, str(version.version), client_timeout=self._ready_timeout_s
            )
            self._batch_limits[key] = int(response.config.max_batch_size)
            log.info(
                "triton batch limit read",
                extra={"model": version.model, "version": version.version, "max_batch_size": self._batch_limits[key]},
            )
        return self._batch_limits[key]

    async def _infer(self, version: ModelVersion, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        inputs = [
            InferInput(INPUT_IDS, list(input_ids.shape), "INT64"),
            InferInput(ATTENTION_MASK, list(attention_mask.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(input_ids)
        inputs[1].set_data_from_numpy(attention_mask)
        result = await self._client.infer(
            version.model,
            inputs,
            model_version=str(version.version),
            outputs=[InferRequestedOutput(OUTPUT)],
            client_timeout=self._timeout_s,
        )
        vectors = result.as_numpy(OUTPUT)
        if vectors is None or vectors.shape != (len(input_ids), version.dimension):
            log.error("triton returned a malformed output", extra={"model": version.model, "version": version.version})
            raise ServiceUnavailable(f"the inference server answered {version.name} with a malformed output.")
        return np.asarray(vectors, dtype=np.float32)

    def _log_error(self, message: str, version: ModelVersion, error: InferenceServerException, **extra: int) -> None:
        log.error(
            message,
            extra={
                "model": version.model,
                "version": version.version,
                "triton_status": error.status(),
                "triton_message": error.message(),
                **extra,
            },
        )

    async def close(self) -> None:
        await self._client.close()
