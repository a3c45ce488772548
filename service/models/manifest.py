"""The one manifest schema of a model version, and checksum verification.

Shared by the trainer (which writes manifests at export) and the gateway (which refuses any version
whose files don't match). Depends on pydantic and hashlib only.
"""

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


# A Triton model config parameter named this + a version number holds that version's ``Manifest.sha256`` (one
# config.pbtxt serves every version of its model). The trainer writes them; the gateway and the python backend's
# model.py read them, so what Triton loaded can be matched to the manifest the gateway verified.
TRITON_SHA256_PREFIX = "embedserve_sha256_v"


def triton_sha256_key(version: int) -> str:
    return f"{TRITON_SHA256_PREFIX}{version}"


class FileDigest(BaseModel):
    sha256: str
    size: int


class EmbeddingStats(BaseModel):
    """Reference statistics of a version's embeddings on a validation sample, for drift monitoring."""

    count: int
    mean: list[float]
    std: list[float]
    norm_quantiles: dict[str, float] = Field(description="Quantiles of the L2 norm, keyed '0.05', '0.5', ...")
    sample: list[list[float]] = Field(
        default_factory=list, description="A small sample of reference vectors (for kernel MMD)."
    )


class DevSetRecord(BaseModel):
    """The dev set an export gate scored on: where its pairs came from and a digest of them."""

    source: Literal["self-supervised", "eval_file"]
    queries: int
    targets: int = Field(description="Documents every query is ranked against (its own among them).")
    sha256: str = Field(description="sha256 of the queries, targets and relevance, as JSON.")
    seed: int | None = Field(None, description="The seed that chose the query sentences (self-supervised).")


class GateRecord(BaseModel):
    """The export gate: the candidate against its parent on one dev set, scored by one function.

    ``decision``: passed (the lower bound of the paired-bootstrap interval of the MRR@10 difference,
    candidate - parent, is above ``min_delta``), refused (it is not), not_gated (no parent to compare
    with: a scratch model's first version, or a release to a gateway that serves no version yet) or off
    (``export.gate.enabled: false``)."""

    decision: Literal["passed", "refused", "not_gated", "off"]
    metric: str = "mrr@10"
    parent: str | None = Field(None, description="What the candidate was compared with, e.g. minilm@1 or base:minilm.")
    dev_set: DevSetRecord | None = None
    candidate: dict[str, float] = Field(default_factory=dict, description="mrr@10 and recall@10 of the candidate.")
    parent_scores: dict[str, float] | None = Field(None, description="mrr@10 and recall@10 of the parent.")
    difference: float | None = Field(None, description="Mean MRR@10 difference, candidate - parent.")
    interval: tuple[float, float] | None = Field(None, description="Its paired-bootstrap interval at confidence.")
    confidence: float | None = None
    resamples: int | None = None
    seed: int | None = None
    min_delta: float = 0.0


class Evaluation(BaseModel):
    primary_metric: str
    metrics: dict[str, float]
    gate_threshold: float | None = None  # the absolute gate of versions exported before the parent gate
    passed_gate: bool | None = None
    gate: GateRecord | None = None


class GraphOptimization(BaseModel):
    """How the exported graph was rewritten: padding removed (its token-wise layers run on real tokens only),
    and the fusions of ONNX Runtime's transformer optimiser, op -> count."""

    tool: str
    onnxruntime: str
    fused: dict[str, int] = Field(default_factory=dict)
    padding_removed: bool = False


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model: str
    version: int
    created_at: datetime
    source: str = Field(description="Where the weights came from, e.g. a package or a training run.")
    base_model: str | None = None
    parent_version: int | None = None
    embedding_dimension: int
    max_seq_length: int
    pooling: Literal["mean"] = "mean"
    normalized: bool = True
    precision: Literal["fp32", "int8"] = "fp32"
    graph_optimization: GraphOptimization | None = Field(
        None, description="How model.onnx was rewritten (unpadded, fused); None: the graph as torch traced it."
    )
    files: dict[str, FileDigest] = Field(description="Relative path -> digest of every file of the version.")
    dataset_fingerprint: str | None = None
    training_config: dict[str, Any] | None = None
    git_commit: str | None = None
    evaluation: Evaluation | None = None
    reference_stats: EmbeddingStats | None = None
    forced: bool = Field(False, description="Exported with --force past a refused evaluation gate.")
    notes: dict[str, Any] = Field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """One digest naming the whole version: sha256 over the sorted per-file digests."""
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(f"{path}\0{self.files[path].sha256}\n".encode())
        return digest.hexdigest()


class ManifestError(Exception):
    """A version folder whose manifest is missing, unreadable, or does not match its files."""

    def __init__(self, version_dir: Path, reason: str, file: str | None = None) -> None:
        super().__init__(reason)
        self.version_dir = version_dir
        self.reason = reason
        self.file = file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(version_dir: Path) -> dict[str, FileDigest]:
    """Digest every file under ``version_dir`` except the manifest itself."""
    return {
        path.relative_to(version_dir).as_posix(): FileDigest(sha256=file_sha256(path), size=path.stat().st_size)
        for path in sorted(version_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def read_manifest(version_dir: Path) -> Manifest:
    manifest_path = version_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(version_dir, f"{MANIFEST_FILE} is missing", MANIFEST_FILE)
    try:
        return Manifest.model_validate_json(manifest_path.read_bytes())
    except ValueError as error:
        raise ManifestError(version_dir, f"{MANIFEST_FILE} is not a valid manifest: {error}", MANIFEST_FILE) from error


def verify_version(version_dir: Path) -> Manifest:
    """Return the manifest of ``version_dir`` if every file matches it exactly; raise ManifestError otherwise.

    Exactly means: every listed file exists with its size and sha256, and no unlisted file is present.
    """
    manifest = read_manifest(version_dir)
    for relative, expected in manifest.files.items():
        path = version_dir / relative
        if not path.is_file():
            raise ManifestError(version_dir, f"file {relative} listed in the manifest is missing", relative)
        if path.stat().st_size != expected.size:
            raise ManifestError(version_dir, f"file {relative} has the wrong size", relative)
        if file_sha256(path) != expected.sha256:
            raise ManifestError(version_dir, f"file {relative} does not match its sha256", relative)
    present = {
        path.relative_to(version_dir).as_posix()
        for path in version_dir.rglob("*")
        if path.is_file() and path.name != MANIFEST_FILE
    }
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise ManifestError(version_dir, f"file {unlisted[0]} is not listed in the manifest", unlisted[0])
    return manifest
