"""The chart's README: its parameter tables are generated from values.yaml's `## @param` comments
(scripts/chart_readme.py) and match them; every value is documented where it is defined."""

import importlib.util
import subprocess
import sys
from types import ModuleType

import yaml

from tests.ship.conftest import CHART, ROOT

SCRIPT = ROOT / "scripts" / "chart_readme.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_readme", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chart_readme = load_script()


def test_readme_tables_match_values_yaml() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_every_value_is_documented_where_it_is_defined() -> None:
    text = (CHART / "values.yaml").read_text()
    sections, problems = chart_readme.parse(text)
    assert problems == []
    assert chart_readme.check_coverage(sections, yaml.safe_load(text)) == []
    assert len(sections) >= 15 and all(section.params for section in sections)


def test_the_readme_lists_each_value_with_its_default() -> None:
    readme = (CHART / "README.md").read_text()
    assert "| `externalTriton.url` | host:port of the gRPC endpoint of a Triton run elsewhere" in readme
    assert "| `release.schedule` | Cron schedule of the release" in readme and '| `"0 3 * * 0"` |' in readme
    assert "| `autoscaling.maxReplicas` | Most replicas. | `10` |" in readme
    assert '| `grafana.dashboards.labelValue` | Value of that label. | `"1"` |' in readme  # a string, not 1
    # Placeholders stay visible in Markdown.
    assert '"&lt;release&gt;-&lt;chart&gt;"' in readme


def test_check_fails_on_an_undocumented_value_a_stale_param_and_a_stale_readme() -> None:
    values = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    undocumented = values + "\nrelease2:\n  ## @param release2.gone Not a value any more.\n  enabled: false\n"
    _, problems = chart_readme.render(readme, undocumented)
    assert "release2.enabled has no ## @param (on itself or a map above it)" in problems
    assert "@param release2.gone names no value in values.yaml" in problems
    edited = values.replace("autoscaling.maxReplicas Most replicas.", "autoscaling.maxReplicas Most.")
    generated, problems = chart_readme.render(readme, edited)
    assert problems == [] and generated != readme and "| `autoscaling.maxReplicas` | Most. | `10` |" in generated


def test_multi_line_descriptions_are_joined() -> None:
    sections, _ = chart_readme.parse(
        "## @section S\nx:\n  ## @param x.a First line\n  ## and the second.\n  a: 1\n  ## plain comment\n  b: 2\n"
    )
    assert [(p.key, p.description) for p in sections[0].params] == [("x.a", "First line and the second.")]
