"""The chart's release CronJobs: `python -m trainer release` on a schedule, and the watch that releases on drift or
staleness; what they mount, which key they use, and what the schema refuses."""

from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.ship.conftest import NAMESPACE, RELEASE, SCENARIOS, find, render

STATE_DIR = "/var/lib/embedserve/releases"
# What a release needs besides release.enabled (values.schema.json refuses it without them).
NEEDS = {
    "secrets": {"adminApiKey": {"name": "embedserve-admin"}},
    "release": {"corpus": {"existingClaim": "corpus"}, "stateClaim": "release-state"},
}


def cronjob(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (job,) = find(manifests, "CronJob", name)
    return job


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(job)["containers"]
    return only


def with_release(**release: Any) -> dict[str, Any]:
    return {**NEEDS, "release": {**NEEDS["release"], **release}}


@pytest.mark.parametrize("scenario", ["default", *[s for s in SCENARIOS if s != "bundled-redis"]])
def test_no_release_jobs_unless_enabled(scenario: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert find(rendered[scenario], "CronJob") == []
    assert find(rendered[scenario], "ConfigMap", f"{RELEASE}-release") == []


def test_the_release_runs_on_its_schedule_one_at_a_time(rendered: dict[str, list[dict[str, Any]]]) -> None:
    job = cronjob(rendered["bundled-redis"], f"{RELEASE}-release")
    spec = job["spec"]
    assert (spec["schedule"], spec["timeZone"]) == ("0 3 * * 0", "Etc/UTC")
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["startingDeadlineSeconds"] == 600
    job_spec = spec["jobTemplate"]["spec"]
    assert (job_spec["backoffLimit"], job_spec["activeDeadlineSeconds"]) == (1, 86400)
    # A failed attempt keeps its pod and logs; the retry is a new pod resuming from the claim.
    assert pod_spec(job)["restartPolicy"] == "Never"
    release = container(job)
    assert release["image"] == "registry.example.com/embedserve/trainer:0.1.0"
    assert release["command"] + release["args"] == [
        *("python", "-m", "trainer", "release"),
        *("--config", "/etc/embedserve/release/run.yaml"),
        *("--gateway", f"http://{RELEASE}.{NAMESPACE}.svc:80"),
        *("--trigger", "schedule"),
        *("--state-dir", STATE_DIR),
        *("--report", f"{STATE_DIR}/report.json"),
    ]


def test_the_watch_starts_the_gpu_release_only_from_a_suspended_template(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["bundled-redis"]
    release, auto = cronjob(manifests, f"{RELEASE}-release"), cronjob(manifests, f"{RELEASE}-release-auto")
    # The template: the same release with --trigger auto, GPU and volumes, never run on its own schedule.
    assert auto["spec"]["suspend"] is True and "suspend" not in release["spec"]
    args = container(auto)["args"]
    assert args[args.index("--trigger") + 1] == "auto"
    assert [("auto" if a == "schedule" else a) for a in container(release)["args"]] == args
    assert pod_spec(auto)["volumes"] == pod_spec(release)["volumes"]
    assert container(auto)["resources"] == container(release)["resources"]
    # The watch: every 15 minutes, a small pod with no GPU that decides and starts a Job from that template.
    watch = cronjob(manifests, f"{RELEASE}-release-watch")
    assert watch["spec"]["schedule"] == "*/15 * * * *" and watch["spec"]["concurrencyPolicy"] == "Forbid"
    decide = container(watch)
    assert decide["command"] + decide["args"] == [
        *("python", "-m", "trainer", "release-watch"),
        *("--config", "/etc/embedserve/release/run.yaml"),
        *("--gateway", f"http://{RELEASE}.{NAMESPACE}.svc:80"),
        *("--job-template", f"{RELEASE}-release-auto"),
    ]
    assert "nvidia.com/gpu" not in str(decide["resources"]) and "nvidia.com/gpu" not in str(pod_spec(watch))
    assert decide["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    # Every release Job is labelled so (the watch starts none while one runs); the watch's own Jobs are not.
    for job, runs in ((release, "release"), (auto, "release"), (watch, None)):
        assert job["spec"]["jobTemplate"]["metadata"]["labels"].get("embedserve.io/runs") == runs
    # No claim: it asks the gateway and the Kubernetes API only.
    assert [m["mountPath"] for m in decide["volumeMounts"]] == ["/etc/embedserve/release", "/tmp"]
    assert not [v for v in pod_spec(watch)["volumes"] if "persistentVolumeClaim" in v]
    env = {e["name"]: e for e in decide["env"]}
    assert (
        env["EMBEDSERVE_ADMIN_API_KEY"] == {e["name"]: e for e in container(release)["env"]}["EMBEDSERVE_ADMIN_API_KEY"]
    )
    # Its own account, the only one of the chart with a token, allowed to read that template and start Jobs.
    spec = pod_spec(watch)
    assert spec["serviceAccountName"] == f"{RELEASE}-release-watch" and spec["automountServiceAccountToken"] is True
    (role,) = find(manifests, "Role", f"{RELEASE}-release-watch")
    assert {
        "apiGroups": ["batch"],
        "resources": ["cronjobs"],
        "resourceNames": [f"{RELEASE}-release-auto"],
        "verbs": ["get"],
    } in role["rules"]
    assert {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "create"]} in role["rules"]
    (binding,) = find(manifests, "RoleBinding", f"{RELEASE}-release-watch")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-release-watch", "namespace": NAMESPACE}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_release_mounts_corpus_repository_and_state(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["bundled-redis"]
    job = cronjob(manifests, f"{RELEASE}-release")
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}

    def volume(path: str) -> dict[str, Any]:
        return volumes[mounts[path]["name"]]

    assert mounts["/etc/embedserve/release"]["readOnly"] is True
    assert volume("/etc/embedserve/release")["configMap"]["name"] == f"{RELEASE}-release"
    assert mounts["/data/corpus"]["readOnly"] is True
    assert volume("/data/corpus")["persistentVolumeClaim"] == {"claimName": "embedserve-corpus", "readOnly": True}
    assert volume(STATE_DIR)["persistentVolumeClaim"] == {"claimName": "embedserve-release-state"}
    assert {"/tmp", "/dev/shm"} <= set(mounts)
    # The gateways' repository, at the same path and writable: exported versions land where the gateways hot-load.
    (gateway,) = find(manifests, "Deployment", RELEASE)
    gateway_models = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    claim = gateway_models["persistentVolumeClaim"]["claimName"]
    assert volume("/models")["persistentVolumeClaim"]["claimName"] == claim
    assert "readOnly" not in mounts["/models"] and "readOnly" not in volume("/models")["persistentVolumeClaim"]

    (config_map,) = find(manifests, "ConfigMap", f"{RELEASE}-release")
    run = yaml.safe_load(config_map["data"]["run.yaml"])
    assert run["export"] == {"model": "minilm", "repository": "/models"}  # the chart sets the repository
    assert run["corpus"]["path"].startswith("/data/corpus/") and run["output_dir"].startswith(STATE_DIR)
    assert run["optim"] == {"max_steps": 2000} and run["run_name"] == "weekly"


def test_release_gets_a_gpu_and_the_admin_key_unprivileged(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["bundled-redis"]
    job = cronjob(manifests, f"{RELEASE}-release")
    release = container(job)
    assert release["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(job)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(job)["tolerations"]
    # The admin key comes from the Secret the gateway reads it from.
    (gateway,) = find(manifests, "Deployment", RELEASE)
    gateway_env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    release_env = {e["name"]: e for e in release["env"]}
    assert release_env["EMBEDSERVE_ADMIN_API_KEY"] == gateway_env["EMBEDSERVE_ADMIN_API_KEY"]
    assert set(release_env["EMBEDSERVE_ADMIN_API_KEY"]) == {"name", "valueFrom"}
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
    assert release["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec(job)["automountServiceAccountToken"] is False


def test_the_network_policy_lets_release_jobs_reach_the_gateway(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["bundled-redis"]
    (policy,) = find(manifests, "NetworkPolicy", RELEASE)
    peers = policy["spec"]["ingress"][0]["from"]
    for name in (f"{RELEASE}-release", f"{RELEASE}-release-auto", f"{RELEASE}-release-watch"):
        labels = cronjob(manifests, name)["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        assert {"podSelector": {"matchLabels": labels}} in peers


def test_defaults_of_an_enabled_release() -> None:
    manifests = render(with_release(enabled=True))
    job = cronjob(manifests, f"{RELEASE}-release")
    assert find(manifests, "CronJob", f"{RELEASE}-release-watch") == []
    assert find(manifests, "Role") == [] and find(manifests, "RoleBinding") == []
    assert container(job)["image"] == "embedserve/trainer:0.1.0"  # the chart's appVersion
    assert container(job)["resources"]["requests"]["nvidia.com/gpu"] == 1
    run = yaml.safe_load(find(manifests, "ConfigMap", f"{RELEASE}-release")[0]["data"]["run.yaml"])
    assert run == {
        "run_name": "release",
        "output_dir": f"{STATE_DIR}/runs",
        "corpus": {"path": "/data/corpus"},
        "export": {"repository": "/models"},
    }
    # Only the watch: its CronJob and the template it starts Jobs from.
    watch_only = render(with_release(watch={"enabled": True}))
    names = sorted(j["metadata"]["name"] for j in find(watch_only, "CronJob"))
    assert names == [f"{RELEASE}-release-auto", f"{RELEASE}-release-watch"]


def test_a_config_change_rolls_into_the_next_run() -> None:
    def checksum(values: dict[str, Any]) -> str:
        job = cronjob(render(values), f"{RELEASE}-release")
        annotations: dict[str, str] = job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/release-config"]

    base = with_release(enabled=True)
    changed = with_release(enabled=True, config={"optim": {"max_steps": 10}})
    assert checksum(base) != checksum(changed)


def test_long_names_stay_within_the_cronjob_limit() -> None:
    manifests = render({**with_release(enabled=True, watch={"enabled": True}), "fullnameOverride": "e" * 63})
    names = {
        job["metadata"]["name"].rsplit("e-release", 1)[1]: job["metadata"]["name"] for job in find(manifests, "CronJob")
    }
    assert sorted(names) == ["", "-auto", "-watch"] and all(len(name) <= 52 for name in names.values()), names
    (role,) = find(manifests, "Role")
    assert role["rules"][0]["resourceNames"] == [names["-auto"]]


@pytest.mark.parametrize(
    "values",
    [
        {"release": {"enabled": True}},  # no claims, no admin key
        {**NEEDS, "release": {"enabled": True, "stateClaim": "release-state"}},  # no corpus
        {**NEEDS, "release": {"enabled": True, "corpus": {"existingClaim": "corpus"}}},  # no state claim
        {"release": {**NEEDS["release"], "enabled": True}},  # no admin key to start canaries with
        {"release": {"watch": {"enabled": True}}},  # the watch needs the same
        # An object store cannot be written through a mount.
        {
            **with_release(enabled=True),
            "modelRepository": {"source": "objectStore", "objectStore": {"uri": "s3://models/repo"}},
        },
        with_release(enabled=True, config={"export": {"repository": "/elsewhere"}}),  # the chart's to set
        with_release(enabled=True, concurrencyPolicy="Allow"),  # Forbid is not a choice
        with_release(enabled=True, schedule=""),
    ],
)
def test_schema_refuses_a_release_that_cannot_work(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="values don't meet the specifications of the schema"):
        render(values)
