"""Every generated config.pbtxt parses as Triton's ModelConfig and names the tensors the gateway sends."""

import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import trainer.__main__ as trainer_cli
from service.backends.triton import ATTENTION_MASK, INPUT_IDS, OUTPUT
from service.models.manifest import TRITON_SHA256_PREFIX, triton_sha256_key, verify_version
from trainer.release.triton_config import (
    MAX_BATCH_SIZE,
    TritonOptions,
    onnx_config,
    python_config,
    read_options,
    write_python_repository,
)

INT64 = model_config_pb2.DataType.Value("TYPE_INT64")
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def assert_gateway_tensors(config: model_config_pb2.ModelConfig, dimension: int) -> None:
    # The names TritonBackend sends and reads, taken from the backend itself.
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (INPUT_IDS, INT64, [-1]),
        (ATTENTION_MASK, INT64, [-1]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [(OUTPUT, FP32, [dimension])]
    assert config.max_batch_size == MAX_BATCH_SIZE
    assert config.HasField("dynamic_batching")
    assert config.version_policy.WhichOneof("policy_choice") == "all"  # a canary needs two versions loaded


def instance_groups(config: model_config_pb2.ModelConfig) -> list[tuple[str, int]]:
    return [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group]


def accelerators(config: model_config_pb2.ModelConfig) -> list[str]:
    return [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator]


@pytest.mark.parametrize(
    ("options", "groups", "expected_accelerators"),
    [
        (TritonOptions(), [("KIND_GPU", 1)], []),
        (TritonOptions(instance_kind="cpu", instance_count=2), [("KIND_CPU", 2)], []),
        (TritonOptions(instance_count=3, tensorrt=True), [("KIND_GPU", 3)], ["tensorrt"]),
    ],
)
def test_onnx_configs_parse(options: TritonOptions, groups: list, expected_accelerators: list) -> None:
    config = parse(onnx_config("minilm", 384, options))
    assert config.name == "minilm" and config.platform == "onnxruntime_onnx"
    assert_gateway_tensors(config, 384)
    assert instance_groups(config) == groups
    assert accelerators(config) == expected_accelerators


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"instance_kind": "cpu", "tensorrt": True}, "TensorRT runs on GPU instances only"),
        ({"instance_count": 0}, "at least one instance"),
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
    ],
)
def test_impossible_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TritonOptions(**options)


def test_the_python_backend_config_takes_gpu_instances() -> None:
    config = parse(python_config("minilm", 384, TritonOptions(instance_kind="gpu", instance_count=2)))
    assert config.backend == "python"
    assert_gateway_tensors(config, 384)
    assert instance_groups(config) == [("KIND_GPU", 2)]
    assert instance_groups(parse(python_config("minilm", 384))) == [("KIND_CPU", 1)]  # the local CPU Triton
    with pytest.raises(ValueError, match="onnxruntime_onnx option"):
        python_config("minilm", 384, TritonOptions(tensorrt=True))


def test_exported_and_python_backend_configs_parse(model_repository: Path, tmp_path: Path) -> None:
    for model, dimension in (("minilm", 384), ("tiny", 32)):
        assert_gateway_tensors(parse((model_repository / model / "config.pbtxt").read_text()), dimension)
    copied = write_python_repository(model_repository, tmp_path / "python")
    assert copied == ["minilm@1", "tiny@1", "tiny@2"]
    for model, dimension in (("minilm", 384), ("tiny", 32)):
        config = parse((tmp_path / "python" / model / "config.pbtxt").read_text())
        assert config.name == model and config.backend == "python"
        assert_gateway_tensors(config, dimension)
        assert instance_groups(config) == [("KIND_CPU", 1)]
    version = tmp_path / "python" / "tiny" / "2"
    assert sorted(p.name for p in version.iterdir()) == ["manifest.json", "model.onnx", "model.py"]
    assert (version / "model.onnx").stat().st_ino == (model_repository / "tiny" / "2" / "model.onnx").stat().st_ino


def named_digests(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items() if key.startswith(TRITON_SHA256_PREFIX)}


def test_every_config_names_the_sha256_of_each_version(model_repository: Path, tmp_path: Path) -> None:
    write_python_repository(model_repository, tmp_path / "python")
    for repository in (model_repository, tmp_path / "python"):
        for model, versions in (("minilm", [1]), ("tiny", [1, 2])):
            config = parse((repository / model / "config.pbtxt").read_text())
            assert named_digests(config) == {
                triton_sha256_key(v): verify_version(model_repository / model / str(v)).sha256 for v in versions
            }, repository


def test_triton_config_names_the_digests_in_a_repository_exported_without_them(
    repository_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = repository_copy / "tiny" / "config.pbtxt"
    options = TritonOptions(instance_count=3, tensorrt=True)
    config_path.write_text(onnx_config("tiny", 32, options) + 'model_warmup [ { name: "kept" batch_size: 1 } ]\n')
    assert named_digests(parse(config_path.read_text())) == {}
    monkeypatch.setattr(sys, "argv", ["python -m trainer", "triton-config", "--repository", str(repository_copy)])
    monkeypatch.setattr(trainer_cli, "configure_logging", lambda level: None)
    trainer_cli.main()
    config = parse(config_path.read_text())
    assert named_digests(config) == {
        triton_sha256_key(v): verify_version(repository_copy / "tiny" / str(v)).sha256 for v in (1, 2)
    }
    # Everything else the config said is kept.
    assert read_options(config_path) == options
    assert [warmup.name for warmup in config.model_warmup] == ["kept"]
    assert_gateway_tensors(config, 32)


def test_the_python_repository_for_a_gpu_triton(model_repository: Path, tmp_path: Path) -> None:
    write_python_repository(model_repository, tmp_path / "python", TritonOptions(instance_kind="gpu"))
    for model in ("minilm", "tiny"):
        assert instance_groups(parse((tmp_path / "python" / model / "config.pbtxt").read_text())) == [("KIND_GPU", 1)]


def test_the_python_repository_skips_versions_that_fail_verification(repository_copy: Path, tmp_path: Path) -> None:
    (repository_copy / "tiny" / "1" / "vocab.txt").write_text("tampered")
    assert write_python_repository(repository_copy, tmp_path / "python") == ["minilm@1", "tiny@2"]
    verify_version(repository_copy / "tiny" / "2")
