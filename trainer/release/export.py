"""Export an encoder as a new immutable, checksummed version of the Triton model repository.

The ONNX graph carries pooling and normalisation. By default a BERT encoder is written unpadded (its token-wise
layers run on real tokens only: ``trainer.release.unpadded``); ``fused`` traces it with eager attention, the
pattern ONNX Runtime's transformer optimiser fuses (``trainer.release.optimize``), which is also what an
encoder that can't be unpadded gets. The graph's outputs are checked against torch before the version is
written; the version folder appears atomically (staged, then
renamed) with a manifest holding the sha256 of every file, provenance, the fusions applied and reference
embedding statistics for drift monitoring.
"""

import contextlib
import logging
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.models.manifest import (
    MANIFEST_FILE,
    EmbeddingStats,
    Evaluation,
    GraphOptimization,
    Manifest,
    digest_files,
)
from service.models.session import cpu_session
from service.models.store import ONNX_FILE
from service.models.tokenization import TOKENIZER_FILE, TextTokenizer, pad_batch
from trainer.config import ExportGraph
from trainer.encoder import SentenceEncoder
from trainer.release.optimize import optimize_graph
from trainer.release.triton_config import (
    GPU_ONNX,
    TritonChanges,
    TritonOptions,
    onnx_config,
    read_options,
    version_digests,
    write_config,
)
from trainer.release.unpadded import UnpaddedBert, unpadding_refusal

log = logging.getLogger(__name__)

PARITY_MIN_COSINE = 0.9999
ONNX_OPSET = 17
# Tokenizer files copied beside the weights when the source has them (tokenizer.json is required).
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
STATS_SAMPLE_VECTORS = 64


class ExportRefused(Exception):
    """The version was not written: parity or the evaluation gate failed."""


@dataclass
class ExportRequest:
    """Everything a new version records about where it came from."""

    model: str
    source: str
    tokenizer_dir: Path
    validation_texts: list[str]
    base_model: str | None = None
    parent_version: int | None = None
    dataset_fingerprint: str | None = None
    training_config: dict[str, Any] | None = None
    evaluation: Evaluation | None = None
    forced: bool = False
    # unpadded: token-wise layers on real tokens only (BERT; others fall back to fused); fused: padded, with
    # ONNX Runtime's fused attention, GELU and embedding layer-norm; traced: the traced graph as it comes.
    graph: ExportGraph = "unpadded"
    notes: dict[str, Any] = field(default_factory=dict)
    # Changes to the model's config.pbtxt (Triton instances, TensorRT); what is not changed is kept.
    triton: TritonChanges = field(default_factory=TritonChanges)


def model_versions(repository: Path, model: str) -> list[int]:
    model_dir = repository / model
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def triton_options(repository: Path, model: str, changes: TritonChanges) -> TritonOptions:
    """The Triton options the next version of ``model`` gets: its config.pbtxt's with ``changes`` applied.
    Raises ValueError for impossible options (TensorRT on CPU instances)."""
    return changes.applied_to(read_options(repository / model / "config.pbtxt") or GPU_ONNX)


