"""In-process ONNX Runtime backend (the embedded default).

One thread budget for every version: the CPUs the container may use (its cgroup quota, else its CPU
affinity — ``os.cpu_count()`` is the node's, not the pod's), or ``EMBEDSERVE_INFERENCE_THREADS``. Every
version's session may use all of it. By default its threads sleep while they wait, even between the operators
of one batch: threads that busy-wait (spin) gain a few percent on cores the gateway has to itself, but when
another process takes a core (a co-located Milvus, a bulk client, a second version's batch) each operator
waits for the preempted thread, and the tail grows (P99 ×1.3 for single sentences under a bulk upsert in
``make bench-lanes``, ×1.9 beside one busy process). Spinning set ``on`` spins during batches, ``auto`` only
while one version is loaded; neither spins between batches.

Batches side by side (``EMBEDSERVE_INFERENCE_PARALLEL_BATCHES``, by default one per thread): a batch that
starts while none of its version's runs uses every thread (the lowest latency for a lone request); one that
starts beside a running batch runs on its share of the threads, in a second session of the version opened
with that many. Under load every batch runs on one thread of its own: each operator of a batch split over two
threads waits for the slower of them, and the event loop's work preempts one of them often. On 2 cores, raw
ONNX Runtime ran two one-thread batches of 16 side by side 1.03–1.19× as fast as one two-thread batch of 32,
and the gateway at concurrency 32 went from 0.81 to 0.965 of the latter (``make bench``). The second session
costs the version's weights again in memory (+89 MB resident for MiniLM); 1 keeps one batch at a time.

On ``EMBEDSERVE_DEVICE=cuda`` sessions run on ONNX Runtime's CUDA execution provider (the ``onnxruntime-gpu``
build), one batch at a time per version, with inputs and outputs bound once per batch (IO binding) instead of
copied by ``run``.

A batch runs on one of its version's inference threads, and the event loop hands it over by waiting (the GIL
released) until that thread is about to enter ONNX Runtime, at most ``_HANDOVER_WAIT_S``. Left to compete for
the GIL with a busy event loop, the thread waited 3.4 ms on average (Python's 5 ms switch interval) at the start
of each ~50 ms batch at concurrency 32, ONNX Runtime idle meanwhile; handed over, 0.15 ms, which the loop waits.
"""

import asyncio
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.backends.contract import READY, Availability
from service.errors import ServiceUnavailable
from service.models.session import cpu_session
from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
Spinning = Literal["auto", "on", "off"]
# Longest the event loop waits for a version's inference thread to take a batch (one is idle when a batch comes:
# the batcher keeps no more batches in flight than the version has threads); past it, the loop goes on and the
# thread gets the GIL as it can.
_HANDOVER_WAIT_S = 0.005


class DeviceUnavailable(RuntimeError):
    """The device asked for has no execution provider in this ONNX Runtime build."""


