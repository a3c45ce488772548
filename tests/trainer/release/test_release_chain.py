"""`python -m trainer release` end to end on CPU with a tiny encoder, against a real gateway process (Redis,
Milvus Lite) that keeps serving traffic: trained, gated against stable, exported, hot-loaded, canaried to
promotion with the model's collection re-indexed; a refused gate exports nothing; a canary that fails analysis
leaves stable serving; a release killed mid-way resumes where it stopped."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from client.gateway import Gateway
from loadtests.processes import MilvusLiteServer, gateway, milvus_server
from tests.conftest import SHARED_REDIS_URL
from tests.trainer.conftest import tiny_config
from tests.trainer.release.kube_api import NAMESPACE, KubeApi, kube_api
from trainer.data.sample_text import paragraphs, sentences
from trainer.release.publish import publish
from trainer.train import train

ADMIN_KEY = "release-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DOCS = "docs"  # the collection of tiny each test's gateway serves
TEMPLATE = "embedserve-release-auto"  # the suspended CronJob the release watch starts Jobs from
# Judged every second on a handful of requests; one pass steps, one failure fails.
FAST_ANALYSIS: dict[str, Any] = {
    "interval_s": 1.0,
    "passes_to_step": 1,
    "failures_to_rollback": 1,
    "max_wait_intervals": 30,
    "thresholds": {"min_requests": 5, "max_p95_latency_ratio": 1000.0, "min_neighbour_agreement": 0.5},
}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    documents = list(paragraphs()[:60])
    path.write_text("".join(json.dumps({"query": d.split(".")[0], "document": d}) + "\n" for d in documents))
    return path


@pytest.fixture(scope="module")
def stable_repository(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny/1: the tiny encoder trained 10 steps by the trainer, exported (the stable version)."""
    folder = tmp_path_factory.mktemp("stable")
    repository = folder / "repository"
    config = tiny_config(
        corpus_file, folder / "runs", optim__max_steps=10, export__model="tiny", export__repository=str(repository)
    )
    result = train(config)
    publish(result.last_checkpoint)
    return repository


def release_config(corpus_file: Path, pairs_file: Path, repository: Path, folder: Path, **overrides: Any) -> Path:
    """The tiny run continued to 30 steps (the stable version's first 10, then 20 more), as a release."""
    config = tiny_config(corpus_file, folder / "unused", optim__max_steps=30, export__model="tiny")
    raw = config.model_dump(mode="json")
    raw["export"].update(repository=str(repository), eval_file=str(pairs_file))
    raw["release"] = {
        # The lower bound of the 95 % interval of the MRR@10 difference on 60 pairs must exceed this: a tiny
        # encoder 20 steps further is not reliably better than stable, and these tests are about the chain.
        "gate": {"min_delta": -0.5},
        "canary": {"steps": [50, 100], "analysis": FAST_ANALYSIS, "timeout_s": 300},
        "serve_timeout_s": 120,
        "poll_s": 0.5,
    }
    for name, value in overrides.items():  # section__key = value, or section = a whole section
        if "__" in name:
            section, key = name.split("__")
            raw[section][key] = value
        else:
            raw[name] = value
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Served:
    by_version: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@contextmanager
def traffic(url: str, per_second: float = 15) -> Iterator[Served]:
    """Embedding requests for tiny from many callers (random routing keys) until the block ends; every one
    must succeed."""
    served, stop = Served(), threading.Event()
    pool, rng = sentences(), random.Random(5)

    def send() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            number = 0
            while not stop.is_set():
                number += 1
                body = {"model": "tiny", "input": [f"{rng.choice(pool)} #{number}"], "user": f"u{rng.getrandbits(40)}"}
                try:
                    answer = client.post("/v1/embeddings", json=body)
                except httpx.HTTPError as error:
                    served.failures.append(repr(error))
                    continue
                if answer.status_code != 200:
                    served.failures.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                version = answer.headers["x-model-version"]
                served.by_version[version] = served.by_version.get(version, 0) + 1
                stop.wait(1 / per_second)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield served
    finally:
        stop.set()
        sender.join(timeout=30)
    assert not served.failures, served.failures[:5]


