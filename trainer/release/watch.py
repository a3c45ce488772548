"""The release watch (``python -m trainer release-watch``; the chart's release-watch CronJob, every 15 minutes): a
small CPU-only pod that decides whether a release is due and, only then, starts the release Job, with its GPU, from
the template of a suspended CronJob that runs ``release --trigger auto``.

Due means: the model has an unfinished release (a release pod that died; the Job resumes it), or the gateway says
staleness or drift calls for one. Nothing is started while a Job from that template still runs. The Job decides
again when it starts (``--trigger auto``), so a signal that cleared meanwhile starts nothing there either.
"""

from pathlib import Path

from pydantic import BaseModel

from client.gateway import Gateway
from trainer.release.kube import Cluster, running_jobs, start_job


class WatchDecision(BaseModel):
    model: str
    decision: str  # not_due | already_running | started
    reason: str | None = None  # unfinished | staleness | drift
    job: str | None = None


def watch(model: str, gateway: Gateway, state_dir: Path, cluster: Cluster, cronjob: str) -> WatchDecision:
    """Start a Job from ``cronjob`` when a release of ``model`` is due and none runs; what was decided."""
    if (state_dir / model / "current").is_file():
        reason = "unfinished"
    else:
        due = gateway.release_signals(model).due
        if not due:
            return WatchDecision(model=model, decision="not_due")
        reason = due[0]
    with cluster.client() as client:
        running = running_jobs(cluster, client, cronjob)
        if running:
            return WatchDecision(model=model, decision="already_running", reason=reason, job=running[0])
        return WatchDecision(model=model, decision="started", reason=reason, job=start_job(cluster, client, cronjob))
