"""The local Triton Inference Server (scripts/run_triton.sh) as a process the tests start, kill and restart."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from loadtests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalTriton:
    """``extra_args`` go to tritonserver as they are; with ``--exit-on-error=false`` a version that fails to
    load leaves the server running but never ready (strict readiness): pass ``until="live"`` to ``start``."""

    def __init__(
        self, repository: Path, log_path: Path, extra_args: tuple[str, ...] = (), model_control: str = "none"
    ) -> None:
        if not list((ROOT / ".triton").glob(".complete-*")):
            raise RuntimeError("the local Triton is not set up: run scripts/setup_triton.sh (make test does)")
        self.repository = repository
        self.log_path = log_path
        self.extra_args = extra_args
        self.model_control = (
            model_control  # --model-control-mode: none, poll, or explicit (every model loaded at start)
        )
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 120.0, until: str = "ready") -> None:
        """Start and wait until Triton says it is ``until`` (ready, or live: answering, every load attempted)."""
        ports = [str(p) for p in (self.http_port, self.grpc_port, self.metrics_port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(ROOT / "scripts" / "run_triton.sh"), str(self.repository), *ports, *self.extra_args],
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "TRITON_MODEL_CONTROL_MODE": self.model_control},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/v2/health/{until}", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout_s}s: {self.log_path.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 40.0) -> None:
        """SIGTERM, then wait (Triton's graceful exit takes up to 30 s) until its ports are closed."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        deadline = time.monotonic() + timeout_s
        while any(port_open(p) for p in (self.http_port, self.grpc_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
