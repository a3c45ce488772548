"""model.py of the python-backend copy: which ONNX Runtime providers an instance gets, and its tensor names.

The module runs inside Triton's python stub; here triton_python_backend_utils (which only the stub
provides) is an empty stand-in, enough to import it and call its pure functions.
"""

import importlib
import sys
import types
from collections.abc import Iterator

import pytest

from service.backends.triton import ATTENTION_MASK, INPUT_IDS, OUTPUT

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
