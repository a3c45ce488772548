"""The Helm chart: lint, render every ci/*-values.yaml, validate against Kubernetes schemas, and what it promises."""

import json
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.ship.conftest import CHART, NAMESPACE, RELEASE, SCENARIOS, find, render, scenario_values
from tests.ship.operator_schemas import CRD_SCHEMAS

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
KUBE_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# The one lint finding allowed here: Redis and Milvus are pinned (Chart.lock) but not vendored, and
# `helm dependency build` needs the network (test_chart_dependencies.py runs the --strict lint).
MISSING_DEPENDENCIES = "chart directory is missing these dependencies: redis,milvus"
LINT_WARNING = 2
SECRET_SETTINGS = ("EMBEDSERVE_API_KEYS", "EMBEDSERVE_ADMIN_API_KEY", "EMBEDSERVE_MILVUS_TOKEN")


def gateway(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(manifests, "Deployment", RELEASE)
    return deployment


def gateway_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in gateway(manifests)["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return container


def settings(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (config_map,) = find(manifests, "ConfigMap", RELEASE)
    data: dict[str, str] = config_map["data"]
    return data


def env(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in gateway_container(manifests).get("env", [])}


def test_there_is_a_values_file_per_install_scenario() -> None:
    assert SCENARIOS == ["bundled-redis", "external-services", "gpu-production", "laptop"]


@pytest.mark.parametrize("scenario", ["default", *SCENARIOS])
def test_chart_lints_clean(scenario: str) -> None:
    values = {} if scenario == "default" else scenario_values(scenario)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert report["errors"] == []
    warnings = [m["error"] for m in report["messages"] if m["severity"] >= LINT_WARNING]
    assert set(warnings) <= {MISSING_DEPENDENCIES}, warnings


@pytest.mark.parametrize("scenario", ["default", *SCENARIOS])
def test_rendered_manifests_validate_against_kubernetes_schemas(
    scenario: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    problems = []
    for manifest in rendered[scenario]:
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in CRD_SCHEMAS:
            for error in jsonschema.Draft7Validator(CRD_SCHEMAS[manifest["kind"]]).iter_errors(manifest):
                problems.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{where} (Kubernetes {version}): {'.'.join(map(str, error.path))}: {error.message}")
    assert problems == []


@pytest.mark.parametrize("scenario", ["default", *SCENARIOS])
def test_gateway_pods_are_probed_bounded_and_unprivileged(
    scenario: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    manifests = rendered[scenario]
    pod = gateway(manifests)["spec"]["template"]["spec"]
    container = gateway_container(manifests)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs writable /tmp and /data volumes.
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/data", "/models"}
    # Settings come in from the ConfigMap; a change of it rolls the pods.
    assert container["envFrom"] == [{"configMapRef": {"name": RELEASE}}]
    assert "checksum/config" in gateway(manifests)["spec"]["template"]["metadata"]["annotations"]


def test_replicas_spread_over_zones_and_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario in ("default", "gpu-production", "external-services"):
        constraints = gateway(rendered[scenario])["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        selector = gateway(rendered[scenario])["spec"]["selector"]["matchLabels"]
        assert all(c["labelSelector"]["matchLabels"] == selector for c in constraints)


@pytest.mark.parametrize("scenario", ["default", *SCENARIOS])
def test_secrets_are_only_referenced(scenario: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered[scenario]
    assert find(manifests, "Secret") == []
    assert not set(SECRET_SETTINGS) & set(settings(manifests))
    for name in SECRET_SETTINGS:
        if name in env(manifests):
            assert set(env(manifests)[name]) == {"name", "valueFrom"}
            assert env(manifests)[name]["valueFrom"]["secretKeyRef"]["name"]


def test_production_takes_every_key_from_a_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    variables = env(rendered["gpu-production"])
    refs = {name: variables[name]["valueFrom"]["secretKeyRef"] for name in SECRET_SETTINGS}
    assert refs["EMBEDSERVE_API_KEYS"] == {"name": "embedserve-api-keys", "key": "api-keys"}
    assert refs["EMBEDSERVE_ADMIN_API_KEY"] == {"name": "embedserve-admin", "key": "admin-api-key"}
    # The Redis password is spliced into the URL by Kubernetes at start, never written into the chart's output.
    assert variables["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "embedserve-redis", "key": "password"}
    assert (
        variables["EMBEDSERVE_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis.data.svc.cluster.local:6379/0"
    )


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"api_keys": '["k1"]'}},
        {"config": {"admin_api_key": "hunter2"}},
        {"config": {"milvus_token": "root:Milvus"}},
        {"config": {"redis_url": "redis://:pw@redis:6379/0"}},
        {"replicas": 3},  # a typo of gateway.replicaCount
        {"triton": {"modelControlMode": "sometimes"}},
        {"modelRepository": {"source": "objectStore"}},  # without a URI
        {"config": {"triton_url": "triton:8001"}},  # set by triton.enabled or externalTriton.url
        {"triton": {"enabled": True}, "externalTriton": {"url": "triton.inference:8001"}},  # two Tritons
        {"externalTriton": {"url": "grpc://triton.inference:8001"}},  # host:port, no scheme
        {"externalTriton": {"url": "triton.inference"}},  # no port
        {"externalTriton": {"url": "triton.inference:8001", "tls": True}},  # tls is a section
    ],
)
def test_schema_refuses_secrets_in_plain_config_and_mistakes(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="values don't meet the specifications of the schema"):
        render(values)


def test_settings_become_embedserve_variables(rendered: dict[str, list[dict[str, Any]]]) -> None:
    data = settings(rendered["gpu-production"])
    assert data["EMBEDSERVE_TRITON_MAX_BATCH_TOKENS"] == "8192"  # batches to Triton (on GPUs) have their own budget
    assert data["EMBEDSERVE_TRITON_BATCHES_IN_FLIGHT"] == "4"
    assert data["EMBEDSERVE_CACHE_MEMORY_BYTES"] == "536870912"  # no float exponent
    assert json.loads(data["EMBEDSERVE_STABLE_VERSIONS"]) == {"minilm": 1}
    assert data["EMBEDSERVE_HOST"] == "0.0.0.0" and data["EMBEDSERVE_MODEL_REPOSITORY"] == "/models"
    external = settings(rendered["external-services"])
    assert json.loads(external["EMBEDSERVE_MODEL_ALIASES"]) == {"text-embedding-3-small": "minilm"}
    assert external["EMBEDSERVE_TRUNCATE"] == "true"


def test_triton_is_switched_by_triton_enabled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    laptop = rendered["laptop"]
    assert find(laptop, "Deployment", f"{RELEASE}-triton") == []
    assert settings(laptop)["EMBEDSERVE_BACKEND"] == "onnx"

    production = rendered["gpu-production"]
    (triton,) = find(production, "Deployment", f"{RELEASE}-triton")
    (container,) = triton["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--model-control-mode=none" in container["args"]
    # An object-store repository is read by Triton itself; the gateway pulls the same URI.
    assert "--model-repository=s3://ml-models/embedserve/model_repository" in container["args"]
    (service,) = find(production, "Service", f"{RELEASE}-triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == 8001
    assert settings(production)["EMBEDSERVE_BACKEND"] == "triton"
    assert settings(production)["EMBEDSERVE_TRITON_URL"] == f"{RELEASE}-triton:8001"


def test_external_triton_is_a_url(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = render({"externalTriton": {"url": "triton.inference.svc.cluster.local:8001", "timeoutSeconds": 2.5}})
    assert find(manifests, "Deployment", f"{RELEASE}-triton") == []
    assert find(manifests, "Service", f"{RELEASE}-triton") == []
    data = settings(manifests)
    assert data["EMBEDSERVE_BACKEND"] == "triton"
    assert data["EMBEDSERVE_TRITON_URL"] == "triton.inference.svc.cluster.local:8001"
    assert data["EMBEDSERVE_TRITON_TIMEOUT_S"] == "2.5"
    # ...and in its ci scenario, without the extraEnv workaround.
    external = rendered["external-services"]
    assert settings(external)["EMBEDSERVE_TRITON_URL"] == "triton.inference.svc.cluster.local:8001"
    assert settings(external)["EMBEDSERVE_TRITON_TIMEOUT_S"] == "5"
    assert not {"EMBEDSERVE_BACKEND", "EMBEDSERVE_TRITON_URL"} & set(env(external))
    # An IPv6 literal is a host too.
    ipv6 = render({"externalTriton": {"url": "[fd00::12]:8001"}})
    assert settings(ipv6)["EMBEDSERVE_TRITON_URL"] == "[fd00::12]:8001"


def test_external_triton_over_tls_mounts_its_secret_and_names_the_files() -> None:
    tls = {"enabled": True, "secretName": "triton-certs", "clientCertificate": True}
    manifests = render({"externalTriton": {"url": "triton.inference:8001", "tls": tls}})
    data = settings(manifests)
    assert data["EMBEDSERVE_TRITON_TLS"] == "true"
    assert data["EMBEDSERVE_TRITON_TLS_CA_FILE"] == "/etc/embedserve/triton-tls/ca.crt"
    assert data["EMBEDSERVE_TRITON_TLS_CERT_FILE"] == "/etc/embedserve/triton-tls/tls.crt"
    assert data["EMBEDSERVE_TRITON_TLS_KEY_FILE"] == "/etc/embedserve/triton-tls/tls.key"
    (deployment,) = find(manifests, "Deployment", RELEASE)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "triton-tls", "secret": {"secretName": "triton-certs", "defaultMode": 0o440}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "triton-tls", "mountPath": "/etc/embedserve/triton-tls", "readOnly": True} in mounts
    # Without a Secret: TLS with the system's roots, nothing mounted.
    plain = render({"externalTriton": {"url": "triton.inference:8001", "tls": {"enabled": True}}})
    assert settings(plain)["EMBEDSERVE_TRITON_TLS"] == "true" and "EMBEDSERVE_TRITON_TLS_CA_FILE" not in settings(plain)


def test_poll_mode_sets_the_poll_interval() -> None:
    manifests = render({**scenario_values("gpu-production"), "triton": {"enabled": True, "modelControlMode": "poll"}})
    (triton,) = find(manifests, "Deployment", f"{RELEASE}-triton")
    args = triton["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--model-control-mode=poll" in args and "--repository-poll-secs=30" in args


def test_model_repository_is_mounted_or_pulled_at_start(rendered: dict[str, list[dict[str, Any]]]) -> None:
    laptop = gateway(rendered["laptop"])["spec"]["template"]["spec"]
    (models,) = [v for v in laptop["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": "embedserve-models", "readOnly": True}
    assert "initContainers" not in laptop

    production = gateway(rendered["gpu-production"])["spec"]["template"]["spec"]
    (models,) = [v for v in production["volumes"] if v["name"] == "models"]
    assert "emptyDir" in models
    (pull,) = production["initContainers"]
    assert pull["command"][-2:] == ["s3://ml-models/embedserve/model_repository", "/models"]
    assert pull["envFrom"] == [{"secretRef": {"name": "embedserve-model-store"}}]


def test_redis_and_milvus_are_optional_dependencies_or_external() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    conditions = {d["name"]: d["condition"] for d in chart["dependencies"]}
    assert conditions == {"redis": "redis.enabled", "milvus": "milvus.enabled"}

    bundled = render({"redis": {"enabled": True}, "milvus": {"enabled": True}})
    variables = env(bundled)
    assert variables["EMBEDSERVE_REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{RELEASE}-redis-master:6379/0"
    assert variables["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-redis"
    assert settings(bundled)["EMBEDSERVE_MILVUS_URI"] == f"http://{RELEASE}-milvus:19530"


def test_external_services_and_laptop_addresses(rendered: dict[str, list[dict[str, Any]]]) -> None:
    external = rendered["external-services"]
    assert env(external)["EMBEDSERVE_REDIS_URL"]["value"] == "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2"
    assert settings(external)["EMBEDSERVE_MILVUS_URI"] == "https://milvus.example.internal:19530"
    laptop = rendered["laptop"]
    assert "EMBEDSERVE_REDIS_URL" not in env(laptop)
    assert settings(laptop)["EMBEDSERVE_MILVUS_URI"] == "/data/milvus.db"


def test_scaling_and_disruption(rendered: dict[str, list[dict[str, Any]]]) -> None:
    production = rendered["gpu-production"]
    (hpa,) = find(production, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert "replicas" not in gateway(production)["spec"]  # the HPA owns it
    (pdb,) = find(production, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway(production)["spec"]["selector"]["matchLabels"]
    laptop = rendered["laptop"]
    assert find(laptop, "HorizontalPodAutoscaler") == [] and find(laptop, "PodDisruptionBudget") == []
    assert gateway(laptop)["spec"]["replicas"] == 1
    (queue_hpa,) = find(rendered["external-services"], "HorizontalPodAutoscaler")
    assert {m["type"] for m in queue_hpa["spec"]["metrics"]} == {"Resource", "Pods"}


def test_pods_drain_before_they_stop(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario, manifests in rendered.items():
        drain_s = float(settings(manifests)["EMBEDSERVE_SHUTDOWN_DRAIN_S"])
        timeout_s = float(settings(manifests)["EMBEDSERVE_REQUEST_TIMEOUT_S"])
        grace_s = gateway(manifests)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert drain_s > 0 and grace_s > drain_s + timeout_s, scenario  # drained, then in-flight work finishes


def test_ingress_and_network_policy_are_optional(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert find(rendered["laptop"], "Ingress") == [] and find(rendered["laptop"], "NetworkPolicy") == []
    production = rendered["gpu-production"]
    (ingress,) = find(production, "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == RELEASE
    policies = {p["metadata"]["name"]: p for p in find(production, "NetworkPolicy")}
    assert set(policies) == {RELEASE, f"{RELEASE}-triton"}
    # Only this release's gateways may call Triton's gRPC port.
    grpc_rule = policies[f"{RELEASE}-triton"]["spec"]["ingress"][0]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def test_schema_knows_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    assert schema["additionalProperties"] is False
