"""Triton Inference Server backend: token ids go over gRPC to the version's model, vectors come back.

One channel for every request (connections reused); every call has a timeout; every version is
addressed explicitly (``model_version``), so two versions are served side by side during a canary.
Triton's own error text never reaches a client: it is logged, and the client gets a 503 that says
what is unavailable.
"""

import logging

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from service.errors import ServiceUnavailable
from service.model_store import ModelVersion
from service.tokenization import TokenBatch

log = logging.getLogger(__name__)


class TritonBackend:
    name = "triton"

    def __init__(self, url: str, timeout_s: float, ready_timeout_s: float = 1.0) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._client = triton_grpc.InferenceServerClient(url=url)

    async def start(self, versions: list[ModelVersion]) -> None:
        # Triton may come up after the gateway: not being ready yet is reported by /readyz, not fatal.
        for version in versions:
            if not await self.ready(version):
                log.warning(
                    "version not ready in triton yet",
                    extra={"model": version.model, "version": version.version, "triton_url": self.url},
                )

    async def ready(self, version: ModelVersion) -> bool:
        try:
            return bool(
                await self._client.is_model_ready(
                    version.model, str(version.version), client_timeout=self._ready_timeout_s
                )
            )
        except InferenceServerException:
            return False

    async def embed(self, version: ModelVersion, batch: TokenBatch) -> np.ndarray:
        inputs = [
            InferInput("input_ids", list(batch.input_ids.shape), "INT64"),
            InferInput("attention_mask", list(batch.attention_mask.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(batch.input_ids)
        inputs[1].set_data_from_numpy(batch.attention_mask)
        try:
            result = await self._client.infer(
                version.model,
                inputs,
                model_version=str(version.version),
                outputs=[InferRequestedOutput("embedding")],
                client_timeout=self._timeout_s,
            )
        except InferenceServerException as error:
            log.error(
                "triton inference failed",
                extra={
                    "model": version.model,
                    "version": version.version,
                    "triton_status": error.status(),
                    "rows": int(batch.input_ids.shape[0]),
                },
            )
            raise ServiceUnavailable(
                f"the inference server is unavailable for {version.name}; retry later (see /readyz)."
            ) from None
        vectors = result.as_numpy("embedding")
        if vectors is None or vectors.shape != (batch.input_ids.shape[0], version.dimension):
            log.error("triton returned a malformed output", extra={"model": version.model, "version": version.version})
            raise ServiceUnavailable(f"the inference server answered {version.name} with a malformed output.")
        return np.asarray(vectors, dtype=np.float32)

    async def close(self) -> None:
        await self._client.close()
