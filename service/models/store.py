"""The model versions under the model repository, each verified against its manifest at start.

A version whose files don't match its manifest is refused (and says why); the others serve.
"""

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from service.models.manifest import Manifest, ManifestError, verify_version
from service.models.tokenization import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# 64 bits of the manifest sha256: enough to tell apart the builds of one model version.
CONTENT_ID_DIGITS = 16


@dataclass(frozen=True)
class ModelVersion:
    """A verified, servable version: its folder, manifest and tokenizer."""

    model: str
    version: int
    path: Path
    manifest: Manifest
    tokenizer: TextTokenizer

    @property
    def name(self) -> str:
        return f"{self.model}@{self.version}"

    @property
    def dimension(self) -> int:
        return self.manifest.embedding_dimension

    @cached_property
    def content_id(self) -> str:
        """What the version holds, not what it is called: the first 16 hex digits of its manifest sha256.
        A version deleted and exported again under the same number has another one, so everything that
        keeps vectors (cache keys, drift samples) keys them by it, never by the number alone."""
        return self.manifest.sha256[:CONTENT_ID_DIGITS]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE


@dataclass(frozen=True)
class RefusedVersion:
    model: str
    version: int
    path: Path
    reason: str


class ModelStore:
    """Verified versions by (model, version), plus the refused ones and why."""

    def __init__(self, repository: Path, versions: list[ModelVersion], refused: list[RefusedVersion]) -> None:
        self.repository = repository
        self._versions = {(v.model, v.version): v for v in versions}
        self.refused = refused

    @classmethod
    def scan(cls, repository: Path) -> "ModelStore":
        """Verify every ``<model>/<version>/`` folder under ``repository``."""
        versions: list[ModelVersion] = []
        refused: list[RefusedVersion] = []
        if not repository.is_dir():
            log.error("model repository missing", extra={"repository": str(repository)})
            return cls(repository, versions, refused)
        for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
            # Folders that are not version numbers (staging folders of an export in progress) are skipped.
            for version_dir in sorted(
                (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
            ):
                try:
                    versions.append(_load_version(model_dir.name, int(version_dir.name), version_dir))
                except ManifestError as error:
                    log.error(
                        "model version refused",
                        extra={
                            "model": model_dir.name,
                            "version": int(version_dir.name),
                            "file": error.file,
                            "reason": error.reason,
                        },
                    )
                    refused.append(RefusedVersion(model_dir.name, int(version_dir.name), version_dir, error.reason))
        return cls(repository, versions, refused)

    def all(self) -> list[ModelVersion]:
        return list(self._versions.values())

    def models(self) -> list[str]:
        return sorted({model for model, _ in self._versions} | {r.model for r in self.refused})

    def versions_of(self, model: str) -> list[ModelVersion]:
        return sorted((v for v in self._versions.values() if v.model == model), key=lambda v: v.version)

    def get(self, model: str, version: int) -> ModelVersion | None:
        return self._versions.get((model, version))

    def refusal(self, model: str, version: int) -> RefusedVersion | None:
        return next((r for r in self.refused if r.model == model and r.version == version), None)


def _load_version(model: str, version: int, version_dir: Path) -> ModelVersion:
    manifest = verify_version(version_dir)
    if manifest.model != model or manifest.version != version:
        raise ManifestError(
            version_dir,
            f"manifest names {manifest.model}@{manifest.version} but the folder is {model}/{version}",
            "manifest.json",
        )
    for required in (ONNX_FILE, TOKENIZER_FILE):
        if required not in manifest.files:
            raise ManifestError(version_dir, f"file {required} is missing", required)
    tokenizer = TextTokenizer(version_dir / TOKENIZER_FILE, manifest.max_seq_length)
    log.info("model version verified", extra={"model": model, "version": version, "sha256": manifest.sha256})
    return ModelVersion(model=model, version=version, path=version_dir, manifest=manifest, tokenizer=tokenizer)
