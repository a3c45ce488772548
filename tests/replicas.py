"""Several gateway replicas as real processes, sharing what replicas share in production: one Redis (a
private key prefix on the machine's), one Milvus server process (Milvus Lite run as a gRPC server that
serialises writes, ``python -m service.vectors.lite_server``, what ``make milvus`` runs), and optionally one
Triton."""

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pymilvus import MilvusClient

from loadtests.processes import free_port, gateway

# What ``make milvus`` runs; ("milvus_lite", "server") is milvus_lite's own server, which does not serialise writes.
SERIALISED_SERVER = ("service.vectors.lite_server",)


class MilvusLiteServer:
    """``python -m service.vectors.lite_server`` on a free port: one Milvus that several gateways reach by URI."""

    def __init__(self, data_dir: Path, module: tuple[str, ...] = SERIALISED_SERVER) -> None:
        self.data_dir = data_dir
        self.module = module
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", *self.module),
                *("--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)),
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Milvus Lite server exited with {self.process.returncode}")
            try:
                MilvusClient(uri=self.uri, timeout=1).list_collections()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Milvus Lite server on port {self.port} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@contextmanager
def milvus_server(data_dir: Path, module: tuple[str, ...] = SERIALISED_SERVER) -> Iterator[MilvusLiteServer]:
    server = MilvusLiteServer(data_dir, module)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def gateways(count: int, env: dict[str, str], folder: Path) -> Iterator[list[str]]:
    """``count`` gateway processes with the same ``env`` (EMBEDSERVE_* settings); their base URLs, each ready
    (/readyz 200). Logs in ``folder``/gateway-<i>.log."""
    with ExitStack() as stack:
        urls = [stack.enter_context(gateway(env, folder / f"gateway-{i}.log")) for i in range(count)]
        yield urls
