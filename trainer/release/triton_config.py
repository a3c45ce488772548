"""Triton ``config.pbtxt`` files (text format of Triton's ModelConfig) and the python-backend repository copy.

The model repository written by export is for the official Triton container (``onnxruntime_onnx``
platform, GPU instances). For a Triton with the python backend only (the local CPU one built from the
nvidia-pytriton wheel, or a GPU one without the ONNX Runtime backend), ``write_python_repository``
derives a copy whose versions run the same ``model.onnx`` through ``model.py``; only versions that
verify against their manifest are copied, each with its manifest.

Every config names the sha256 of each of its versions (``Manifest.sha256``, in a parameter keyed by
version): the gateway reads it back from Triton and routes only to versions whose digest is the one it
verified, and the python backend's model.py refuses to load files that do not match it.
"""

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from service.models.manifest import (
    MANIFEST_FILE,
    TRITON_SHA256_PREFIX,
    ManifestError,
    read_manifest,
    triton_sha256_key,
    verify_version,
)

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


def version_digests(model_dir: Path) -> dict[int, str]:
    """The sha256 of every version folder of ``model_dir`` whose manifest reads, by version number (files are not
    hashed: the gateway verifies them against the same manifest before it routes to the version)."""
    digests: dict[int, str] = {}
    for version_dir in (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        try:
            digests[int(version_dir.name)] = read_manifest(version_dir).sha256
        except ManifestError:
            continue  # refused by the gateway anyway
    return digests


def _parameters(digests: dict[int, str]) -> str:
    return "".join(
        f'parameters {{ key: "{triton_sha256_key(version)}" value: {{ string_value: "{digests[version]}" }} }}\n'
        for version in sorted(digests)
    )


def _instance_group(options: TritonOptions) -> str:
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    return f"instance_group [ {{ kind: {kind} count: {options.instance_count} }} ]\n"


def onnx_config(
    model: str, dimension: int, options: TritonOptions = GPU_ONNX, digests: dict[int, str] | None = None
) -> str:
    """The ``onnxruntime_onnx`` config: the tensors the gateway sends, the instances, every version loaded, and
    the sha256 of each version in ``digests``."""
    config = (
        f'name: "{model}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {options.max_batch_size}\n'
        + _TENSORS.format(dimension=dimension)
        + _instance_group(options)
        + _parameters(digests or {})
    )
    if options.tensorrt:
        config += _TENSORRT
    return config


def python_config(
    model: str, dimension: int, options: TritonOptions = CPU_PYTHON, digests: dict[int, str] | None = None
) -> str:
    """The python-backend config: ``model.py`` runs ``model.onnx`` with ONNX Runtime; ``digests`` as in onnx_config.

    On KIND_GPU instances model.py uses ONNX Runtime's CUDA provider (when the Triton environment's
    onnxruntime has it); on KIND_CPU instances the CPU."""
    if options.tensorrt:
        raise ValueError("the TensorRT accelerator is an onnxruntime_onnx option; the python backend ignores it")
    return (
        f'name: "{model}"\nbackend: "python"\nmax_batch_size: {options.max_batch_size}\n'
        + _TENSORS.format(dimension=dimension)
        + _instance_group(options)
        + _parameters(digests or {})
    )


def write_python_repository(source: Path, target: Path, options: TritonOptions = CPU_PYTHON) -> list[str]:
    """Rebuild ``target`` as a python-backend copy of every verified version under ``source``.

    model.onnx is hard-linked when both are on one filesystem (no copy of the weights); the manifest is
    copied beside it (model.py checks model.onnx against it at load). Returns the copied versions as
    name@version."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    copied: list[str] = []
    for model_dir in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        dimension = None
        digests: dict[int, str] = {}
        for version_dir in sorted((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            try:
                manifest = verify_version(version_dir)
            except ManifestError:
                continue  # the gateway refuses it too; Triton must not serve it
            destination = target / model_dir.name / version_dir.name
            destination.mkdir(parents=True)
            _link_or_copy(version_dir / "model.onnx", destination / "model.onnx")
            shutil.copy2(version_dir / MANIFEST_FILE, destination / MANIFEST_FILE)
            shutil.copy2(PYTHON_MODEL_SOURCE, destination / "model.py")
            dimension = manifest.embedding_dimension
            digests[manifest.version] = manifest.sha256
            copied.append(f"{model_dir.name}@{version_dir.name}")
        if dimension is not None:
            config = python_config(model_dir.name, dimension, options, digests)
            (target / model_dir.name / "config.pbtxt").write_text(config)
    return copied


def write_digests(repository: Path) -> list[str]:
    """Set, in the config.pbtxt of every model under ``repository``, the sha256 of each of its versions, and keep
    everything else the config says (for a repository exported before configs carried them). Returns the models
    whose config changed."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    written: list[str] = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config_path = model_dir / "config.pbtxt"
        if not config_path.is_file():
            continue
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        before = text_format.MessageToString(config)
        for key in [key for key in config.parameters if key.startswith(TRITON_SHA256_PREFIX)]:
            del config.parameters[key]
        for version, digest in version_digests(model_dir).items():
            config.parameters[triton_sha256_key(version)].string_value = digest
        after = text_format.MessageToString(config)
        if after != before:
            write_config(model_dir, after)
            written.append(model_dir.name)
    return written


def write_config(model_dir: Path, config: str) -> None:
    """Replace ``model_dir``'s config.pbtxt in one step (a Triton polling the repository never reads half a file)."""
    staged = model_dir / ".config.pbtxt.tmp"
    staged.write_text(config)
    os.replace(staged, model_dir / "config.pbtxt")


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
