"""Prometheus metrics labelled by model and version; JSON logs that never carry request text."""

import json
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from tests.helpers import metric, parse_metrics


def samples(client: TestClient) -> dict[str, list]:
    return parse_metrics(client.get("/metrics").text)


def test_requests_inputs_and_tokens_are_counted_per_version(client: TestClient) -> None:
    before = samples(client)
    client.post("/v1/embeddings", json={"input": ["a b c", "d e"], "model": "tiny@1"})
    client.post("/v1/embeddings", json={"input": "x", "model": "tiny@2"})
    client.post("/v1/embeddings", json={"input": "", "model": "tiny@2"})
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("embedserve_requests_total", model="tiny", version="1", status="200") == 1
    assert delta("embedserve_requests_total", model="tiny", version="2", status="200") == 1
    assert delta("embedserve_requests_total", model="tiny", version="2", status="400") == 1
    assert delta("embedserve_inputs_embedded_total", model="tiny", version="1") == 2
    assert delta("embedserve_tokens_embedded_total", model="tiny", version="1") == 2 * 2 + 5  # CLS/SEP each
    assert delta("embedserve_request_duration_seconds_count", model="tiny", version="1") == 1
    info = [s for s in after["embedserve_model_info"] if s.labels["model"] == "minilm"]
    assert info and info[0].labels["version"] == "1" and len(info[0].labels["sha256"]) == 64


def test_access_log_is_json_with_sizes_and_never_the_text(client: TestClient, tmp_path: Path) -> None:
    # Run a server process so the real logging configuration is used.
    secret = "my-secret-sentence-42"
    script = (
        "import logging;from service.telemetry.logs import configure_logging;configure_logging('INFO');"
        "from fastapi.testclient import TestClient;from service.app import create_app;"
        "from service.settings import Settings;import sys;"
        "c=TestClient(create_app(Settings(model_repository=sys.argv[1],milvus_uri=sys.argv[2])));c.__enter__();"
        f"c.post('/v1/embeddings',json={{'input':['{secret}','two'],'model':'tiny'}})"
    )
    repository = str(client.app.state.settings.model_repository)  # type: ignore[attr-defined]
    milvus = str(tmp_path / "milvus.db")
    result = subprocess.run(
        [sys.executable, "-c", script, repository, milvus], capture_output=True, text=True, timeout=120
    )
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "embedserve.access"]
    assert access and access[0]["inputs"] == 2 and access[0]["status"] == 200 and access[0]["model"] == "tiny"
    assert "request_id" in access[0] and access[0]["tokens"] > 0
    assert secret not in result.stderr


def test_the_gateway_never_imports_torch() -> None:
    script = "import sys, service.app, service.__main__; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
