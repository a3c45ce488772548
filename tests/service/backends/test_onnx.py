"""The in-process backend: its thread budget (the container's CPUs, not the node's, shared by every version),
spinning and device."""

import os
from pathlib import Path

import onnxruntime as ort
import pytest

from service.backends.onnx import DeviceUnavailable, OnnxBackend, available_cpus
from service.models.store import ModelStore

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
    return {
        loaded.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        for loaded in backend._loaded.values()
    }


async def test_one_version_spins_several_share_the_budget_without_spinning(model_repository: Path) -> None:
    store = ModelStore.scan(model_repository)
    tiny = store.versions_of("tiny")
    alone, shared = OnnxBackend(threads=2), OnnxBackend()
    try:
        await alone.start(tiny[:1])
        await shared.start(tiny)
        assert spinning(alone) == {"1"}
        assert spinning(shared) == {"0"}
        assert shared.threads == available_cpus()
        assert {loaded.session.get_session_options().intra_op_num_threads for loaded in shared._loaded.values()} == {
            shared.threads
        }
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
