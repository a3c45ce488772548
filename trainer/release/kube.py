"""Starting a Job from a CronJob's template from inside the cluster, as ``kubectl create job --from=cronjob/NAME``
does, with the pod's service account (the chart's release-watch Role grants exactly this: read one CronJob, list and
create Jobs). Plain HTTPS to the Kubernetes API; no client library."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# The label on every Job started here, naming its template.
STARTED_FROM = "embedserve.io/started-from"
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Cluster:
    """Where the Kubernetes API is and how to call it."""

    api: str
    namespace: str
    token: str | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, api: str | None = None, namespace: str | None = None) -> "Cluster":
        """The API and namespace of the pod this runs in (its service account's token and CA); ``api`` and
        ``namespace`` override them (a cluster reached from outside, a test)."""
        if api is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if not host or not port:
                raise RuntimeError(
                    "not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset): pass --kube-api URL and --namespace"
                )
            api = f"https://{host}:{port}"
        token_file, ca_file, namespace_file = (SERVICE_ACCOUNT / n for n in ("token", "ca.crt", "namespace"))
        if namespace is None:
            if not namespace_file.is_file():
                raise RuntimeError(f"{namespace_file} is missing: pass --namespace, or mount the service account")
            namespace = namespace_file.read_text().strip()
        return cls(
            api=api.rstrip("/"),
            namespace=namespace,
            token=token_file.read_text().strip() if token_file.is_file() else None,
            ca_file=ca_file if ca_file.is_file() else None,
        )

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        verify: str | bool = str(self.ca_file) if self.ca_file else True
        return httpx.Client(base_url=self.api, headers=headers, verify=verify, timeout=TIMEOUT_S)


def running_jobs(cluster: Cluster, client: httpx.Client, selector: str) -> list[str]:
    """The Jobs of the namespace that match the label ``selector`` and have neither completed nor failed."""
    answer = client.get(f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs", params={"labelSelector": selector})
    _raise_for_status(answer, f"list the Jobs labelled {selector}")
    return [job["metadata"]["name"] for job in answer.json().get("items", []) if not _finished(job)]


def start_job(cluster: Cluster, client: httpx.Client, cronjob: str) -> str:
    """Create a Job from ``cronjob``'s job template (owned by the CronJob, so its history limits prune it); its
    name."""
    base = f"/apis/batch/v1/namespaces/{cluster.namespace}"
    answer = client.get(f"{base}/cronjobs/{cronjob}")
    _raise_for_status(answer, f"read CronJob {cronjob}")
    template = answer.json()
    job_template = template["spec"]["jobTemplate"]
    metadata = job_template.get("metadata", {})
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "generateName": f"{cronjob}-",
            "labels": {**metadata.get("labels", {}), STARTED_FROM: cronjob},
            "annotations": {**metadata.get("annotations", {}), "cronjob.kubernetes.io/instantiate": "manual"},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": cronjob,
                    "uid": template["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": job_template["spec"],
    }
    created = client.post(f"{base}/jobs", json=job)
    _raise_for_status(created, f"create a Job from CronJob {cronjob}")
    name: str = created.json()["metadata"]["name"]
    return name


def _finished(job: dict[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _raise_for_status(answer: httpx.Response, doing: str) -> None:
    if answer.is_success:
        return
    hint = " (the release-watch Role allows it: is the pod running as the chart's release-watch account?)"
    raise RuntimeError(
        f"cannot {doing}: the Kubernetes API answered {answer.status_code} {answer.text[:300]}"
        + (hint if answer.status_code == 403 else "")
    )
