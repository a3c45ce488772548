"""The chart rendered offline (Helm v4 in-process, through helm-python-sdk) for every ci/*-values.yaml."""

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "embedserve"
SCENARIOS = sorted(path.stem.removesuffix("-values") for path in (CHART / "ci").glob("*-values.yaml"))
RELEASE = "embedserve"
NAMESPACE = "ml"


def scenario_values(scenario: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
    return values


def render(values: dict[str, Any], subcharts: bool = False) -> list[dict[str, Any]]:
    """Every manifest the chart's own templates render with ``values`` (NOTES.txt left out); with
    ``subcharts``, also those of the dependencies present in charts/ (`helm dependency build`)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        document
        for name, text in sorted(files.items())
        if name.endswith(".yaml") and (subcharts or name.startswith(f"{CHART.name}/templates/"))
        for document in yaml.safe_load_all(text)
        if document
    ]


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """scenario -> its rendered manifests; "default" is values.yaml alone."""
    return {"default": render({}), **{scenario: render(scenario_values(scenario)) for scenario in SCENARIOS}}
