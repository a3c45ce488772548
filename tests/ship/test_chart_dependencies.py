"""The chart's dependencies: Chart.lock pins them in step with Chart.yaml, `helm lint --strict` is clean, and the
bundled-Redis scenario pulls images that exist (the Bitnami images moved to docker.io/bitnamilegacy)."""

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.ship.conftest import CHART, NAMESPACE, RELEASE, SCENARIOS, find, render, scenario_values

CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
LOCK = yaml.safe_load((CHART / "Chart.lock").read_text())
ARCHIVES = {d["name"]: CHART / "charts" / f"{d['name']}-{d['version']}.tgz" for d in LOCK["dependencies"]}
MISSING = [path.name for path in ARCHIVES.values() if not path.exists()]
FETCH = "`helm dependency build helm/embedserve` fetches them (it needs the network)"
MISSING_DEPENDENCIES = "chart directory is missing these dependencies: redis,milvus"
# The images of the Bitnami redis chart, by their place in its values.
REDIS_IMAGES = ("image", "sentinel.image", "metrics.image", "volumePermissions.image", "kubectl.image", "sysctl.image")


def helm_lock_digest(requirements: list[dict[str, Any]], locked: list[dict[str, Any]]) -> str:
    """Helm's Chart.lock digest (internal/resolver.HashReq): sha256 of Go's JSON of [Chart.yaml's dependencies,
    the lock's], fields in the order of Helm's Dependency struct, empty ones left out."""
    fields = ("name", "version", "repository", "condition", "tags", "enabled", "import-values", "alias")

    def go_json(dependency: dict[str, Any]) -> dict[str, Any]:
        return {k: dependency[k] for k in fields if dependency.get(k) or k in ("name", "repository")}

    data = json.dumps([[go_json(d) for d in requirements], [go_json(d) for d in locked]], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def test_chart_lock_pins_every_dependency_in_step_with_chart_yaml(tmp_path: Path) -> None:
    declared = {d["name"]: d for d in CHART_YAML["dependencies"]}
    locked = {d["name"]: d for d in LOCK["dependencies"]}
    assert set(declared) == set(locked) == {"redis", "milvus"}
    for name, lock in locked.items():
        assert lock["repository"] == declared[name]["repository"]
        # A tilde range (~20.6) allows patch releases of that minor version only.
        assert declared[name]["version"].startswith("~")
        assert lock["version"].startswith(declared[name]["version"][1:] + "."), (name, lock["version"])
    assert LOCK["digest"] == helm_lock_digest(CHART_YAML["dependencies"], LOCK["dependencies"])
    # Helm checks that digest before it downloads anything: a range changed without the lock is refused.
    copy = tmp_path / CHART.name
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("charts"))
    chart_yaml = (copy / "Chart.yaml").read_text()
    (copy / "Chart.yaml").write_text(chart_yaml.replace('version: "~20.6"', 'version: "~20.7"'))
    with pytest.raises(helm.HelmError, match="out of sync"):
        helm.dependency_build(copy, skip_refresh=True)


def test_chart_has_an_icon() -> None:
    # The icon URL points at this file in the repository.
    assert CHART_YAML["icon"].startswith("https://") and CHART_YAML["icon"].endswith("/helm/embedserve/icon.svg")
    assert (CHART / "icon.svg").read_text().lstrip().startswith("<svg")


@pytest.mark.parametrize("scenario", ["default", *SCENARIOS])
def test_chart_lints_clean_with_strict(scenario: str) -> None:
    values = {} if scenario == "default" else scenario_values(scenario)
    report = helm.lint(CHART, values, namespace=NAMESPACE, strict=True)
    findings = [message["error"] for message in report["messages"]]
    if MISSING:
        # Nothing else is found; the missing archives are all that stands between this and a clean lint.
        assert findings == [MISSING_DEPENDENCIES], findings
        pytest.skip(f"helm lint --strict reports the dependencies missing: charts/ lacks {', '.join(MISSING)}; {FETCH}")
    assert findings == []
    assert report["errors"] == []


def _at(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def test_bundled_redis_pulls_pinned_bitnamilegacy_images() -> None:
    values = scenario_values("bundled-redis")
    assert values["redis"]["enabled"] is True
    for place in REDIS_IMAGES:
        image = _at(values["redis"], place)
        assert image["registry"] == "docker.io" and image["repository"].startswith("bitnamilegacy/"), place
        assert re.fullmatch(r"[0-9.]+-debian-12-r[0-9]+", image["tag"]), (place, image["tag"])  # a fixed build
    # Bitnami's charts refuse images they do not recognise unless this is set.
    assert values["global"]["security"]["allowInsecureImages"] is True
    if not ARCHIVES["redis"].exists():
        pytest.skip(f"rendering the bundled Redis needs charts/{ARCHIVES['redis'].name}; {FETCH}")

    # The pins are that chart version's own images, moved: same names, same tags.
    with helm.Chart.load(ARCHIVES["redis"]) as redis_chart:
        defaults = redis_chart.values
    for place in REDIS_IMAGES:
        ours, theirs = _at(values["redis"], place), _at(defaults, place)
        assert ours["repository"] == theirs["repository"].replace("bitnami/", "bitnamilegacy/", 1), place
        assert ours["tag"] == theirs["tag"], place

    manifests = render(values, subcharts=True)
    (master,) = find(manifests, "StatefulSet", f"{RELEASE}-redis-master")
    images = [c["image"] for c in master["spec"]["template"]["spec"]["containers"]]
    assert images == [f"docker.io/bitnamilegacy/redis:{values['redis']['image']['tag']}"]
    # The gateway finds the subchart's Service and password Secret under the names it expects.
    assert find(manifests, "Service", f"{RELEASE}-redis-master")
    (secret,) = find(manifests, "Secret", f"{RELEASE}-redis")
    assert values["redis"]["auth"].get("existingSecretPasswordKey", "redis-password") in secret["data"]
    without_override = {key: value for key, value in values.items() if key != "global"}
    with pytest.raises(helm.HelmError, match="Original containers have been substituted"):
        render(without_override, subcharts=True)