@dataclass
class _Loaded:
    """A version's sessions and the threads that run its batches."""

    session: ort.InferenceSession  # every thread: for a batch that runs alone
    narrow: ort.InferenceSession | None  # a share of the threads: for a batch beside others (None: one at a time)
    # One thread per batch that may run at once; ONNX Runtime releases the GIL, so the event loop keeps serving
    # meanwhile. Versions get threads of their own, so during a rollout a slow canary's batches never hold
    # stable's up (they share the cores, not a queue), and each version's latency is its own.
    threads: list[ThreadPoolExecutor]
    # Those of ``threads`` not running a batch, the one that ran last at the end (changed on the event loop
    # only): a lone batch goes to the thread that ran the previous one. Taking turns (one pool of two threads),
    # a single sentence's request took 0.5-0.6 ms longer at concurrency 1 (P50, 10 of 12 alternating rounds).
    idle: list[ThreadPoolExecutor]
    running: int = 0  # batches of the version in ONNX Runtime now; changed under ``lock``
    lock: threading.Lock = field(default_factory=threading.Lock)


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its cgroup CPU quota (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), rounded up, within the CPUs it may run on (``sched_getaffinity``)."""
    affinity = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(affinity, math.ceil(quota))) if quota is not None else affinity


def _cgroup_quota(root: Path) -> float | None:
    try:
        if (root / "cpu.max").is_file():
            limit, period = (root / "cpu.max").read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            limit_us = int((v1 / "cpu.cfs_quota_us").read_text())
            return None if limit_us <= 0 else limit_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        log.warning("cgroup CPU quota unreadable; using the CPU affinity", extra={"cgroup_root": str(root)})
    return None


class OnnxBackend:
    name = "onnx"

    def __init__(
        self, threads: int = 0, device: Device = "cpu", spinning: Spinning = "off", parallel_batches: int = 0
    ) -> None:
        self.threads = threads or available_cpus()
        self.device = device
        # Batches of one version at once (the batcher keeps this many in flight), each beside the others on
        # ``threads // batches_in_flight`` threads: one per thread by default; one at a time on CUDA.
        self.batches_in_flight = 1 if device == "cuda" else min(parallel_batches or self.threads, self.threads)
        self._spinning = spinning
        self._loaded: dict[tuple[str, int], _Loaded] = {}
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceUnavailable(
                "EMBEDSERVE_DEVICE=cuda needs ONNX Runtime's CUDA build: replace onnxruntime with onnxruntime-gpu "
                f"(providers here: {', '.join(ort.get_available_providers())}), or set EMBEDSERVE_DEVICE=cpu."
            )

    async def start(self, versions: list[ModelVersion]) -> None:
        spinning = self._spins(len(versions))
        for version in versions:
            await self._open(version, spinning)
        log.info(
            "onnx thread budget",
            extra={
                "threads": self.threads,
                "batches_in_flight": self.batches_in_flight,
                "versions": len(versions),
                "spinning": spinning,
                "device": self.device,
            },
        )

    async def load(self, version: ModelVersion) -> None:
        # Sessions already open keep how they wait: a version loaded beside others does not spin (auto).
        await self._open(version, self._spins(len(self._loaded) + 1))

    async def unload(self, version: ModelVersion) -> None:
        loaded = self._loaded.pop((version.model, version.version), None)
        if loaded is not None:
            for thread in loaded.threads:
                thread.shutdown(wait=False)

    def _spins(self, versions: int) -> bool:
        return self._spinning == "on" or (self._spinning == "auto" and versions <= 1)

    async def _open(self, version: ModelVersion, spinning: bool) -> None:
        session = await asyncio.to_thread(self._load, version, spinning)
        narrow = None
        if self.batches_in_flight > 1:
            share = self.threads // self.batches_in_flight
            narrow = await asyncio.to_thread(cpu_session, version.onnx_path, share, spinning and share > 1)
        threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnx-{version.name}-{index}")
            for index in range(self.batches_in_flight)
        ]
        self._loaded[(version.model, version.version)] = _Loaded(session, narrow, threads, list(threads))

    def _load(self, version: ModelVersion, spinning: bool) -> ort.InferenceSession:
        if self.device == "cuda":
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads  # the CPU provider's share: ops CUDA does not run
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            session = ort.InferenceSession(str(version.onnx_path), options, providers=providers)
        else:
            session = cpu_session(version.onnx_path, self.threads, spinning)
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
        run = _run_bound if self.device == "cuda" else _run
        # The batcher keeps no more batches in flight than there are threads; past that, the first one's queue.
        taken = loaded.idle.pop() if loaded.idle else None
        thread = taken or loaded.threads[0]
        try:
            entering = threading.Event()
            vectors = asyncio.get_running_loop().run_in_executor(thread, _enter, entering, run, loaded, batch)
            entering.wait(_HANDOVER_WAIT_S)  # blocks the event loop, briefly: see the module's docstring
            return np.asarray(await vectors, dtype=np.float32)
        finally:
            if taken is not None:
                loaded.idle.append(taken)

    async def close(self) -> None:
        for loaded in self._loaded.values():
            for thread in loaded.threads:
                thread.shutdown(wait=False, cancel_futures=True)
        self._loaded.clear()


def _enter(
    entering: threading.Event,
    run: Callable[[ort.InferenceSession, TokenBatch], np.ndarray],
    loaded: _Loaded,
    batch: TokenBatch,
) -> np.ndarray:
    """On an inference thread: say it holds the GIL and is about to run the batch, then run it, on every thread
    when no other batch of the version runs, else beside them on its share."""
    with loaded.lock:
        session = loaded.narrow if loaded.running and loaded.narrow is not None else loaded.session
        loaded.running += 1
    entering.set()
    try:
        return run(session, batch)
    finally:
        with loaded.lock:
            loaded.running -= 1


def _run(session: ort.InferenceSession, batch: TokenBatch) -> np.ndarray:
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return np.asarray(session.run(["embedding"], feeds)[0])


def _run_bound(session: ort.InferenceSession, batch: TokenBatch) -> np.ndarray:
    """One batch on the GPU: inputs copied to the device once, the vectors copied back once."""
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", batch.input_ids)
    binding.bind_cpu_input("attention_mask", batch.attention_mask)
    binding.bind_output("embedding")
    session.run_with_iobinding(binding)
    return np.asarray(binding.copy_outputs_to_cpu()[0])
