"""The release watch (``python -m trainer release-watch``; the chart's release-watch CronJob, every 15 minutes): a
small CPU-only pod that decides whether a release is due and, only then, starts the release Job, with its GPU, from
the template of a suspended CronJob that runs ``release --trigger auto``.

Due means: the gateway's ledger holds a running release of the model while no release Job runs (its pod died; the
Job resumes it from the state claim), or the gateway says staleness or drift calls for one. Nothing is started while
any release Job runs (the chart labels every release Job ``RELEASE_JOBS``: scheduled, started here or by hand). The
watch asks only the gateway and the Kubernetes API, so it mounts no claim (a ReadWriteOnce state claim held by a
release Job on a GPU node would keep it from starting). The Job decides again when it starts (``--trigger auto``),
so a signal that cleared meanwhile starts nothing there either.
"""

from pydantic import BaseModel

from client.gateway import Gateway
from trainer.release.kube import Cluster, running_jobs, start_job

RELEASE_JOBS = "embedserve.io/runs=release"  # the label selector of every Job that runs a release


class WatchDecision(BaseModel):
    model: str
    decision: str  # not_due | already_running | started
    reason: str | None = None  # unfinished | staleness | drift
    job: str | None = None


def watch(model: str, gateway: Gateway, cluster: Cluster, cronjob: str) -> WatchDecision:
    """Start a Job from ``cronjob`` when a release of ``model`` is due and no release Job runs; what was decided."""
    signals = gateway.release_signals(model)
    reason = "unfinished" if signals.release_running else (signals.due[0] if signals.due else None)
    if reason is None:
        return WatchDecision(model=model, decision="not_due")
    with cluster.client() as client:
        running = running_jobs(cluster, client, RELEASE_JOBS)
        if running:
            return WatchDecision(model=model, decision="already_running", reason=reason, job=running[0])
        return WatchDecision(model=model, decision="started", reason=reason, job=start_job(cluster, client, cronjob))
