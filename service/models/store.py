"""The model versions under the model repository, each verified against its manifest when first seen.

A version whose files don't match its manifest is refused (and says why); the others serve. The repository is
scanned again while the gateway runs (``changes``): new version folders are verified and, once their
sessions are loaded, served; a served version whose folder disappears, or whose files change on disk (size
or modification time of any file: versions are immutable), stops being served — a changed one is refused
until the gateway restarts, never served half old, half new.
"""

import logging
from dataclasses import dataclass, field
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
    # Refused for good (until restart): it was served and its files changed. Otherwise a refused folder is
    # verified again once its files change (an operator's copy that was still being written, say).
    final: bool = False


# (relative path, size, modification time in ns) of every file of a version folder.
FilesSignature = tuple[tuple[str, int, int], ...]


def files_signature(version_dir: Path) -> FilesSignature:
    """What a re-scan compares instead of hashing every file again: any write to a file changes it."""
    try:
        entries = [(p, p.stat()) for p in version_dir.rglob("*") if p.is_file()]
    except OSError:
        return ()
    return tuple(sorted((str(p.relative_to(version_dir)), st.st_size, st.st_mtime_ns) for p, st in entries))


@dataclass
class StoreChanges:
    """What a re-scan found: versions to load, served versions to stop serving (with the refusal of a changed
    one), and new refusals of folders never served."""

    added: list[ModelVersion] = field(default_factory=list)
    removed: list[tuple[ModelVersion, RefusedVersion | None]] = field(default_factory=list)
    refused: list[RefusedVersion] = field(default_factory=list)


class ModelStore:
    """Verified versions by (model, version), plus the refused ones and why."""

    def __init__(self, repository: Path, versions: list[ModelVersion], refused: list[RefusedVersion]) -> None:
        self.repository = repository
        self._versions = {(v.model, v.version): v for v in versions}
        self._signatures = {(v.model, v.version): files_signature(v.path) for v in versions}
        self.refused = refused
        self._refused_signatures = {(r.model, r.version): files_signature(r.path) for r in refused}

    @classmethod
    def scan(cls, repository: Path) -> "ModelStore":
        """Verify every ``<model>/<version>/`` folder under ``repository``."""
        versions: list[ModelVersion] = []
        refused: list[RefusedVersion] = []
        if not repository.is_dir():
            log.error("model repository missing", extra={"repository": str(repository)})
            return cls(repository, versions, refused)
        for (model, version), version_dir in _version_folders(repository).items():
            loaded = _verified(model, version, version_dir)
            if isinstance(loaded, RefusedVersion):
                refused.append(loaded)
            else:
                versions.append(loaded)
        return cls(repository, versions, refused)

    def changes(self) -> StoreChanges:
        """Scan the repository again (blocking: run it in a thread); nothing changes until ``apply``."""
        found = StoreChanges()
        try:
            on_disk = _version_folders(self.repository)
        except OSError:
            # An unreadable or missing volume (a storage hiccup) is not "every version deleted": serve on.
            log.error("model repository unreadable; versions unchanged", extra={"repository": str(self.repository)})
            return found
        for key, version in self._versions.items():
            if key not in on_disk:
                log.warning("model version folder gone", extra={"model": key[0], "version": key[1]})
                found.removed.append((version, None))
            elif files_signature(version.path) != self._signatures[key]:
                reason = (
                    "its files changed on disk after it was loaded; versions are immutable: export the new "
                    "weights as a new version (this one is refused until the gateway restarts)"
                )
                log.error("model version changed on disk", extra={"model": key[0], "version": key[1]})
                found.removed.append((version, RefusedVersion(key[0], key[1], version.path, reason, final=True)))
        final = {(r.model, r.version) for r in self.refused if r.final}
        for (model, number), version_dir in on_disk.items():
            key = (model, number)
            if key in self._versions or key in final:
                continue
            if key in self._refused_signatures and files_signature(version_dir) == self._refused_signatures[key]:
                continue  # refused, and not touched since
            loaded = _verified(model, number, version_dir)
            if isinstance(loaded, RefusedVersion):
                found.refused.append(loaded)
            else:
                found.added.append(loaded)
        return found

    def add(self, version: ModelVersion) -> None:
        """Serve ``version`` (its backend session and batcher exist)."""
        key = (version.model, version.version)
        self._signatures[key] = files_signature(version.path)
        self._versions[key] = version
        self._forget_refusal(key)

    def refuse(self, refusal: RefusedVersion) -> None:
        """Record ``refusal`` of a folder never served (replacing an earlier one of the same version)."""
        self._forget_refusal((refusal.model, refusal.version))
        self.refused.append(refusal)
        self._refused_signatures[(refusal.model, refusal.version)] = files_signature(refusal.path)

    def _forget_refusal(self, key: tuple[str, int]) -> None:
        self.refused = [r for r in self.refused if (r.model, r.version) != key]
        self._refused_signatures.pop(key, None)

    def remove(self, version: ModelVersion, refusal: RefusedVersion | None = None) -> None:
        """Stop serving ``version``; with ``refusal``, it is refused from now on."""
        self._versions.pop((version.model, version.version), None)
        self._signatures.pop((version.model, version.version), None)
        if refusal is not None:
            self._forget_refusal((version.model, version.version))
            self.refused.append(refusal)

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


def _version_folders(repository: Path) -> dict[tuple[str, int], Path]:
    """(model, version) -> folder, in order. Folders that are not version numbers (staging folders of an
    export in progress) are skipped."""
    folders: dict[tuple[str, int], Path] = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        numbered = (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        for version_dir in sorted(numbered, key=lambda p: int(p.name)):
            folders[(model_dir.name, int(version_dir.name))] = version_dir
    return folders


def _verified(model: str, version: int, version_dir: Path) -> "ModelVersion | RefusedVersion":
    try:
        return _load_version(model, version, version_dir)
    except ManifestError as error:
        log.error(
            "model version refused",
            extra={"model": model, "version": version, "file": error.file, "reason": error.reason},
        )
        return RefusedVersion(model, version, version_dir, error.reason)


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