@contextmanager
def release_gateway(
    repository: Path, milvus: MilvusLiteServer, prefix: str, logs: Path, **settings: str
) -> Iterator[str]:
    """A gateway on ``repository`` with the collection DOCS of tiny, 60 items (in the test's own Milvus)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        "EMBEDSERVE_MODEL_REPOSITORY": str(repository),
        "EMBEDSERVE_MILVUS_URI": milvus.uri,
        "EMBEDSERVE_REDIS_URL": SHARED_REDIS_URL,
        "EMBEDSERVE_REDIS_PREFIX": prefix,
        "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY,
        "EMBEDSERVE_ALLOW_ANONYMOUS_WRITES": "true",
        "EMBEDSERVE_MODEL_RESCAN_S": "0",  # only the release's reload call loads the new version
        "EMBEDSERVE_DRIFT_MIN_SAMPLES": "16",
        "EMBEDSERVE_DRIFT_INTERVAL_S": "1",
        "EMBEDSERVE_ROLLOUT_REFRESH_S": "0.2",
        **settings,
    }
    with gateway(env, logs / "gateway.log") as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            created = client.put(f"/v1/collections/{DOCS}", json={"model": "tiny"})
            assert created.status_code in (200, 201), created.text
            items = [{"id": f"d{i}", "text": text} for i, text in enumerate(sentences()[:60])]
            assert client.post(f"/v1/collections/{DOCS}/items", json={"items": items}).status_code == 200
        yield url


def run_release(
    config: Path, url: str, state_dir: Path, report: Path, timeout_s: float = 600, trigger: str = "manual"
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "trainer", "release", "--config", str(config), "--gateway", url]
    command += ["--state-dir", str(state_dir), "--report", str(report), "--trigger", trigger]
    env = {**os.environ, "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)


def run_watch(config: Path, url: str, api: KubeApi) -> dict[str, Any]:
    """``python -m trainer release-watch`` against the Kubernetes API stand-in; its decision."""
    command = [sys.executable, "-m", "trainer", "release-watch", "--config", str(config), "--gateway", url]
    command += ["--job-template", TEMPLATE, "--kube-api", api.url, "--namespace", NAMESPACE]
    env = {**os.environ, "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    decision: dict[str, Any] = json.loads(done.stdout)
    return decision


def gateway_state(url: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=30) as client:
        models = client.get("/v1/models").json()
        collection = client.get(f"/v1/collections/{DOCS}").json()
        ledger = client.get("/v1/admin/releases", headers=ADMIN).json()
    return models, collection, ledger


def default_version(models: dict[str, Any]) -> int:
    card = next(m for m in models["data"] if m["id"] == "tiny")
    return int(next(v["version"] for v in card["versions"] if v["is_default"]))


@pytest.fixture
def own_milvus(tmp_path: Path) -> Iterator[MilvusLiteServer]:
    """A Milvus server of the test's own: its collections follow versions only its repository has."""
    with milvus_server(tmp_path / "milvus") as server:
        yield server


@pytest.fixture
def repository(stable_repository: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repository"
    shutil.copytree(stable_repository, copy)
    return copy


def test_a_release_trains_gates_exports_serves_and_promotes_a_version_without_restart(
    corpus_file: Path,
    pairs_file: Path,
    repository: Path,
    tmp_path: Path,
    own_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
) -> None:
    config = release_config(corpus_file, pairs_file, repository, tmp_path)
    with release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path) as url:
        with traffic(url) as served:
            done = run_release(config, url, tmp_path / "state", tmp_path / "report.json")
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["outcome"] == "promoted", report
        assert [name for name, stage in report["stages"].items() if stage["status"] == "done"] == [
            "snapshot",
            "claim",
            "train",
            "gate",
            "export",
            "serve",
            "canary",
            "collections",
        ]
        assert report["stages"]["export"]["detail"]["version"] == 2
        assert report["stages"]["gate"]["detail"]["stable_version"] == 1
        gate = report["stages"]["gate"]["detail"]["gate"]
        assert (gate["decision"], gate["parent"], gate["dev_set"]["source"]) == ("passed", "tiny@1", "eval_file")
        manifest = json.loads((repository / "tiny" / "2" / "manifest.json").read_text())
        assert manifest["evaluation"]["gate"] == gate and manifest["forced"] is False  # the verdict, recorded
        assert report["stages"]["canary"]["detail"]["phase"] == "promoted"
        assert report["stages"]["canary"]["detail"]["judgements"], "the rollout's judgements are in the report"
        assert report["stages"]["collections"]["detail"]["collections"][DOCS]["version"] == 2
        assert set(served.by_version) == {"1", "2"}, served  # the same gateway served both, never restarted

        models, collection, ledger = gateway_state(url)
        assert default_version(models) == 2
        assert collection["version"] == 2
        assert [(r["outcome"], r["version"]) for r in ledger["releases"]] == [("promoted", 2)]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'embedserve_release_total{model="tiny",outcome="promoted"} 1.0' in metrics
        assert 'embedserve_release_triggers_total{decision="started",model="tiny",trigger="manual"} 1.0' in metrics


