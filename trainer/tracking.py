"""The experiment tracker: a training run's params, per-step metrics, curves and summary in MLflow.

Optional: MLflow (``pip install 'embedserve[mlflow]'``) is imported only when ``tracking.mlflow_uri`` is
set, and only the main process (rank 0) logs. metrics.jsonl, summary.json and curves.png in the run's folder
stay the run's own record; MLflow gets a copy of them to compare runs. A run resumed from a checkpoint
continues the MLflow run the checkpoint names instead of starting another.
"""

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'embedserve[mlflow]'"
# MLflow's limit on params per logging call.
_PARAMS_PER_CALL = 100


class TrackingUnavailable(ValueError):
    """Tracking is configured but cannot start: MLflow is not installed or its store refused the run."""


def mlflow_client(uri: str) -> "MlflowClient":
    """An MLflow client on ``uri`` for tracking and for the model registry; TrackingUnavailable says how to fix."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise TrackingUnavailable(
            f"tracking.mlflow_uri is {uri!r} but MLflow is not installed: {INSTALL_HINT} "
            "(or remove tracking.mlflow_uri from the run configuration)"
        ) from error
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the store: a bad URI is refused here
    except mlflow_errors() as error:
        raise TrackingUnavailable(f"tracking.mlflow_uri {uri!r}: MLflow cannot use this store: {error}") from error


def mlflow_errors() -> tuple[type[Exception], ...]:
    """The errors a failing MLflow store raises (its own, and the network's or the disk's)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


def flat_params(config: TrainConfig) -> dict[str, str]:
    """The run configuration as MLflow params: ``section.key`` -> value (JSON for non-strings)."""

    def walk(tree: dict[str, Any], prefix: str) -> Iterator[tuple[str, str]]:
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)

    # Where the run is tracked is not a property of the run.
    return dict(walk(config.model_dump(mode="json", exclude={"tracking"}), ""))


class RunTracker:
    """Tracking switched off (no ``tracking.mlflow_uri``, or a process other than rank 0): every call does nothing."""

    def reference(self) -> dict[str, str] | None:
        """What a checkpoint keeps to continue this tracked run on resume (and to link exported versions to it)."""
        return None

    def set_tag(self, key: str, value: str) -> None:
        pass

    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, artifacts: list[Path]) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


class MlflowRunTracker(RunTracker):
    """One MLflow run: params at the start, a metrics batch per optimiser step, artifacts and status at the end.

    A store that fails in the middle of a run costs metrics, not the run: after the first failed step no more
    metrics are sent (a down server would stall every step in its client's retries), the training goes on, and
    the end of the run is still tried, with the step metrics stopped at. metrics.jsonl has every step."""

    def __init__(self, client: "MlflowClient", uri: str, run_id: str, logged_through_step: int) -> None:
        self.client = client
        self.uri = uri
        self.run_id = run_id
        # Steps a resumed run does again were logged before it stopped; exact resume gives the same values.
        self.logged_through_step = logged_through_step
        self.metrics_stopped_at: int | None = None
        self._errors = mlflow_errors()

    def reference(self) -> dict[str, str]:
        return {"mlflow_uri": self.uri, "run_id": self.run_id}

    def set_tag(self, key: str, value: str) -> None:
        self._guarded("set a tag", lambda: self.client.set_tag(self.run_id, key, value))

    def log_step(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(record["step"])
        if step <= self.logged_through_step or self.metrics_stopped_at is not None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in record.items() if key != "step"]
        if not self._guarded(f"log step {step}", lambda: self.client.log_batch(self.run_id, metrics=metrics)):
            self.metrics_stopped_at = step

    def finish(self, artifacts: list[Path]) -> None:
        self._note_stopped_metrics()
        for path in artifacts:
            if path.is_file():
                self._guarded(f"log {path.name}", functools.partial(self.client.log_artifact, self.run_id, str(path)))
        self._guarded("end the run", lambda: self.client.set_terminated(self.run_id, "FINISHED"))

    def fail(self, error: BaseException) -> None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        reason = f"{type(error).__name__}: {error}"[:5000]

        def record() -> None:
            self.client.set_tag(self.run_id, "failure", reason)
            self.client.set_terminated(self.run_id, status)

        self._note_stopped_metrics()
        self._guarded(f"mark the run {status}", record)

    def _note_stopped_metrics(self) -> None:
        if self.metrics_stopped_at is not None:
            stopped = str(self.metrics_stopped_at)
            self._guarded("tag the gap", lambda: self.client.set_tag(self.run_id, "metrics_stopped_at_step", stopped))

    def _guarded(self, action: str, call: Callable[[], object]) -> bool:
        """Whether ``call`` went through; a failing store is logged, never raised into the training."""
        try:
            call()
        except self._errors as error:
            log.warning("mlflow call failed", extra={"action": action, "run_id": self.run_id, "error": str(error)})
            return False
        return True


def start_tracking(config: TrainConfig, main_process: bool, resumed: dict[str, str] | None = None) -> RunTracker:
    """The run's tracker: an MLflow run on rank 0 when ``tracking.mlflow_uri`` is set, else one that does nothing.

    ``resumed`` is the tracker reference a checkpoint kept: its MLflow run is continued when it lives in the same
    store. Raises TrackingUnavailable when MLflow is missing or the store cannot be used, before any training."""
    uri = config.tracking.mlflow_uri
    if uri is None or not main_process:
        return RunTracker()
    client = mlflow_client(uri)
    try:
        run_id, logged_through_step = _open_run(client, config, resumed)
    except mlflow_errors() as error:
        raise TrackingUnavailable(f"tracking.mlflow_uri {uri!r}: MLflow refused the run: {error}") from error
    log.info("mlflow run", extra={"mlflow_uri": uri, "run_id": run_id, "resumed_after_step": logged_through_step})
    return MlflowRunTracker(client, uri, run_id, logged_through_step)


def _open_run(client: "MlflowClient", config: TrainConfig, resumed: dict[str, str] | None) -> tuple[str, int]:
    """(run id, last step already logged): the checkpoint's run continued, else a new run with the params."""
    params = flat_params(config)
    if resumed and resumed.get("mlflow_uri") == config.tracking.mlflow_uri:
        run = _existing_run(client, resumed["run_id"])
        if run is not None:
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            known = run.data.params
            changed = {key: value for key, value in params.items() if key in known and known[key] != value}
            if changed:
                # MLflow params cannot change: they keep the first values, the tag says what this part ran with.
                log.warning("mlflow: resumed with other settings", extra={"changed": sorted(changed)})
                client.set_tag(run_id, "changed_on_resume", json.dumps(changed))
            _log_params(client, run_id, {key: value for key, value in params.items() if key not in known})
            history = client.get_metric_history(run_id, "loss")
            return run_id, max((metric.step for metric in history), default=0)
        log.warning("mlflow: the checkpoint's run is not in this store; starting a new one", extra=resumed)
    name = config.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=config.run_name, tags={"embedserve_version": embedserve_version()})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id, 0


def _existing_run(client: "MlflowClient", run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _log_params(client: "MlflowClient", run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), _PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_CALL])


def embedserve_version() -> str:
    """The installed embedserve's version number (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedserve")
    except PackageNotFoundError:
        return "unknown"
