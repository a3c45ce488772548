"""Starting the release Job from its CronJob's template through the Kubernetes API (a stand-in: no cluster here)."""

import pytest

from tests.trainer.release.kube_api import NAMESPACE, TOKEN, kube_api
from trainer.release.kube import STARTED_FROM, Cluster, running_jobs, start_job
from trainer.release.watch import RELEASE_JOBS

TEMPLATE = "embedserve-release-auto"


def test_a_job_is_the_cronjobs_template_owned_by_it_and_labelled_as_started_from_it() -> None:
    with kube_api(TEMPLATE) as api:
        cluster = Cluster(api=api.url, namespace=NAMESPACE, token=TOKEN)
        with cluster.client() as client:
            assert running_jobs(cluster, client, RELEASE_JOBS) == []
            name = start_job(cluster, client, TEMPLATE)
            assert running_jobs(cluster, client, RELEASE_JOBS) == [name]
    (job,) = api.jobs
    template = api.cronjob["spec"]["jobTemplate"]
    assert name.startswith(f"{TEMPLATE}-") and job["spec"] == template["spec"]
    assert job["metadata"]["labels"] == {**template["metadata"]["labels"], STARTED_FROM: TEMPLATE}
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("CronJob", TEMPLATE, "0b5e-cron", True)
    assert {authorization for _, _, authorization in api.requests} == {f"Bearer {TOKEN}"}


def test_finished_jobs_do_not_count_as_running() -> None:
    with kube_api(TEMPLATE) as api:
        cluster = Cluster(api=api.url, namespace=NAMESPACE)
        with cluster.client() as client:
            *_, pending = (start_job(cluster, client, TEMPLATE) for _ in range(3))
            api.jobs[0]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
            api.jobs[1]["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
            assert running_jobs(cluster, client, RELEASE_JOBS) == [pending]


def test_a_refusal_says_which_call_and_which_account_is_needed() -> None:
    with kube_api(TEMPLATE) as api:
        api.refuse = True
        cluster = Cluster(api=api.url, namespace=NAMESPACE)
        with cluster.client() as client, pytest.raises(RuntimeError, match=r"read CronJob .* 403 .*release-watch"):
            start_job(cluster, client, TEMPLATE)


def test_outside_a_pod_the_api_must_be_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError, match="--kube-api"):
        Cluster.in_cluster()
