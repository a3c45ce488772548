"""Export writes immutable, checksummed versions in Triton's layout."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from transformers import RobertaConfig, RobertaModel
from tritonclient.grpc import model_config_pb2

import trainer.__main__ as trainer_cli
from service.models.manifest import file_sha256, triton_sha256_key, verify_version
from service.models.tokenization import TextTokenizer
from tests.conftest import TINY_DIMENSION, export_tiny
from trainer.config import ExportGraph, TrainConfig
from trainer.data.sample_text import paragraphs, sentences
from trainer.encoder import SentenceEncoder, from_scratch, packaged_minilm
from trainer.release.export import ExportRefused, ExportRequest, embed_with_onnx, embed_with_torch, export_version
from trainer.train import train


def test_export_writes_the_next_version_with_a_manifest_of_every_file(tmp_path: Path) -> None:
    first = export_tiny(tmp_path, model="m", seed=1)
    second = export_tiny(tmp_path, model="m", seed=2)
    assert (first.name, second.name) == ("1", "2")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "config.pbtxt"]  # no staging left
    manifest = verify_version(second)
    assert manifest.model == "m" and manifest.version == 2
    assert set(manifest.files) == {
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    }
    for name, digest in manifest.files.items():
        assert digest.sha256 == file_sha256(second / name)
    assert manifest.embedding_dimension == TINY_DIMENSION and manifest.max_seq_length == 64
    stats = manifest.reference_stats
    assert stats is not None and len(stats.mean) == TINY_DIMENSION and stats.count == 64
    assert abs(stats.norm_quantiles["0.5"] - 1.0) < 1e-4  # unit vectors
    assert json.loads((second / "manifest.json").read_text())["source"] == "test:random-init seed=2"
    # Triton's config names the sha256 of every version, each written before its folder appeared.
    config = text_format.Parse((tmp_path / "m" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert {key: value.string_value for key, value in config.parameters.items()} == {
        triton_sha256_key(1): verify_version(first).sha256,
        triton_sha256_key(2): manifest.sha256,
    }


def test_the_model_config_is_tritons_onnx_layout(tmp_path: Path) -> None:
    export_tiny(tmp_path, model="m")
    config = (tmp_path / "m" / "config.pbtxt").read_text()
    for expected in (
        'name: "m"',
        'platform: "onnxruntime_onnx"',
        'name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ]',
        'name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ]',
        f'name: "embedding" data_type: TYPE_FP32 dims: [ {TINY_DIMENSION} ]',
        "dynamic_batching",
        "version_policy { all { } }",
    ):
        assert expected in config


def two_step_run(tmp_path: Path) -> TrainConfig:
    """A 2-step run of a tiny scratch encoder, checkpointed at step 2: something for the export command."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([*paragraphs(), *sentences()]))
    config = TrainConfig.model_validate(
        {
            "run_name": "cli",
            "output_dir": str(tmp_path / "runs"),
            "corpus": {"path": str(corpus)},
            "encoder": {
                "base_model": None,
                "scratch": {"vocab_size": 1500, "hidden_size": 32, "layers": 1, "heads": 2, "max_seq_length": 32},
            },
            "optim": {"max_steps": 2, "batch_size": 8, "warmup_steps": 1},
            "checkpoint": {"every_steps": 2},
            "monitor": {"eval_every_steps": 2, "validation_sample": 16, "min_effective_rank": 1.0},
            # The gate off: these tests export one checkpoint several times (the gate has its own tests).
            "export": {"model": "cli", "repository": str(tmp_path / "repository"), "gate": {"enabled": False}},
        }
    )
    train(config)
    return config


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["python -m trainer", *args])
    monkeypatch.setattr(trainer_cli, "configure_logging", lambda level: None)  # keep pytest's log capture
    trainer_cli.main()


