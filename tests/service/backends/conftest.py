"""One real Triton Inference Server for the tests of this package (its graceful exit takes seconds: started once).

Its repository is the python-backend copy of the session repository, plus what the tests need:
- tiny's config takes at most TRITON_TINY_MAX_BATCH rows per request (the gateway must split its batches);
- ``slow``: model.py sleeps past the gateway's timeout;
- ``sleepy``: model.py sleeps SLEEPY_S per request and records when each request ran (``SleepyLog``), on
  SLEEPY_INSTANCES instances and without Triton's dynamic batcher, so requests sent at once run at once.
The gateway-side repository ``gateway_repository`` adds tiny@3, which Triton lacks, slow@1 and sleepy@1.
"""

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.models.manifest import MANIFEST_FILE
from service.settings import Settings
from tests.triton_server import LocalTriton
from trainer.release.triton_config import (
    PYTHON_MODEL_SOURCE,
    TritonOptions,
    python_config,
    version_digests,
    write_python_repository,
)

TRITON_TINY_MAX_BATCH = 4
SLOW_MODEL_SLEEP_S = 2.0
SLEEPY_S = 0.5
SLEEPY_INSTANCES = 4
# Triton's dynamic batcher would merge requests that arrive together into one execute() call.
DYNAMIC_BATCHING = "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"


def sleeping_model_py(sleep_s: float, record_to: Path | None = None) -> str:
    """model.py of a test model: the real one, with execute() sleeping first (and recording when it ran)."""
    record = (
        f"""
        with open({str(record_to)!r}, "a") as log:
            log.write(f"{{started}} {{time.time()}}\\n")"""
        if record_to
        else ""
    )
    return (
        PYTHON_MODEL_SOURCE.read_text()
        + f"""

class _Sleeping(TritonPythonModel):
    def execute(self, requests):
        import time

        started = time.time()
        time.sleep({sleep_s})
        responses = super().execute(requests){record}
        return responses


TritonPythonModel = _Sleeping
"""
    )


class SleepyLog:
    """When each request of the ``sleepy`` model ran in Triton, as (start, end) wall-clock times."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def since(self, started: float) -> list[tuple[float, float]]:
        if not self.path.exists():
            return []
        spans = [tuple(map(float, line.split())) for line in self.path.read_text().splitlines() if line.strip()]
        return sorted((a, b) for a, b in spans if a >= started)


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of ``spans`` running at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def add_version_copy(repository: Path, source: str, target: str) -> None:
    """``source`` (model/version) again as ``target``, its manifest renamed; the weights are hard-linked."""
    source_dir, target_dir = repository / source, repository / target
    shutil.copytree(source_dir, target_dir, copy_function=os.link)
    model, version = target.split("/")
    manifest = json.loads((source_dir / MANIFEST_FILE).read_text())
    (target_dir / MANIFEST_FILE).unlink()
    (target_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "model": model, "version": int(version)}))


@pytest.fixture(scope="package")
def gateway_repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session repository plus tiny@3 (Triton lacks it), slow@1 and sleepy@1 (Triton's copies sleep)."""
    repository = tmp_path_factory.mktemp("gateway") / "repository"
    shutil.copytree(model_repository, repository, copy_function=os.link)
    add_version_copy(repository, "tiny/2", "tiny/3")
    for model in ("slow", "sleepy"):
        (repository / model).mkdir()
        add_version_copy(repository, "tiny/1", f"{model}/1")
    return repository


@pytest.fixture(scope="package")
def sleepy_log(tmp_path_factory: pytest.TempPathFactory) -> SleepyLog:
    return SleepyLog(tmp_path_factory.mktemp("sleepy") / "requests.log")


@pytest.fixture(scope="package")
def triton(
    gateway_repository: Path, sleepy_log: SleepyLog, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalTriton]:
    workdir = tmp_path_factory.mktemp("triton")
    repository = workdir / "repository"
    copied = write_python_repository(gateway_repository, repository)
    assert copied == ["minilm@1", "sleepy@1", "slow@1", "tiny@1", "tiny@2", "tiny@3"]
    shutil.rmtree(repository / "tiny" / "3")
    options = TritonOptions(instance_kind="cpu", max_batch_size=TRITON_TINY_MAX_BATCH)
    tiny = python_config("tiny", 32, options, version_digests(repository / "tiny"))
    (repository / "tiny" / "config.pbtxt").write_text(tiny)
    (repository / "slow" / "1" / "model.py").write_text(sleeping_model_py(SLOW_MODEL_SLEEP_S))
    (repository / "sleepy" / "1" / "model.py").write_text(sleeping_model_py(SLEEPY_S, sleepy_log.path))
    sleepy_options = TritonOptions(instance_kind="cpu", instance_count=SLEEPY_INSTANCES)
    sleepy = python_config("sleepy", 32, sleepy_options, version_digests(repository / "sleepy"))
    assert DYNAMIC_BATCHING in sleepy
    (repository / "sleepy" / "config.pbtxt").write_text(sleepy.replace(DYNAMIC_BATCHING, ""))
    server = LocalTriton(repository, workdir / "triton.log")
    server.start()
    yield server
    server.stop()


def triton_settings(settings: Settings, triton: LocalTriton, **update: object) -> Settings:
    # The cache is off so every vector really comes from Triton.
    return settings.model_copy(
        update={
            "backend": "triton",
            "triton_url": triton.grpc_url,
            "cache_enabled": False,
            "triton_timeout_s": 5.0,
            **update,
        }
    )


def vectors(body: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def triton_counts(triton: LocalTriton, model: str, version: int) -> tuple[int, int]:
    """(requests that succeeded, rows inferred) for one version, from Triton's statistics."""
    url = f"http://127.0.0.1:{triton.http_port}/v2/models/{model}/versions/{version}/stats"
    (stats,) = httpx.get(url, timeout=5).json()["model_stats"]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["inference_count"])