def export_version(encoder: SentenceEncoder, request: ExportRequest, repository: Path) -> Path:
    """Write ``encoder`` as version n+1 of ``request.model``; returns the new version folder."""
    model_dir = repository / request.model
    triton = triton_options(repository, request.model, request.triton)  # refused before anything is written
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        encoder = encoder.eval().cpu()
        optimization = write_graph(encoder, staging / ONNX_FILE, request.graph)
        for name in TOKENIZER_FILES:
            if (request.tokenizer_dir / name).is_file():
                shutil.copy2(request.tokenizer_dir / name, staging / name)
        tokenizer = TextTokenizer(staging / TOKENIZER_FILE, encoder.max_seq_length)
        onnx_vectors = check_parity(encoder, staging / ONNX_FILE, tokenizer, request.validation_texts)
        return publish_staged(
            staging,
            request,
            encoder.dimension,
            encoder.max_seq_length,
            onnx_vectors,
            triton=triton,
            graph_optimization=optimization,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_graph(encoder: SentenceEncoder, path: Path, graph: ExportGraph) -> GraphOptimization | None:
    """Write ``encoder`` as the ``graph`` kind of ONNX graph at ``path``; returns what the manifest records of it
    (None: the traced graph)."""
    if graph == "unpadded":
        refusal = unpadding_refusal(encoder)
        if refusal is None:
            _trace(UnpaddedBert(encoder).eval(), path)
            return GraphOptimization(tool="trainer.release.unpadded", onnxruntime=ort.__version__, padding_removed=True)
        log.warning("graph exported padded and fused: it can't be unpadded", extra={"reason": refusal})
    write_onnx(encoder, path)
    if graph == "traced":
        return None
    config = encoder.transformer.config
    return optimize_graph(path, config.num_attention_heads, config.hidden_size)


def write_onnx(encoder: SentenceEncoder, path: Path, attention: str = "eager") -> None:
    """Trace ``encoder`` (padded) to ONNX at ``path``; ``attention``: the transformers attention implementation
    traced (eager: the pattern the optimiser fuses; sdpa: what transformers runs by default, which it cannot)."""
    with _attention(encoder, attention):
        _trace(encoder, path)


def _trace(module: nn.Module, path: Path) -> None:
    """``module`` (input_ids, attention_mask -> embedding) traced to ONNX at ``path``."""
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    dynamic = {0: "batch", 1: "sequence"}
    # The TorchScript exporter: stable output names and dynamic axes for BERT-style graphs. Its tracer
    # warnings about Python control flow in transformers are expected and say nothing about this graph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "embedding": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


@contextlib.contextmanager
def _attention(encoder: SentenceEncoder, implementation: str) -> Iterator[None]:
    """``encoder`` runs with the attention ``implementation`` inside, its own outside (same weights, same maths)."""
    config = encoder.transformer.config
    before = config._attn_implementation
    encoder.transformer.set_attn_implementation(implementation)
    try:
        yield
    finally:
        encoder.transformer.set_attn_implementation(before)


def embed_with_onnx(onnx_path: Path, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    session = cpu_session(onnx_path)  # as the gateway runs it
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = pad_batch(tokenizer.encode(texts[start : start + batch_size], truncate=True), tokenizer.pad_id)
        rows.append(
            session.run(["embedding"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})[0]
        )
    return np.concatenate(rows).astype(np.float32)


@torch.no_grad()
def embed_with_torch(
    encoder: SentenceEncoder, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 32
) -> np.ndarray:
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = pad_batch(tokenizer.encode(texts[start : start + batch_size], truncate=True), tokenizer.pad_id)
        vectors = encoder(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
        rows.append(vectors.float().numpy())
    return np.concatenate(rows)


def check_parity(encoder: SentenceEncoder, onnx_path: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    """Refuse unless ONNX and torch agree (cosine ≥ PARITY_MIN_COSINE) on every text; returns ONNX vectors."""
    if not texts:
        raise ExportRefused("no validation texts to check ONNX parity on")
    onnx_vectors = embed_with_onnx(onnx_path, tokenizer, texts)
    torch_vectors = embed_with_torch(encoder, tokenizer, texts)
    cosines = (onnx_vectors * torch_vectors).sum(axis=1) / (
        np.linalg.norm(onnx_vectors, axis=1) * np.linalg.norm(torch_vectors, axis=1)
    )
    worst = float(cosines.min())
    if worst < PARITY_MIN_COSINE:
        raise ExportRefused(f"ONNX output differs from torch: worst cosine {worst:.6f} < {PARITY_MIN_COSINE}")
    log.info("onnx parity holds", extra={"texts": len(texts), "worst_cosine": worst})
    return onnx_vectors


def reference_stats(vectors: np.ndarray) -> EmbeddingStats:
    """Statistics of a version's embeddings on a validation sample: the drift monitor's reference."""
    norms = np.linalg.norm(vectors, axis=1)
    # Evenly spaced over the texts, not the first ones: validation texts often come grouped by source or
    # topic, and a sample of one group makes in-distribution traffic look drifted (MMD 0.017 vs 0.004, MiniLM).
    picked = np.unique(np.linspace(0, len(vectors) - 1, min(STATS_SAMPLE_VECTORS, len(vectors))).round().astype(int))
    sample = vectors[picked]
    return EmbeddingStats(
        count=len(vectors),
        mean=[round(float(x), 6) for x in vectors.mean(axis=0)],
        std=[round(float(x), 6) for x in vectors.std(axis=0)],
        norm_quantiles={str(q): float(np.quantile(norms, q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)},
        sample=[[round(float(x), 6) for x in row] for row in sample],
    )


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def publish_staged(
    staging: Path,
    request: ExportRequest,
    dimension: int,
    max_seq_length: int,
    vectors: np.ndarray,
    precision: Literal["fp32", "int8"] = "fp32",
    triton: TritonOptions | None = None,
    graph_optimization: GraphOptimization | None = None,
) -> Path:
    """Write the manifest of the files in ``staging`` and rename it to the model's next version folder.

    ``vectors`` are the version's own outputs on the validation texts (its reference statistics). The model's
    config.pbtxt is rewritten with ``triton`` (None: the options it has) and the sha256 of every version, the
    new one's before its folder appears, so a Triton that polls the repository never loads it unnamed."""
    model_dir = staging.parent
    existing = model_versions(model_dir.parent, request.model)
    version = (existing[-1] if existing else 0) + 1
    manifest = Manifest(
        model=request.model,
        version=version,
        created_at=datetime.now(UTC),
        source=request.source,
        base_model=request.base_model,
        parent_version=request.parent_version,
        embedding_dimension=dimension,
        max_seq_length=max_seq_length,
        precision=precision,
        graph_optimization=graph_optimization,
        files=digest_files(staging),
        dataset_fingerprint=request.dataset_fingerprint,
        training_config=request.training_config,
        git_commit=git_commit(),
        evaluation=request.evaluation,
        reference_stats=reference_stats(vectors),
        forced=request.forced,
        notes=request.notes,
    )
    _write_durably(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
    options = triton or read_options(model_dir / "config.pbtxt") or GPU_ONNX
    digests = version_digests(model_dir)
    write_config(model_dir, onnx_config(request.model, dimension, options, {**digests, version: manifest.sha256}))
    target = model_dir / str(version)
    try:
        # rename() of a folder fails if the target exists, so two concurrent exports can't share a number.
        os.rename(staging, target)
    finally:
        # The config names exactly the versions on disk (another export may have taken the number).
        write_config(model_dir, onnx_config(request.model, dimension, options, version_digests(model_dir)))
    _fsync_dir(model_dir)
    log.info("version exported", extra={"model": request.model, "version": version, "sha256": manifest.sha256})
    return target


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    for file in path.parent.rglob("*"):
        if file.is_file() and file != path:
            with file.open("rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
