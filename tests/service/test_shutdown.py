"""A gateway told to stop (SIGTERM) first drains: /readyz says 503 while it still serves, then it exits."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtests.processes import free_port

DRAIN_S = 8


def test_sigterm_drains_then_stops(model_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EMBEDSERVE_HOST": "127.0.0.1",
        "EMBEDSERVE_PORT": str(port),
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_MILVUS_URI": str(tmp_path / "milvus.db"),
        "EMBEDSERVE_SHUTDOWN_DRAIN_S": str(DRAIN_S),
    }
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "gateway.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        process.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503 and "shutting down" in ready.json()["problems"][0]
        served = httpx.post(f"{url}/v1/embeddings", json={"input": "still served", "model": "tiny"}, timeout=5)
        assert served.status_code == 200  # out of rotation, not yet gone
        # uvicorn re-raises the signal it stopped on once it has shut down cleanly.
        assert process.wait(timeout=DRAIN_S + 30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert '"draining before shutdown"' in (tmp_path / "gateway.log").read_text()
