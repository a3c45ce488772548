"""The backend contract: token ids in, final (pooled, L2-normalised) vectors out.

Pooling and normalisation live inside the exported ONNX graph, so every backend returns the same
vectors for the same token ids.
"""

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch

# ready: takes inference requests; not_loaded: the backend has not loaded it (yet); content_mismatch: the
# backend serves something under that version that the gateway cannot match to the manifest it verified.
BackendState = Literal["ready", "not_loaded", "content_mismatch"]


@dataclass(frozen=True)
class Availability:
    """Whether a version can take inference requests now and, when not, why (for an operator: what to fix)."""

    state: BackendState
    reason: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


READY = Availability("ready")


class Backend(Protocol):
    name: str
    batches_in_flight: int  # batches of one version it takes at once (the batcher keeps that many in flight)

    async def start(self, versions: list[ModelVersion]) -> None:
        """Load (or connect to) every version the gateway serves."""

    async def load(self, version: ModelVersion) -> None:
        """Make ``version``, found while the gateway runs, ready to serve (hot-loading)."""

    async def unload(self, version: ModelVersion) -> None:
        """Release ``version`` (its folder is gone or changed); its batches have finished."""

    async def availability(self, version: ModelVersion) -> Availability:
        """Whether ``version`` can take inference requests now, and why not."""

    async def embed(self, version: ModelVersion, batch: TokenBatch) -> np.ndarray:
        """float32 vectors of shape (batch rows, version.dimension); raises ServiceUnavailable when down."""

    async def close(self) -> None:
        """Release sessions and connections."""
