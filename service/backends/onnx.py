"""In-process ONNX Runtime backend (the embedded default)."""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.backends.contract import READY, Availability
from service.errors import ServiceUnavailable
from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loaded:
    """A version's session and the one thread that runs it."""

    session: ort.InferenceSession
    # One inference at a time per version: each run already uses every core through intra-op threads,
    # and ONNX Runtime releases the GIL so the event loop keeps serving meanwhile. Versions get a thread
    # each, so during a rollout a slow canary's batches never hold stable's up (they share the cores, not a
    # queue), and each version's latency is its own.
    thread: ThreadPoolExecutor


class OnnxBackend:
    name = "onnx"

    def __init__(self, intra_op_threads: int = 0) -> None:
        self._intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self._loaded: dict[tuple[str, int], _Loaded] = {}

    async def start(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            session = await asyncio.to_thread(self._load, version)
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnx-{version.name}")
            self._loaded[(version.model, version.version)] = _Loaded(session, thread)

    def _load(self, version: ModelVersion) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(version.onnx_path), options, providers=["CPUExecutionProvider"])
        log.info("onnx session loaded", extra={"model": version.model, "version": version.version})
        return session

    async def availability(self, version: ModelVersion) -> Availability:
        if (version.model, version.version) in self._loaded:
            return READY
        return Availability("not_loaded", "no ONNX Runtime session for it in this gateway")

    async def embed(self, version: ModelVersion, batch: TokenBatch) -> np.ndarray:
        loaded = self._loaded.get((version.model, version.version))
        if loaded is None:
            raise ServiceUnavailable(f"model version {version.name} is not loaded; check /readyz.")
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(loaded.thread, loaded.session.run, ["embedding"], feeds)
        return np.asarray(outputs[0], dtype=np.float32)

    async def close(self) -> None:
        for loaded in self._loaded.values():
            loaded.thread.shutdown(wait=False, cancel_futures=True)
        self._loaded.clear()
