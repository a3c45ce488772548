"""Bad bodies are answered cheaply: refused before they are all read, parsed only after authentication,
counted before anything walks them; the gateway keeps serving others meanwhile."""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from loadtests.processes import free_port
from service.app import create_app
from service.settings import ApiKey, Settings

CLIENT_KEY = "limits-client-key"


class GatewayProcess:
    """A gateway process whose CPU time and resident memory the test can read from /proc."""

    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.url = url

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def gateway_process(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("limits")
    port = free_port()
    env = {
        **os.environ,
        "EMBEDSERVE_HOST": "127.0.0.1",
        "EMBEDSERVE_PORT": str(port),
        "EMBEDSERVE_MODEL_REPOSITORY": str(model_repository),
        "EMBEDSERVE_MILVUS_URI": str(folder / "milvus.db"),
        "EMBEDSERVE_LOG_LEVEL": "WARNING",
    }
    with (folder / "gateway.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, (folder / "gateway.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield GatewayProcess(process, url)
    finally:
        process.terminate()
        process.wait(timeout=30)


def one_character_strings(total_bytes: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """A JSON body ``{"input": ["a", "a", ...]}`` of about ``total_bytes``, streamed in chunks."""
    yield b'{"model": "tiny", "input": ["a"'
    chunk = b',"a"' * (chunk_bytes // 4)
    for _ in range(total_bytes // len(chunk)):
        yield chunk
    yield b"]}"


class Bystander:
    """Small requests sent the whole time a big one is in flight: every one must be answered 200."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                answer = http.post(f"{self.url}/v1/embeddings", json={"model": "tiny", "input": "still here"})
                self.statuses.append(answer.status_code)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_100_mb_body_is_refused_cheaply_while_others_are_served(
    gateway_process: GatewayProcess, declared: bool
) -> None:
    total = 100 * 1024 * 1024
    body = b"".join(one_character_strings(total)) if declared else one_character_strings(total)
    cpu, rss = gateway_process.cpu_s(), gateway_process.rss_mb()
    with Bystander(gateway_process.url) as bystander:
        try:
            answer = httpx.post(
                f"{gateway_process.url}/v1/embeddings",
                content=body,
                headers={"content-type": "application/json"},
                timeout=60,
            )
            status = answer.status_code
        except httpx.TransportError:  # the gateway answered 413 and closed while the client still sent
            status = 413
        time.sleep(0.5)  # the bystander goes on after the refusal too
    assert status in (400, 413)
    assert gateway_process.cpu_s() - cpu < 1.0 + 0.05 * len(bystander.statuses)  # each bystander costs a bit
    assert gateway_process.rss_mb() - rss < 50
    assert bystander.statuses and set(bystander.statuses) == {200}


def test_a_body_under_the_byte_limit_with_a_million_inputs_is_a_400_before_it_is_walked(
    gateway_process: GatewayProcess,
) -> None:
    body = b"".join(one_character_strings(4 * 1024 * 1024))  # ~1M one-character inputs, under 8 MiB
    cpu, rss = gateway_process.cpu_s(), gateway_process.rss_mb()
    answer = httpx.post(
        f"{gateway_process.url}/v1/embeddings", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400 and "split it into several requests" in answer.json()["error"]["message"]
    assert gateway_process.cpu_s() - cpu < 1.0
    assert gateway_process.rss_mb() - rss < 100


def test_authentication_comes_before_the_body_is_parsed(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": [ApiKey(key=SecretStr(CLIENT_KEY))]})
    with TestClient(create_app(keyed)) as client:
        garbage = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        assert garbage.status_code == 401  # not 400: nobody unauthenticated gets the body parsed
        authorised = {"content-type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
        assert client.post("/v1/embeddings", content=b"{not json", headers=authorised).status_code == 400
        body = json.dumps({"model": "tiny", "input": "x"}).encode()
        assert client.post("/v1/embeddings", content=body, headers=authorised).status_code == 200