def test_the_export_command_writes_the_triton_options_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = two_step_run(tmp_path)
    checkpoint = str(config.run_dir / "checkpoints" / "step-00000002.pt")
    run_cli(monkeypatch, "export", "--checkpoint", checkpoint, "--tensorrt", "--triton-instances", "3")
    written = text_format.Parse(
        (tmp_path / "repository" / "cli" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in written.instance_group] == [
        ("KIND_GPU", 3)
    ]
    assert [a.name for a in written.optimization.execution_accelerators.gpu_execution_accelerator] == ["tensorrt"]
    verify_version(tmp_path / "repository" / "cli" / "1")

    with pytest.raises(SystemExit) as refused:
        run_cli(monkeypatch, "export", "--checkpoint", checkpoint, "--tensorrt", "--triton-instance-kind", "cpu")
    assert refused.value.code == 2
    assert "TensorRT runs on GPU instances only" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "repository" / "cli").iterdir()) == ["1", "config.pbtxt"]

    # The next export without flags keeps the model's Triton settings; flags change only what they name.
    def exported_options() -> tuple[list[tuple[str, int]], list[str]]:
        config = text_format.Parse(
            (tmp_path / "repository" / "cli" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        groups = [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group]
        return groups, [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator]

    run_cli(monkeypatch, "export", "--checkpoint", checkpoint)
    assert exported_options() == ([("KIND_GPU", 3)], ["tensorrt"])
    run_cli(monkeypatch, "export", "--checkpoint", checkpoint, "--no-tensorrt")
    assert exported_options() == ([("KIND_GPU", 3)], [])
    run_cli(monkeypatch, "export", "--checkpoint", checkpoint, "--tensorrt", "--triton-instances", "2")
    run_cli(monkeypatch, "export", "--checkpoint", checkpoint, "--triton-instance-kind", "cpu")
    assert exported_options() == ([("KIND_CPU", 2)], [])  # CPU instances: TensorRT dropped with them
    versions = sorted(p.name for p in (tmp_path / "repository" / "cli").iterdir())
    assert versions == ["1", "2", "3", "4", "5", "config.pbtxt"]


class BranchyEncoder(SentenceEncoder):
    """Python control flow on the input: tracing freezes one branch, so ONNX disagrees with torch."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = super().forward(input_ids, attention_mask)
        return vectors if int(input_ids.shape[1]) <= 8 else torch.flip(vectors, dims=[1])


def test_export_refuses_when_onnx_disagrees_with_torch(tmp_path: Path) -> None:
    tiny = from_scratch(vocab_size=30522, hidden_size=32, layers=1, heads=2, max_seq_length=64)
    encoder = BranchyEncoder(tiny.transformer, 64)
    request = ExportRequest(
        model="m", source="test", tokenizer_dir=packaged_minilm().path, validation_texts=list(sentences()[:16])
    )
    with pytest.raises(ExportRefused, match="ONNX output differs from torch"):
        export_version(encoder, request, tmp_path)
    assert not any(p.name.isdigit() for p in (tmp_path / "m").iterdir())
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "m").iterdir())


def test_int8_is_a_version_of_its_own_with_its_agreement_recorded(repository_copy: Path) -> None:
    from trainer.release.quantize import quantize_version

    written = quantize_version(repository_copy / "minilm" / "1", list(sentences()[:64]))
    manifest = verify_version(written)
    assert (written.name, manifest.precision, manifest.parent_version) == ("2", "int8", 1)
    # Quantised from the unpadded fp32 graph, and says so.
    assert manifest.graph_optimization == verify_version(repository_copy / "minilm" / "1").graph_optimization
    agreement = manifest.notes["fp32_agreement"]
    assert agreement["mean_cosine"] >= 0.98, agreement  # per-channel: ~0.99 on MiniLM
    assert 0 <= manifest.notes["batch_composition"]["max_cosine_distance_alone_vs_batch_of_32"] < 0.05
    assert (written / "model.onnx").stat().st_size < (
        repository_copy / "minilm" / "1" / "model.onnx"
    ).stat().st_size / 2
    # Triton's config names the new version's sha256 too (the gateway routes to no version it cannot match).
    config = text_format.Parse(
        (repository_copy / "minilm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.parameters[triton_sha256_key(2)].string_value == manifest.sha256
    assert (
        config.parameters[triton_sha256_key(1)].string_value == verify_version(repository_copy / "minilm" / "1").sha256
    )


def tiny_request(graph: ExportGraph = "unpadded") -> ExportRequest:
    return ExportRequest(
        model="m",
        source="test",
        tokenizer_dir=packaged_minilm().path,
        validation_texts=list(sentences()[:16]),
        graph=graph,
    )


def served_and_torch(written: Path, encoder: SentenceEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The version's vectors (its graph opened as the gateway opens it) and the torch encoder's, for ``texts``."""
    tokenizer = TextTokenizer(written / "tokenizer.json", encoder.max_seq_length)
    return embed_with_onnx(written / "model.onnx", tokenizer, texts), embed_with_torch(encoder.eval(), tokenizer, texts)


def test_the_default_graph_computes_on_real_tokens_only_and_matches_torch(tmp_path: Path) -> None:
    written = export_tiny(tmp_path)  # 2 layers
    optimization = verify_version(written).graph_optimization
    assert optimization is not None and optimization.padding_removed
    ops = Counter(node.op_type for node in onnx.load(str(written / "model.onnx")).graph.node)
    assert ops["NonZero"] == 1  # the real tokens, gathered once
    assert not {"Attention", "MultiHeadAttention", "Gemm"} & set(ops)  # standard operators; MatMuls INT8 can rewrite
    # Mixed lengths in one batch (sentences padded to paragraphs' length): what torch computes, to 0.9999.
    encoder = from_scratch(vocab_size=30522, hidden_size=TINY_DIMENSION, layers=2, heads=2, max_seq_length=64)
    texts = [text for pair in zip(paragraphs()[:8], sentences()[:8], strict=True) for text in pair]
    served, expected = served_and_torch(written, encoder, texts)
    assert float((served * expected).sum(axis=1).min()) >= 0.9999
    # A text's vector does not depend on how much padding its batch gave it.
    alone, _ = served_and_torch(written, encoder, [texts[1]])
    assert float(np.abs(alone[0] - served[1]).max()) < 1e-5


def test_an_encoder_that_cannot_be_unpadded_gets_the_fused_graph(tmp_path: Path) -> None:
    # RoBERTa numbers positions from the padding, not from the column: the rewrite is BERT's only.
    config = RobertaConfig(
        vocab_size=30522, hidden_size=TINY_DIMENSION, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=4 * TINY_DIMENSION, max_position_embeddings=66,
    )  # fmt: skip
    torch.manual_seed(0)
    roberta = SentenceEncoder(RobertaModel(config, add_pooling_layer=False), 64)
    written = export_version(roberta, tiny_request(), tmp_path)
    optimization = verify_version(written).graph_optimization
    assert optimization is not None and not optimization.padding_removed
    texts = [*paragraphs()[:4], *sentences()[:4]]
    served, expected = served_and_torch(written, roberta, texts)
    assert float((served * expected).sum(axis=1).min()) >= 0.9999


def test_a_fused_graph_is_exported_on_request_and_its_parity_is_checked_on_it(tmp_path: Path) -> None:
    encoder = from_scratch(vocab_size=30522, hidden_size=TINY_DIMENSION, layers=2, heads=2, max_seq_length=64)
    written = export_version(encoder, tiny_request("fused"), tmp_path)
    manifest = verify_version(written)
    ops = Counter(node.op_type for node in onnx.load(str(written / "model.onnx")).graph.node)
    assert manifest.graph_optimization is not None and not manifest.graph_optimization.padding_removed
    assert manifest.graph_optimization.fused == {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2}
    assert (ops["Attention"], ops["EmbedLayerNormalization"], ops["BiasGelu"]) == (2, 1, 2)
    assert ops["SkipLayerNormalization"] == 0  # slower on ONNX Runtime's CPU kernel: left unfused
    # What the gateway serves (the fused graph, opened as the gateway opens it) is what torch computes.
    served, expected = served_and_torch(written, encoder, list(paragraphs()[:8]))
    assert float((served * expected).sum(axis=1).min()) >= 0.9999


def test_a_traced_graph_is_exported_as_torch_traces_it(tmp_path: Path) -> None:
    encoder = from_scratch(vocab_size=30522, hidden_size=TINY_DIMENSION, layers=2, heads=2, max_seq_length=64)
    written = export_version(encoder, tiny_request("traced"), tmp_path)
    ops = Counter(node.op_type for node in onnx.load(str(written / "model.onnx")).graph.node)
    assert verify_version(written).graph_optimization is None
    assert ops["Attention"] == 0 and ops["Softmax"] == 2 and ops["NonZero"] == 0  # padded, one attention per layer
