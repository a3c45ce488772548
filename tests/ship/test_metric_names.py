"""Every metric a dashboard panel or an alert queries is one a real gateway exports on /metrics."""

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.ship.conftest import CHART, find, render, scenario_values

METRIC = re.compile(r"\b(embedserve_[a-z0-9_]+)")
# Grafana's own variables, as Prometheus receives them: ranges ($__rate_interval) and numbers.
GRAFANA_RANGE = re.compile(r"\$\{?__[a-z_]+\}?")
GRAFANA_NUMBERS = {"$slo_availability": "0.999"}
# A template variable's query: Grafana's label_values(<selector>, <label>).
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.*),\s*(?P<label>[a-zA-Z_]\w*)\)")
# Labels Prometheus adds to every scraped series (Prometheus Operator's ServiceMonitor targets).
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container", "endpoint"}
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported(client: TestClient) -> dict[str, set[str]]:
    """Series name -> label names, for every family on /metrics; a family with no samples yet
    still declares itself in HELP/TYPE lines, so it counts. Labels come from the app's registry."""
    text = client.get("/metrics").text
    labels = _registry_labels(client)
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SERIES_SUFFIXES.get(family.type, ("",)):
            names = set(labels.get(family.name, set()))
            if suffix == "_bucket":
                names.add("le")
            series[family.name + suffix] = names
    return series


def _registry_labels(client: TestClient) -> dict[str, set[str]]:
    # prometheus_client exposes label names only on the collectors themselves.
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    labels: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):
        for family in collector.describe():
            labels[family.name] = set(getattr(collector, "_labelnames", ()))
    return labels


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable of every dashboard."""
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']}", target["expr"]
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                yield f"{path.name}: ${variable['name']}", variable["query"]["query"]


def alert_queries() -> Iterator[tuple[str, str]]:
    values: dict[str, Any] = {**scenario_values("gpu-production")}
    values["metrics"] = {"prometheusRule": {"enabled": True}}
    (rule,) = find(render(values), "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            yield f"alert {alert['alert']}", alert["expr"]


QUERIES = [*dashboard_queries(), *alert_queries()]


@pytest.fixture(scope="module")
def series(client: TestClient) -> dict[str, set[str]]:
    return exported(client)


def test_the_real_gateway_exports_its_families(series: dict[str, set[str]]) -> None:
    # The parser and the suffix rules at work on the gateway's own metrics.
    assert {"embedserve_requests_total", "embedserve_request_duration_seconds_bucket", "embedserve_queue_depth"} <= set(
        series
    )
    assert series["embedserve_requests_total"] == {"route", "model", "version", "status"}


def test_every_panel_queries_a_metric() -> None:
    for path in sorted((CHART / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["targets"] and all(METRIC.search(t["expr"]) for t in panel["targets"]), panel["title"]


def parse(query: str) -> tuple[promql_parser.Expr, set[str]]:
    """The query as Prometheus receives it once Grafana has substituted its variables (parsed by a real
    PromQL parser, so a syntax error fails), and the labels it asks for besides its selectors' matchers
    (label_values' label)."""
    asked: set[str] = set()
    label_values = LABEL_VALUES.fullmatch(query.strip())
    if label_values:
        query = label_values["selector"]
        asked.add(label_values["label"])
    query = GRAFANA_RANGE.sub("5m", query)
    for variable, number in GRAFANA_NUMBERS.items():
        query = query.replace(variable, number)
    return promql_parser.parse(query), asked


def selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def groupings(expr: promql_parser.Expr) -> list[tuple[set[str], list[promql_parser.VectorSelector]]]:
    """Every ``by (...)`` and ``on (...)``/``group_left (...)`` label list, with the selectors it groups."""
    found: list[tuple[set[str], list[promql_parser.VectorSelector]]] = []

    def visit(node: object) -> None:
        by = promql_parser.AggModifierType.By
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None and node.modifier.type == by:
            found.append((set(node.modifier.labels), selectors(node.expr)))
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            grouped = selectors(node.lhs) + selectors(node.rhs)
            matching = node.modifier.matching
            if matching is not None and matching.type == promql_parser.LabelModifierType.Include:
                found.append((set(matching.labels), grouped))
            found.append((set(node.modifier.group_labels or []), grouped))

    promql_parser.walk(expr, visit)
    return found


@pytest.mark.parametrize(("where", "query"), QUERIES, ids=[where for where, _ in QUERIES])
def test_queries_parse_and_use_only_exported_metrics_and_labels(
    where: str, query: str, series: dict[str, set[str]]
) -> None:
    expr, asked = parse(query)
    used = {selector.name for selector in selectors(expr)}
    assert any(name.startswith("embedserve_") for name in used), f"{where} queries no embedserve metric"
    assert used <= set(series), f"{where} uses metrics the gateway does not export: {sorted(used - set(series))}"
    for selector in selectors(expr):
        matched = {matcher.name for matcher in selector.matchers.matchers}
        unknown = (matched | asked) - series[selector.name] - TARGET_LABELS
        assert not unknown, f"{where}: {selector.name} has no label {sorted(unknown)}"
    for labels, grouped in groupings(expr):
        available = set().union(*(series[selector.name] for selector in grouped)) | TARGET_LABELS
        assert labels <= available, f"{where}: grouping by {sorted(labels - available)}, which no series it groups has"
