"""Triton ``config.pbtxt`` files (text format of Triton's ModelConfig) and the python-backend repository copy.

The model repository written by export is for the official Triton container (``onnxruntime_onnx``
platform, GPU instances). For a CPU-only Triton with the python backend only (the local one built
from the nvidia-pytriton wheel), ``write_python_repository`` derives a copy whose versions run the
same ``model.onnx`` through ``model.py``; only versions that verify against their manifest are copied.
"""

import os
import shutil
from pathlib import Path
from typing import Literal

from service.manifest import ManifestError, verify_version

# Inference batches the gateway sends are at most this many rows; Triton's dynamic batcher may
# merge several requests up to the same size.
MAX_BATCH_SIZE = 64
PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent.parent / "service" / "backends" / "triton_python_model.py"

InstanceKind = Literal["gpu", "cpu"]

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


def onnx_config(
    model: str, dimension: int, instances: InstanceKind = "gpu", instance_count: int = 1, tensorrt: bool = False
) -> str:
    """The ``onnxruntime_onnx`` config: the tensors the gateway sends, GPU (or CPU) instances, every version loaded.

    ``tensorrt`` adds ONNX Runtime's TensorRT execution accelerator (FP16), for GPUs where it pays off."""
    kind = "KIND_GPU" if instances == "gpu" else "KIND_CPU"
    config = (
        f'name: "{model}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        + _TENSORS.format(dimension=dimension)
        + f"instance_group [ {{ kind: {kind} count: {instance_count} }} ]\n"
    )
    if tensorrt and instances == "gpu":
        config += _TENSORRT
    return config


def python_config(model: str, dimension: int, instance_count: int = 1) -> str:
    """The python-backend config: ``model.py`` runs ``model.onnx`` with ONNX Runtime (CUDA when present)."""
    return (
        f'name: "{model}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        + _TENSORS.format(dimension=dimension)
        + f"instance_group [ {{ kind: KIND_CPU count: {instance_count} }} ]\n"
    )


def write_python_repository(source: Path, target: Path) -> list[str]:
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
            (target / model_dir.name / "config.pbtxt").write_text(python_config(model_dir.name, dimension))
    return copied


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
