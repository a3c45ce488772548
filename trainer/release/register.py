"""An exported version registered in MLflow's model registry: a searchable pointer, never the authority.

The version's manifest stays the source of truth the gateway enforces (it serves what the files and their
sha256 say, whatever the registry holds). The registry entry names the version by the same digest and carries
its lineage and gate result, linked to the training run. A registration that fails leaves the exported version
untouched: the failure is logged and recorded in the run's folder, beside the successes.
"""

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from service.models.manifest import MANIFEST_FILE, Manifest, file_sha256, read_manifest
from service.models.store import ONNX_FILE
from trainer.tracking import embedserve_version, mlflow_errors

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

REGISTRATIONS_FILE = "mlflow_registrations.jsonl"  # in the run's folder: one row per export, registered or not


@dataclass(frozen=True)
class Registration:
    """What became of one exported version in the registry."""

    registered_model: str
    model: str
    version: int
    sha256: str
    mlflow_version: str | None  # MLflow's own number for it; None when registration failed
    error: str | None = None


def version_tags(manifest: Manifest, manifest_file_sha256: str) -> dict[str, str]:
    """The model version's tags: the digests that identify it, where it came from, and its gate."""
    evaluation = manifest.evaluation
    gate = evaluation.gate if evaluation else None

    def text(value: object) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    tags = {
        # Manifest.sha256, over every file's digest: what config.pbtxt and the gateway name the version by.
        "sha256": manifest.sha256,
        "manifest_file_sha256": manifest_file_sha256,  # manifest.json itself (provenance included)
        "model": manifest.model,
        "repository_version": str(manifest.version),
        "parent_version": text(manifest.parent_version),
        "precision": manifest.precision,
        "gate_passed": text(evaluation.passed_gate if evaluation else None),
        "gate_metric": text(evaluation.primary_metric if evaluation else None),
        "gate_value": text(evaluation.metrics.get(evaluation.primary_metric) if evaluation else None),
        "gate_decision": text(gate.decision if gate else None),
        "gate_parent": text(gate.parent if gate else None),
        "gate_parent_value": text(gate.parent_scores.get(gate.metric) if gate and gate.parent_scores else None),
        "gate_interval": text(list(gate.interval) if gate and gate.interval else None),
        "forced": text(manifest.forced),
        "dataset_fingerprint": text(manifest.dataset_fingerprint),
        "git_commit": text(manifest.git_commit),
        "embedserve_version": embedserve_version(),
    }
    if ONNX_FILE in manifest.files:
        tags["model_onnx_sha256"] = manifest.files[ONNX_FILE].sha256
    return tags


def register_version(
    client: "MlflowClient", registered_model: str, version_dir: Path, training_run_id: str | None, ledger: Path
) -> Registration:
    """Register ``version_dir`` as a new version of ``registered_model``; record the outcome in ``ledger``.

    Never raises for a registry that fails: the version is exported and served all the same."""
    manifest = read_manifest(version_dir)
    source = version_dir.resolve().as_uri()
    try:
        if training_run_id is not None:
            # The run keeps the manifest of every version it produced.
            artifact_path = f"exports/{manifest.model}/{manifest.version}"
            client.log_artifact(training_run_id, str(version_dir / MANIFEST_FILE), artifact_path)
            if _behind_a_tracking_server(client.tracking_uri):
                # A tracking server accepts no local path as a source, only what lies in the run's artifacts.
                source = f"runs:/{training_run_id}/{artifact_path}"
        tags = version_tags(manifest, file_sha256(version_dir / MANIFEST_FILE))
        with _process_tracking_uri(client.tracking_uri):
            _ensure_registered_model(client, registered_model)
            created = client.create_model_version(
                registered_model,
                source,
                run_id=training_run_id,
                tags={**tags, "version_dir": str(version_dir.resolve())},
                description=f"embedserve {manifest.model} version {manifest.version}; its manifest.json is the truth.",
            )
        number = str(created.version)  # an int since MLflow 3, a string before
        outcome = Registration(registered_model, manifest.model, manifest.version, manifest.sha256, number)
        log.info("version registered in mlflow", extra=asdict(outcome))
    except mlflow_errors() as error:
        reason = f"{type(error).__name__}: {error}"
        outcome = Registration(registered_model, manifest.model, manifest.version, manifest.sha256, None, reason)
        log.warning("mlflow registration failed; the exported version stands", extra=asdict(outcome))
    _record(ledger, outcome, client.tracking_uri)
    return outcome


def _ensure_registered_model(client: "MlflowClient", name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="embedserve encoder versions (see each manifest.json)")
        except MlflowException as race:  # another export created it in between
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` inside, restored after.

    MLflow's file: registry reads a version back through a client on the process-wide URI (a TODO in its
    file_store.py); left unset, that client opens ./mlflow.db in the working directory."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # an MLflow without it: at worst that stray file, never a wrong registration
        yield
        return
    with _use_tracking_uri(uri):
        yield


def _behind_a_tracking_server(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("http", "https") or scheme.startswith("databricks")


def _record(ledger: Path, outcome: Registration, uri: str) -> None:
    ledger.parent.mkdir(parents=True, exist_ok=True)
    row = {"at": datetime.now(UTC).isoformat(), "mlflow_uri": uri, **asdict(outcome)}
    with ledger.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
