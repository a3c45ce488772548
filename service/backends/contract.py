"""The backend contract: token ids in, final (pooled, L2-normalised) vectors out.

Pooling and normalisation live inside the exported ONNX graph, so every backend returns the same
vectors for the same token ids.
"""

from typing import Protocol

import numpy as np

from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch


class Backend(Protocol):
    name: str

    async def start(self, versions: list[ModelVersion]) -> None:
        """Load (or connect to) every version the gateway serves."""

    async def ready(self, version: ModelVersion) -> bool:
        """Whether ``version`` can take inference requests now."""

    async def embed(self, version: ModelVersion, batch: TokenBatch) -> np.ndarray:
        """float32 vectors of shape (batch rows, version.dimension); raises ServiceUnavailable when down."""

    async def close(self) -> None:
        """Release sessions and connections."""
