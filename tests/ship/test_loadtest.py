"""`make loadtest` against a real gateway process in the middle of a canary, and the SLO verdict's rules."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from loadtests.loadtest import DEFAULT_SLO, Sample, SloConfig, judge
from loadtests.processes import free_port, gateway
from tests.ship.conftest import ROOT

ADMIN_KEY = "loadtest-admin-key"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def canary_gateway(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway process serving tiny@1 as stable and tiny@2 as a 50 % canary."""
    folder = tmp_path_factory.mktemp("loadtest-gateway")
    env = {
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_DEFAULT_MODEL": "tiny",
        "EMBEDSERVE_STABLE_VERSIONS": '{"tiny": 1}',
        "EMBEDSERVE_MILVUS_URI": str(folder / "milvus.db"),
        "EMBEDSERVE_ALLOW_ANONYMOUS_WRITES": "true",
        "EMBEDSERVE_ADMIN_API_KEY": ADMIN_KEY,
    }
    with gateway(env, folder / "gateway.log") as url:
        started = httpx.put(
            f"{url}/v1/rollouts/tiny",
            json={"canary_version": 2, "steps": [50, 100]},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )
        assert started.status_code == 200, started.text
        yield url


def make_loadtest(
    url: str, out: Path, slo: Path, duration: int, *user_classes: str
) -> subprocess.CompletedProcess[str]:
    command = [
        "make", "--no-print-directory", "-o", ".venv/.installed", "loadtest",
        f"PY={sys.executable}", f"URL={url}", f"DURATION={duration}", "USERS=4", "MODEL=tiny",
        f"SLO={slo}", f"OUT={out}", f"LOADTEST_ARGS=--think-time-s 0.1 {' '.join(user_classes)}",
    ]  # fmt: skip
    # The runner bounds Locust itself (duration + 30 s grace); this timeout only guards the test.
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)


def write_slo(path: Path, p95_ms: float, max_error_rate: float) -> Path:
    objective = {"p95_ms": p95_ms, "max_error_rate": max_error_rate}
    slos = {"embeddings": objective, "collection search": objective, "collection upsert": objective}
    path.write_text(yaml.safe_dump({"slos": slos, "min_requests": 5}))
    return path


def test_make_loadtest_passes_a_met_slo_and_splits_results_by_version(canary_gateway: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = make_loadtest(canary_gateway, out, write_slo(tmp_path / "slo.yaml", 60_000, 0.0), 12)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS:" in result.stdout

    summary = json.loads((out / "loadtest.json").read_text())
    assert summary["verdict"]["passed"] is True
    groups = summary["groups"]
    assert set(groups) == {"embeddings short", "embeddings long", "collection search", "collection upsert"}
    # Routing keys spread embedding requests over the stable and the canary version; a collection
    # answers with the one version it was created on.
    assert set(groups["embeddings short"]) == {"all", "1", "2"}
    (collection_version,) = set(groups["collection search"]) - {"all"}
    assert set(groups["collection upsert"]) == {"all", collection_version}
    assert all(stats["errors"] == 0 for versions in groups.values() for stats in versions.values())
    judged = {(o["slo"], o["version"]) for o in summary["verdict"]["objectives"]}
    assert {("embeddings", "all"), ("embeddings", "1"), ("embeddings", "2")} <= judged

    report = (out / "loadtest.html").read_text()
    assert "embeddings short v1" in report and "embeddings short v2" in report
    png = (out / "loadtest-latency.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_make_loadtest_fails_an_slo_tighter_than_reality(canary_gateway: str, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = make_loadtest(canary_gateway, out, write_slo(tmp_path / "slo.yaml", 0.001, 0.0), 6, "ShortTextUser")
    assert result.returncode != 0
    assert "FAIL:" in result.stdout and "P95" in result.stdout
    # make reports the runner's exit status 1 (an SLO breach, not a failed run).
    assert "Error 1" in result.stderr
    summary = json.loads((out / "loadtest.json").read_text())
    assert summary["verdict"]["passed"] is False
    breached = [o for o in summary["verdict"]["objectives"] if not o["met"]]
    assert breached and all(o["p95_ms"] > o["p95_limit_ms"] for o in breached)
    assert set(summary["groups"]) == {"embeddings short"}
    assert (out / "loadtest.html").exists() and (out / "loadtest-latency.png").exists()


def test_an_unreachable_gateway_is_a_failed_run_not_a_verdict(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loadtests.loadtest", "--url", f"http://127.0.0.1:{free_port()}"]
    result = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot reach the gateway" in result.stdout
    assert not (tmp_path / "loadtest.json").exists()


def samples(group: str, version: str, count: int, ms: float, failures: int = 0) -> list[Sample]:
    return [Sample(t=float(i), group=group, version=version, ms=ms, ok=i >= failures, status=200) for i in range(count)]


def test_verdict_judges_matched_groups_together_and_each_version_with_enough_requests() -> None:
    config = SloConfig.model_validate(
        {"slos": {"embeddings": {"p95_ms": 100, "max_error_rate": 0.01}}, "min_requests": 10}
    )
    traffic = (
        samples("embeddings short", "1", 50, 20)
        + samples("embeddings long", "1", 50, 80)
        + samples("embeddings short", "2", 5, 500)  # too few to be judged alone
        + samples("collection search", "1", 50, 10_000)  # matched by no SLO
    )
    judgements = {(j.slo, j.version): j for j in judge(traffic, config)}
    assert set(judgements) == {("embeddings", "all"), ("embeddings", "1")}
    assert judgements[("embeddings", "all")].requests == 105 and judgements[("embeddings", "all")].met
    assert judgements[("embeddings", "1")].requests == 100


def test_verdict_fails_on_latency_or_errors_of_one_version() -> None:
    config = SloConfig.model_validate(
        {"slos": {"embeddings": {"p95_ms": 100, "max_error_rate": 0.01}}, "min_requests": 10}
    )
    slow_canary = samples("embeddings short", "1", 100, 20) + samples("embeddings short", "2", 20, 300)
    assert not judgements_met(judge(slow_canary, config), "2")
    failing_canary = samples("embeddings short", "1", 100, 20) + samples("embeddings short", "2", 50, 20, failures=2)
    assert not judgements_met(judge(failing_canary, config), "2")
    assert judgements_met(judge(failing_canary, config), "1")


def judgements_met(judgements: list, version: str) -> bool:
    return all(j.met for j in judgements if j.version == version)


def test_slo_config_is_checked() -> None:
    shipped = SloConfig.load(DEFAULT_SLO)
    assert shipped.slos["embeddings"].p95_ms == 100
    with pytest.raises(ValidationError):
        SloConfig.model_validate({"slos": {"embeddings": {"p95": 100, "max_error_rate": 0.01}}})
    with pytest.raises(ValidationError):
        SloConfig.model_validate({"slos": {}})
