"""The in-process backend: its thread budget (the container's CPUs, not the node's, shared by every version),
batches side by side, spinning and device."""

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.backends.onnx import DeviceUnavailable, OnnxBackend, available_cpus
from service.models.store import ModelStore, ModelVersion
from service.models.tokenization import TokenBatch, pad_batch
from service.settings import Settings

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    """A cgroup folder holding ``files`` (no container here has a CPU quota to read)."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still gets a thread
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, min(2, AFFINITY)),  # 1.5 CPUs: rounded up, within the affinity
        ({"cpu.max": "6400000 100000\n"}, AFFINITY),  # a quota above the CPUs it may run on
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # no quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),
        ({"cpu.max": "garbage\n"}, AFFINITY),
        ({}, AFFINITY),  # no cgroup files at all
    ],
)
def test_the_budget_is_the_cgroup_quota_within_the_affinity(tmp_path: Path, files: dict[str, str], expected: int):
    assert available_cpus(cgroup(tmp_path, files)) == expected


def spinning(backend: OnnxBackend) -> set[str]:
    """Each loaded session's spinning while it runs a batch; every one must stop spinning between batches."""
    options = [loaded.session.get_session_options() for loaded in backend._loaded.values()]
    assert {option.get_session_config_entry("session.force_spinning_stop") for option in options} == {"1"}
    return {option.get_session_config_entry("session.intra_op.allow_spinning") for option in options}


async def test_by_default_no_version_spins_and_every_one_shares_the_budget(model_repository: Path) -> None:
    store = ModelStore.scan(model_repository)
    tiny = store.versions_of("tiny")
    defaults = Settings.model_fields  # the settings' defaults, whatever this shell's environment says
    backend = OnnxBackend(defaults["inference_threads"].default, spinning=defaults["inference_spinning"].default)
    try:
        await backend.start(tiny)
        assert len(tiny) > 1 and spinning(backend) == {"0"}
        assert backend.threads == available_cpus()
        assert {loaded.session.get_session_options().intra_op_num_threads for loaded in backend._loaded.values()} == {
            backend.threads
        }
    finally:
        await backend.close()


async def test_auto_spins_with_one_version_and_stops_beside_another(model_repository: Path) -> None:
    tiny = ModelStore.scan(model_repository).versions_of("tiny")
    alone, shared = OnnxBackend(threads=2, spinning="auto"), OnnxBackend(spinning="auto")
    try:
        await alone.start(tiny[:1])
        await shared.start(tiny)
        assert spinning(alone) == {"1"}
        assert spinning(shared) == {"0"}
    finally:
        await alone.close()
        await shared.close()


@pytest.mark.parametrize(("setting", "versions", "expected"), [("on", 2, "1"), ("off", 1, "0"), ("auto", 1, "1")])
async def test_spinning_can_be_set_either_way(model_repository: Path, setting: str, versions: int, expected: str):
    backend = OnnxBackend(threads=1, spinning=setting)  # type: ignore[arg-type]
    try:
        await backend.start(ModelStore.scan(model_repository).versions_of("tiny")[:versions])
        assert spinning(backend) == {expected}
    finally:
        await backend.close()


def test_cuda_without_onnx_runtimes_cuda_build_is_refused_with_how_to_fix() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    with pytest.raises(DeviceUnavailable, match=r"onnxruntime-gpu.*EMBEDSERVE_DEVICE=cpu"):
        OnnxBackend(device="cuda")


def batch_of(version: ModelVersion, texts: list[str]) -> TokenBatch:
    return pad_batch(version.tokenizer.encode(texts, truncate=True), version.tokenizer.pad_id)


class HeldSession:
    """A real session whose runs wait until ``hold`` is set: a batch that is still running when the next starts."""

    def __init__(self, session: ort.InferenceSession, hold: threading.Event) -> None:
        self._session = session
        self._hold = hold

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._hold.wait(10)
        return self._session.run(*args, **kwargs)