def test_a_refused_gate_exports_nothing_and_exits_non_zero(
    corpus_file: Path,
    pairs_file: Path,
    repository: Path,
    tmp_path: Path,
    own_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
) -> None:
    # No labeled file: the gate's dev set is cut from the corpus's held-out documents (a sentence → the rest).
    config = release_config(
        corpus_file, pairs_file, repository, tmp_path, export__eval_file=None, release__gate={"min_delta": 1.0}
    )
    with release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path) as url:
        done = run_release(config, url, tmp_path / "state", tmp_path / "report.json")
        assert done.returncode == 1, done.stderr[-3000:]
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["outcome"] == "gate_refused"
        assert "mrr@10" in report["failed_checks"][0]
        gate = report["stages"]["gate"]["detail"]["gate"]
        assert (gate["decision"], gate["parent"], gate["dev_set"]["source"]) == ("refused", "tiny@1", "self-supervised")
        assert gate["interval"][0] <= gate["difference"] <= gate["interval"][1] and gate["dev_set"]["queries"] >= 2
        assert report["stages"]["gate"]["status"] == "failed" and "export" not in report["stages"]
        assert sorted(p.name for p in (repository / "tiny").iterdir() if p.is_dir()) == ["1"]
        models, _, ledger = gateway_state(url)
        assert [v["version"] for m in models["data"] if m["id"] == "tiny" for v in m["versions"]] == [1]
        assert [r["outcome"] for r in ledger["releases"]] == ["gate_refused"]


def test_a_canary_that_fails_analysis_leaves_stable_serving_and_names_the_failed_checks(
    corpus_file: Path,
    pairs_file: Path,
    repository: Path,
    tmp_path: Path,
    own_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
) -> None:
    # One step from another random initialisation: a version with (nearly) random weights, let through the gate.
    config = release_config(
        corpus_file,
        pairs_file,
        repository,
        tmp_path,
        optim={"max_steps": 1, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 0, "seed": 99},
        release__gate={"min_delta": -1.0},
    )
    with release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path) as url:
        with traffic(url):
            done = run_release(config, url, tmp_path / "state", tmp_path / "report.json")
        assert done.returncode == 1, done.stderr[-3000:]
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["outcome"] == "canary_failed", report
        assert any("neighbour agreement" in check for check in report["failed_checks"]), report["failed_checks"]
        assert report["stages"]["canary"]["detail"]["phase"] in ("rolled_back", "failed")
        models, collection, ledger = gateway_state(url)
        assert default_version(models) == 1
        assert collection["version"] == 1
        assert [r["outcome"] for r in ledger["releases"]] == ["canary_failed"]


