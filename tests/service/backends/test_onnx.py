"""The in-process backend: its thread budget (the container's CPUs, not the node's, shared by every version),
spinning and device."""

import os
from pathlib import Path

import onnxruntime as ort
import pytest

from service.backends.onnx import DeviceUnavailable, OnnxBackend, available_cpus
from service.models.store import ModelStore
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