async def test_by_default_a_version_runs_a_batch_per_thread_each_on_one(model_repository: Path) -> None:
    version = ModelStore.scan(model_repository).versions_of("tiny")[0]
    defaults = Settings.model_fields
    side_by_side = OnnxBackend(threads=2, parallel_batches=defaults["inference_parallel_batches"].default)
    one_at_a_time = OnnxBackend(threads=2, parallel_batches=1)
    try:
        await side_by_side.start([version])
        await one_at_a_time.start([version])
        assert side_by_side.batches_in_flight == 2  # the batcher keeps two in flight
        loaded = side_by_side._loaded[(version.model, version.version)]
        assert loaded.session.get_session_options().intra_op_num_threads == 2  # a lone batch: every thread
        assert loaded.narrow is not None and loaded.narrow.get_session_options().intra_op_num_threads == 1
        assert one_at_a_time.batches_in_flight == 1
        assert one_at_a_time._loaded[(version.model, version.version)].narrow is None  # one session: less memory
    finally:
        await side_by_side.close()
        await one_at_a_time.close()


async def test_a_batch_beside_a_running_one_runs_on_its_own_thread_and_gets_the_same_vectors(
    model_repository: Path,
) -> None:
    version = ModelStore.scan(model_repository).versions_of("tiny")[0]
    backend = OnnxBackend(threads=2)
    texts = ["a short one", "a somewhat longer input about search and vectors", "x"]
    try:
        await backend.start([version])
        alone = await backend.embed(version, batch_of(version, texts))
        loaded = backend._loaded[(version.model, version.version)]
        hold = threading.Event()
        loaded.session = HeldSession(loaded.session, hold)  # type: ignore[assignment]
        running = asyncio.create_task(backend.embed(version, batch_of(version, ["held on every thread"] * 4)))
        while loaded.running == 0:  # until its thread is in the (held) session's run
            await asyncio.sleep(0.001)
        # On the session of every thread this would wait for the held batch; on its own thread it does not.
        beside = await asyncio.wait_for(backend.embed(version, batch_of(version, texts)), 5)
        hold.set()
        assert (await running).shape == (4, version.dimension)
        np.testing.assert_allclose(beside, alone, atol=1e-5)
        # Once the held batch is done, a batch runs alone again: on every thread (the held session's).
        hold.clear()
        lone = asyncio.create_task(backend.embed(version, batch_of(version, texts)))
        await asyncio.sleep(0.2)
        assert not lone.done()
        hold.set()
        np.testing.assert_allclose(await lone, alone, atol=1e-5)
    finally:
        await backend.close()


class ThreadRecordingSession:
    """A real session that records the thread of each run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.threads: list[int] = []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._session.run(*args, **kwargs)


async def test_a_lone_batch_runs_on_the_thread_that_ran_the_previous_one(model_repository: Path) -> None:
    """Its caches still hold the last run's buffers: two threads taking turns made c=1 0.5 ms slower."""
    version = ModelStore.scan(model_repository).versions_of("tiny")[0]
    backend = OnnxBackend(threads=2)
    batch = batch_of(version, ["a short one", "a somewhat longer input about search and vectors"])
    try:
        await backend.start([version])
        loaded = backend._loaded[(version.model, version.version)]
        hold = threading.Event()
        loaded.session = HeldSession(loaded.session, hold)  # type: ignore[assignment]
        running = asyncio.create_task(backend.embed(version, batch))
        while loaded.running == 0:
            await asyncio.sleep(0.001)
        await backend.embed(version, batch)  # beside it, on the other thread: both threads have run a batch
        hold.set()
        await running
        wide = ThreadRecordingSession(loaded.session._session)  # type: ignore[attr-defined]
        loaded.session = wide  # type: ignore[assignment]
        for _ in range(6):
            await backend.embed(version, batch)
        assert len(wide.threads) == 6 and len(set(wide.threads)) == 1
    finally:
        await backend.close()