def test_a_release_killed_while_training_resumes_from_its_checkpoint_with_the_same_place(
    corpus_file: Path,
    pairs_file: Path,
    repository: Path,
    tmp_path: Path,
    own_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
) -> None:
    config = release_config(
        corpus_file,
        pairs_file,
        repository,
        tmp_path,
        optim={"max_steps": 200, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 3, "seed": 3},
        checkpoint={"every_steps": 10, "keep": 2},
        release__gate={"min_delta": 1.0},  # the second run ends at the gate: resuming is the point here
    )
    state_dir = tmp_path / "state"
    with release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path) as url:
        command = [sys.executable, "-m", "trainer", "release", "--config", str(config), "--gateway", url]
        command += ["--state-dir", str(state_dir)]
        env = {**os.environ, "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY}
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not list(state_dir.glob("tiny/*/runs/*/checkpoints/step-*.pt")):
                assert first.poll() is None and time.monotonic() < deadline, "the release never wrote a checkpoint"
                time.sleep(0.2)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        release_id = (state_dir / "tiny" / "current").read_text().strip()

        done = run_release(config, url, state_dir, tmp_path / "report.json")
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["release_id"] == release_id
        assert report["stages"]["train"]["detail"]["resumed_from"] is not None
        assert report["stages"]["train"]["detail"]["steps"] == 200
        assert report["outcome"] == "gate_refused" and done.returncode == 1
        _, _, ledger = gateway_state(url)
        assert [(r["release_id"], r["outcome"]) for r in ledger["releases"]] == [(release_id, "gate_refused")]
        assert not (state_dir / "tiny" / "current").exists()


def test_an_auto_trigger_starts_a_release_only_when_the_gateway_says_one_is_due(
    corpus_file: Path,
    pairs_file: Path,
    repository: Path,
    tmp_path: Path,
    own_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
) -> None:
    config = release_config(corpus_file, pairs_file, repository, tmp_path, release__gate={"min_delta": 1.0})
    state_dir = tmp_path / "state"
    # Nothing due (the stable version is young, no drift): exit 0, no release, nothing in the ledger.
    with release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path / "young") as url:
        # The watch asks the same question first, and starts no Job.
        with kube_api(TEMPLATE) as api:
            decision = run_watch(config, url, api)
            assert decision == {"model": "tiny", "decision": "not_due", "reason": None, "job": None}
            assert [method for method, _, _ in api.requests] == []
        done = run_release(config, url, state_dir, tmp_path / "quiet.json", trigger="auto")
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["outcome"] == "not_due"
        assert not (tmp_path / "quiet.json").exists()  # the last release's report is left as it was
        assert gateway_state(url)[2]["releases"] == []
    # Stale: the release starts, as a staleness release (here it ends at its gate).
    stale = {"EMBEDSERVE_RELEASE_MAX_MODEL_AGE_S": "1"}
    with release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path / "stale", **stale) as url:
        done = run_release(config, url, state_dir, tmp_path / "stale.json", trigger="auto")
        report = json.loads((tmp_path / "stale.json").read_text())
        assert (report["trigger"], report["outcome"], done.returncode) == ("staleness", "gate_refused", 1)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'embedserve_release_triggers_total{decision="started",model="tiny",trigger="staleness"} 1.0' in metrics


def test_the_watch_starts_one_release_job_when_a_release_is_due(
    corpus_file: Path,
    pairs_file: Path,
    repository: Path,
    tmp_path: Path,
    own_milvus: MilvusLiteServer,
    shared_redis_prefix: str,
) -> None:
    config = release_config(corpus_file, pairs_file, repository, tmp_path)
    stale = {"EMBEDSERVE_RELEASE_MAX_MODEL_AGE_S": "1"}
    with (
        release_gateway(repository, own_milvus, shared_redis_prefix, tmp_path / "stale", **stale) as url,
        kube_api(TEMPLATE) as api,
    ):
        started = run_watch(config, url, api)
        assert (started["decision"], started["reason"]) == ("started", "staleness")
        (job,) = api.jobs
        assert started["job"] == job["metadata"]["name"] and job["spec"] == api.cronjob["spec"]["jobTemplate"]["spec"]
        # While that Job runs, the next slots start none; once it has finished, a release still due starts one.
        assert run_watch(config, url, api)["decision"] == "already_running"
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
        # Nor while a release Job of another origin runs (the scheduled CronJob's, one made by hand).
        scheduled = {"name": "embedserve-release-29410560", "labels": {"embedserve.io/runs": "release"}}
        api.jobs.append({"metadata": scheduled, "status": {}})
        assert run_watch(config, url, api)["job"] == scheduled["name"]
        api.jobs.pop()
        assert run_watch(config, url, api)["decision"] == "started"
        # The watch itself claims nothing: the gateway's ledger has no release until a Job runs one.
        assert gateway_state(url)[2]["releases"] == []
        # A release the ledger holds as running while no release Job runs (its pod died) gets a Job to resume it.
        for running in api.jobs:
            running["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
        with Gateway(url, ADMIN_KEY) as admin:
            admin.claim_release("tiny", "staleness", "20261205T000000Z-abcdef")
        resumed = run_watch(config, url, api)
        assert (resumed["decision"], resumed["reason"], len(api.jobs)) == ("started", "unfinished", 3)
