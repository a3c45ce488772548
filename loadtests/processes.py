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
