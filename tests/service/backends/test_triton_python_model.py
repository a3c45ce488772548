"""model.py of the python-backend copy: which ONNX Runtime providers an instance gets, its tensor names, and
its check of its own files.

The module runs inside Triton's python stub; here triton_python_backend_utils (which only the stub
provides) is an empty stand-in, enough to import it and call its pure functions.
"""

import importlib
import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.backends.triton import ATTENTION_MASK, INPUT_IDS, OUTPUT, REFUSED
from service.models.manifest import TRITON_SHA256_PREFIX, verify_version

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@pytest.fixture
def model_py(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.delitem(sys.modules, "service.backends.triton_python_model", raising=False)
    yield importlib.import_module("service.backends.triton_python_model")
    sys.modules.pop("service.backends.triton_python_model", None)


def test_a_gpu_instance_runs_on_its_own_cuda_device(model_py: types.ModuleType) -> None:
    providers, fallback = model_py.choose_providers("GPU", 3, [CUDA, CPU])
    assert providers == [(CUDA, {"device_id": 3}), CPU] and fallback is None


def test_a_gpu_instance_without_cuda_falls_back_to_the_cpu_and_says_why(model_py: types.ModuleType) -> None:
    providers, fallback = model_py.choose_providers("GPU", 0, [CPU])
    assert providers == [CPU]
    assert fallback is not None and "CUDAExecutionProvider" in fallback and "onnxruntime-gpu" in fallback


@pytest.mark.parametrize("kind", ["CPU", "MODEL"])
def test_other_instances_stay_on_the_cpu_even_where_cuda_exists(model_py: types.ModuleType, kind: str) -> None:
    assert model_py.choose_providers(kind, 0, [CUDA, CPU]) == ([CPU], None)


def test_model_py_reads_and_writes_the_tensors_the_gateway_uses(model_py: types.ModuleType) -> None:
    assert model_py.INPUT_NAMES == (INPUT_IDS, ATTENTION_MASK)
    assert model_py.OUTPUT_NAME == OUTPUT


def test_model_py_names_digests_and_refusals_as_the_gateway_does(model_py: types.ModuleType) -> None:
    assert model_py.SHA256_PREFIX == TRITON_SHA256_PREFIX
    assert model_py.REFUSED == REFUSED


def python_copy(model_repository: Path, tmp_path: Path) -> Path:
    """tiny@2 as the python-backend copy lays it out: model.onnx (a copy of its own here), the manifest."""
    version_dir = tmp_path / "2"
    version_dir.mkdir()
    for name in ("model.onnx", "manifest.json"):
        shutil.copy(model_repository / "tiny" / "2" / name, version_dir / name)
    return version_dir


def test_model_py_accepts_the_files_its_manifest_and_config_name(
    model_py: types.ModuleType, model_repository: Path, tmp_path: Path
) -> None:
    version_dir = python_copy(model_repository, tmp_path)
    digest = verify_version(model_repository / "tiny" / "2").sha256
    files = json.loads((version_dir / "manifest.json").read_text())["files"]
    assert model_py.version_digest(files) == digest  # Manifest.sha256, computed without the `service` package
    assert model_py.content_problem(version_dir, digest) is None
    assert model_py.content_problem(version_dir, None) is None  # naming none is the gateway's to refuse


def test_model_py_refuses_changed_or_unnamed_files(
    model_py: types.ModuleType, model_repository: Path, tmp_path: Path
) -> None:
    version_dir = python_copy(model_repository, tmp_path)
    digest = verify_version(model_repository / "tiny" / "2").sha256
    other = verify_version(model_repository / "tiny" / "1").sha256
    assert "config.pbtxt names" in model_py.content_problem(version_dir, other)
    onnx = bytearray((version_dir / "model.onnx").read_bytes())
    onnx[len(onnx) // 2] ^= 0xFF
    (version_dir / "model.onnx").write_bytes(bytes(onnx))
    assert "model.onnx does not match its sha256" in model_py.content_problem(version_dir, digest)
    (version_dir / "manifest.json").unlink()
    assert "triton-repository" in model_py.content_problem(version_dir, digest)
