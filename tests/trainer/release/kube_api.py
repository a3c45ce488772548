"""A stand-in for the Kubernetes API's batch/v1 CronJob and Job routes (no cluster runs here): one CronJob, the Jobs
created from it, every request recorded; ``refuse`` answers 403 as RBAC would."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

NAMESPACE = "embedserve"
TOKEN = "watch-token"


@dataclass
class KubeApi:
    url: str
    cronjob: dict[str, Any]
    jobs: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    refuse: bool = False


def cronjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": "0b5e-cron"},
        "spec": {
            "suspend": True,
            "jobTemplate": {
                "metadata": {"labels": {"app.kubernetes.io/component": "release", "embedserve.io/runs": "release"}},
                "spec": {"backoffLimit": 1, "template": {"spec": {"containers": [{"name": "release"}]}}},
            },
        },
    }


@contextmanager
def kube_api(cronjob_name: str) -> Iterator[KubeApi]:
    state = KubeApi(url="", cronjob=cronjob(cronjob_name))
    base = f"/apis/batch/v1/namespaces/{NAMESPACE}"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            state.requests.append(("GET", url.path, self.headers.get("Authorization")))
            if state.refuse:
                return self.answer(403, {"kind": "Status", "reason": "Forbidden"})
            if url.path == f"{base}/cronjobs/{cronjob_name}":
                return self.answer(200, state.cronjob)
            if url.path == f"{base}/jobs":
                key, value = parse_qs(url.query)["labelSelector"][0].split("=")
                items = [job for job in state.jobs if job["metadata"]["labels"].get(key) == value]
                return self.answer(200, {"kind": "JobList", "items": items})
            self.answer(404, {"kind": "Status", "reason": "NotFound"})

        def do_POST(self) -> None:
            state.requests.append(("POST", self.path, self.headers.get("Authorization")))
            if state.refuse or self.path != f"{base}/jobs":
                return self.answer(403 if state.refuse else 404, {"kind": "Status"})
            job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            job["metadata"]["name"] = f"{job['metadata']['generateName']}{len(state.jobs):05d}"
            job["status"] = {}
            state.jobs.append(job)
            self.answer(201, job)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
