"""Run an HTTP server (the gateway, or the naive reference server) as a real process on a free port."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from pymilvus import MilvusClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(
    module_args: list[str], env: dict[str, str], log_path: Path, port: int | None = None, timeout_s: float = 90.0
) -> Iterator[str]:
    """Run ``python -m <module_args>`` with ``env`` and EMBEDSERVE_HOST/PORT set; yield its base URL once
    ``/readyz`` answers 200; stop it (SIGTERM, then SIGKILL) on exit."""
    port = port or free_port()
    full_env = {**os.environ, **env, "EMBEDSERVE_HOST": "127.0.0.1", "EMBEDSERVE_PORT": str(port)}
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", *module_args], env=full_env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {timeout_s}s: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def gateway(env: dict[str, str], log_path: Path, timeout_s: float = 90.0) -> Iterator[str]:
    """The embedserve gateway (``python -m service serve``) with ``env`` as its EMBEDSERVE_* settings."""
    with server_process(["service", "serve"], env, log_path, timeout_s=timeout_s) as url:
        yield url


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
