"""Every generated config.pbtxt parses as Triton's ModelConfig and names the tensors the gateway sends."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from service.manifest import verify_version
from trainer.triton_config import onnx_config, write_python_repository

INT64 = model_config_pb2.DataType.Value("TYPE_INT64")
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def assert_gateway_tensors(config: model_config_pb2.ModelConfig, dimension: int) -> None:
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input_ids", INT64, [-1]),
        ("attention_mask", INT64, [-1]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("embedding", FP32, [dimension])]
    assert config.max_batch_size >= 32  # the gateway's default batch
    assert config.HasField("dynamic_batching")
    assert config.version_policy.WhichOneof("policy_choice") == "all"  # a canary needs two versions loaded


@pytest.mark.parametrize(
    ("text", "kind", "accelerators"),
    [
        (onnx_config("minilm", 384), "KIND_GPU", 0),
        (onnx_config("minilm", 384, instances="cpu"), "KIND_CPU", 0),
        (onnx_config("minilm", 384, tensorrt=True), "KIND_GPU", 1),
    ],
)
def test_onnx_configs_parse(text: str, kind: str, accelerators: int) -> None:
    config = parse(text)
    assert config.name == "minilm" and config.platform == "onnxruntime_onnx"
    assert_gateway_tensors(config, 384)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == kind
    gpu_accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert len(gpu_accelerators) == accelerators
    if accelerators:
        assert gpu_accelerators[0].name == "tensorrt"


def test_exported_and_python_backend_configs_parse(model_repository: Path, tmp_path: Path) -> None:
    for model, dimension in (("minilm", 384), ("tiny", 32)):
        assert_gateway_tensors(parse((model_repository / model / "config.pbtxt").read_text()), dimension)
    copied = write_python_repository(model_repository, tmp_path / "python")
    assert copied == ["minilm@1", "tiny@1", "tiny@2"]
    config = parse((tmp_path / "python" / "tiny" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert_gateway_tensors(config, 32)
    version = tmp_path / "python" / "tiny" / "2"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py"]
    assert (version / "model.onnx").stat().st_ino == (model_repository / "tiny" / "2" / "model.onnx").stat().st_ino


def test_the_python_repository_skips_versions_that_fail_verification(repository_copy: Path, tmp_path: Path) -> None:
    (repository_copy / "tiny" / "1" / "vocab.txt").write_text("tampered")
    assert write_python_repository(repository_copy, tmp_path / "python") == ["minilm@1", "tiny@2"]
    verify_version(repository_copy / "tiny" / "2")
