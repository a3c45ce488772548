"""Triton ``config.pbtxt`` files (text format of Triton's ModelConfig) and the python-backend repository copy.

The model repository written by export is for the official Triton container (``onnxruntime_onnx``
platform, GPU instances). For a Triton with the python backend only (the local CPU one built from the
nvidia-pytriton wheel, or a GPU one without the ONNX Runtime backend), ``write_python_repository``
derives a copy whose versions run the same ``model.onnx`` through ``model.py``; only versions that
verify against their manifest are copied.
"""

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from service.models.manifest import ManifestError, verify_version

# Rows Triton takes in one request; its dynamic batcher merges requests up to the same size. The
# gateway reads it from Triton and splits larger batches, so EMBEDSERVE_MAX_BATCH_SIZE may exceed it.
MAX_BATCH_SIZE = 64
PYTHON_MODEL_SOURCE = Path(__file__).resolve().parents[2] / "service" / "backends" / "triton_python_model.py"

InstanceKind = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class TritonOptions:
    """How Triton runs a model: on which device kind, how many instances, with TensorRT or not."""

    instance_kind: InstanceKind = "gpu"
    # Model instances (per GPU for KIND_GPU): more overlap requests on one device.
    instance_count: int = 1
    # ONNX Runtime's TensorRT execution accelerator (FP16); onnxruntime_onnx on GPU instances only.
    tensorrt: bool = False
    max_batch_size: int = MAX_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.instance_count < 1:
            raise ValueError(f"a Triton model needs at least one instance, not {self.instance_count}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {self.max_batch_size}")
        if self.tensorrt and self.instance_kind != "gpu":
            raise ValueError("TensorRT runs on GPU instances only (use instance kind gpu)")


GPU_ONNX = TritonOptions()
CPU_PYTHON = TritonOptions(instance_kind="cpu")


@dataclass(frozen=True)
class TritonChanges:
    """What an export changes in a model's config.pbtxt; None keeps what the config says (a model's GPU
    settings must survive the export of its next version by someone who did not pass them again)."""

    instance_kind: InstanceKind | None = None
    instance_count: int | None = None
    tensorrt: bool | None = None

    def applied_to(self, options: TritonOptions) -> TritonOptions:
        tensorrt = self.tensorrt
        if tensorrt is None:  # kept, unless instances move to the CPU, where TensorRT cannot run
            tensorrt = False if self.instance_kind == "cpu" else options.tensorrt
        return replace(
            options,
            instance_kind=self.instance_kind or options.instance_kind,
            instance_count=options.instance_count if self.instance_count is None else self.instance_count,
            tensorrt=tensorrt,
        )


def read_options(config_path: Path) -> TritonOptions | None:
    """The options of an existing ``onnxruntime_onnx`` config.pbtxt (None when there is none)."""
    if not config_path.is_file():
        return None
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    group = config.instance_group[0] if config.instance_group else None
    cpu = group is not None and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    return TritonOptions(
        instance_kind="cpu" if cpu else "gpu",
        instance_count=group.count if group is not None and group.count > 0 else 1,
        tensorrt=any(accelerator.name == "tensorrt" for accelerator in accelerators),
        max_batch_size=config.max_batch_size or MAX_BATCH_SIZE,
    )


_TENSORS = """input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {dimension} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
# Every version stays loaded: a canary rollout serves two at once.
version_policy {{ all {{ }} }}
"""

_TENSORRT = """optimization { execution_accelerators {
  gpu_execution_accelerator: [ {
    name: "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
    parameters { key: "max_workspace_size_bytes" value: "1073741824" }
  } ]
} }
"""


def _instance_group(options: TritonOptions) -> str:
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    return f"instance_group [ {{ kind: {kind} count: {options.instance_count} }} ]\n"


def onnx_config(model: str, dimension: int, options: TritonOptions = GPU_ONNX) -> str:
    """The ``onnxruntime_onnx`` config: the tensors the gateway sends, the instances, every version loaded."""
    config = (
        f'name: "{model}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {options.max_batch_size}\n'
        + _TENSORS.format(dimension=dimension)
        + _instance_group(options)
    )
    if options.tensorrt:
        config += _TENSORRT
    return config


def python_config(model: str, dimension: int, options: TritonOptions = CPU_PYTHON) -> str:
    """The python-backend config: ``model.py`` runs ``model.onnx`` with ONNX Runtime.

    On KIND_GPU instances model.py uses ONNX Runtime's CUDA provider (when the Triton environment's
    onnxruntime has it); on KIND_CPU instances the CPU."""
    if options.tensorrt:
        raise ValueError("the TensorRT accelerator is an onnxruntime_onnx option; the python backend ignores it")
    return (
        f'name: "{model}"\nbackend: "python"\nmax_batch_size: {options.max_batch_size}\n'
        + _TENSORS.format(dimension=dimension)
        + _instance_group(options)
    )


def write_python_repository(source: Path, target: Path, options: TritonOptions = CPU_PYTHON) -> list[str]:
    """Rebuild ``target`` as a python-backend copy of every verified version under ``source``.

    model.onnx is hard-linked when both are on one filesystem (no copy of the weights). Returns the
    copied versions as name@version."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    copied: list[str] = []
    for model_dir in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        dimension = None
        for version_dir in sorted((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            try:
                manifest = verify_version(version_dir)
            except ManifestError:
                continue  # the gateway refuses it too; Triton must not serve it
            destination = target / model_dir.name / version_dir.name
            destination.mkdir(parents=True)
            _link_or_copy(version_dir / "model.onnx", destination / "model.onnx")
            shutil.copy2(PYTHON_MODEL_SOURCE, destination / "model.py")
            dimension = manifest.embedding_dimension
            copied.append(f"{model_dir.name}@{version_dir.name}")
        if dimension is not None:
            (target / model_dir.name / "config.pbtxt").write_text(python_config(model_dir.name, dimension, options))
    return copied


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
