"""Monitoring in the chart: ServiceMonitors, the SLO alerts and the Grafana dashboards, switched by values."""

import json
from typing import Any

from tests.ship.conftest import CHART, RELEASE, find

REQUIRED_ALERTS = {
    "EmbedserveEmbeddingLatencyP95High",
    "EmbedserveServerErrors",
    "EmbedserveThrottling",
    "EmbedserveDriftMmdHigh",
    "EmbedserveRolloutFailed",
    "EmbedserveRedisCircuitOpen",
}


def test_monitoring_is_switched_by_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    laptop = rendered["laptop"]
    assert find(laptop, "ServiceMonitor") == [] and find(laptop, "PrometheusRule") == []
    production = rendered["gpu-production"]
    monitors = {m["metadata"]["name"]: m["spec"]["endpoints"][0]["port"] for m in find(production, "ServiceMonitor")}
    assert monitors == {RELEASE: "http", f"{RELEASE}-triton": "metrics"}
    (rule,) = find(production, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) >= REQUIRED_ALERTS
    assert alerts["EmbedserveEmbeddingLatencyP95High"]["expr"].rstrip().endswith("> 0.1")
    assert alerts["EmbedserveEmbeddingLatencyP95High"]["annotations"]["runbook_url"].startswith("https://")
    # Prometheus templates survive Helm's templating.
    assert "{{ $labels.model }}" in alerts["EmbedserveEmbeddingLatencyP95High"]["annotations"]["summary"]
    for alert in alerts.values():
        expr = alert["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), alert["alert"]


def test_dashboards_are_provisioned_when_enabled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert find(rendered["laptop"], "ConfigMap", f"{RELEASE}-dashboards") == []
    (config_map,) = find(rendered["gpu-production"], "ConfigMap", f"{RELEASE}-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboards = {name: json.loads(text) for name, text in config_map["data"].items()}
    assert set(dashboards) == {"embedserve-executive.json", "embedserve-oncall.json", "embedserve-debug.json"}
    assert all(board["uid"] == name.removesuffix(".json") for name, board in dashboards.items())


# The views SREs asked for, by panel (or row) title.
DASHBOARD_VIEWS = {
    "embedserve-executive": ["Traffic by route", "Embedding P95 vs SLO", "Error budget left (30d)", "Versions served"],
    "embedserve-oncall": [
        "Embedding P95 by version",
        "5xx share by version",
        "429 responses",
        "Queue depth",
        "Cache hit rate by layer",
        "Dependency health",
        "Rollout phase",
        "Rollout weight",
        "Release outcomes (7d)",
        "Stable version age",
        "Model load seconds",
        "Drift alerts per day / release triggers",
    ],
    "embedserve-debug": [
        "Batch size",
        "Padding",
        "Stages of an embedding request (mean)",
        "Drift: MMD",
        "Neighbourhood agreement",
    ],
}


def test_dashboards_show_each_view_without_overlapping_panels() -> None:
    for uid, titles in DASHBOARD_VIEWS.items():
        board = json.loads((CHART / "dashboards" / f"{uid}.json").read_text())
        assert board["uid"] == uid
        assert set(titles) <= {panel["title"] for panel in board["panels"]}, uid
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            box = panel["gridPos"]
            assert box["x"] + box["w"] <= 24, panel["title"]
            area = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
            assert not area & cells, f"{uid}: {panel['title']} overlaps another panel"
            cells |= area
        assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "namespace", "model"}
