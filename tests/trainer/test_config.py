"""The run configuration: documented everywhere from one source, and refused with a fix when wrong."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.config import ConfigError, TrainConfig, load_config, reference_rows, reference_table

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "run.yaml"
# "  # key: value" is an optional field written out but commented; prose comments never start "word:".
_COMMENTED_FIELD = re.compile(r"^(\s*)# (\s*[a-z_]+:.*)$", re.MULTILINE)


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


def test_the_readme_reference_is_the_table_generated_from_the_models() -> None:
    readme = (ROOT / "README.md").read_text()
    assert reference_table() in readme, "README is stale: paste the output of `python -m trainer.config`"


def test_every_field_has_a_description() -> None:
    assert all(meaning for _, _, _, meaning in reference_rows())


def test_the_example_is_valid_and_lists_every_field() -> None:
    load_config(EXAMPLE)
    text = EXAMPLE.read_text()
    everything = yaml.safe_load(_COMMENTED_FIELD.sub(r"\1\2", text))
    assert dotted_keys(everything) == {name for name, *_ in reference_rows()}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "run_name: r\ncorpus: {path: c.txt}\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("learning_rate: 0.1\n", r"learning_rate: unknown key 'learning_rate' in the top level .*run_name, output_dir"),
        (
            "optim: {max_step: 10}\n",
            r"optim\.max_step: unknown key 'max_step' in optim \(a misspelling\?\); its keys are: max_steps, ",
        ),
        (
            "encoder: {base_model: null, scratch: {layer: 2}}\n",
            r"encoder\.scratch\.layer: unknown key .* its keys are: vocab_size, hidden_size, layers",
        ),
    ],
)
def test_unknown_keys_are_refused_with_the_known_ones(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(write(tmp_path, MINIMAL + extra))
    assert "Training configuration reference" in str(refused.value)


def test_heads_that_do_not_divide_the_width_are_refused_with_the_choices(tmp_path: Path) -> None:
    config = MINIMAL + "encoder: {base_model: null, scratch: {hidden_size: 48, heads: 5}}\n"
    with pytest.raises(
        ConfigError,
        match=r"heads \(5\) must divide hidden_size \(48\): set heads to one of "
        r"1, 2, 3, 4, 6, 8, 12, 16, 24, 48, or hidden_size to a multiple of 5",
    ):
        load_config(write(tmp_path, config))


@pytest.mark.parametrize(
    ("encoder", "fix"),
    [
        ("encoder: {scratch: {hidden_size: 32, heads: 2}}\n", "write 'base_model: null' beside scratch"),
        ("encoder: {base_model: null}\n", "give base_model .* or scratch: "),
    ],
)
def test_exactly_one_encoder_source_is_required(tmp_path: Path, encoder: str, fix: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"encoder: set exactly one of encoder\.base_model and encoder\.scratch: .*{fix}"
    ):
        load_config(write(tmp_path, MINIMAL + encoder))


def test_every_problem_is_listed_and_broken_yaml_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"2 problem\(s\):\n  corpus: Field required\n  optim\.batch_size: "):
        load_config(write(tmp_path, "run_name: r\noptim: {batch_size: 1}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run_name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a list\n"))


def test_a_scratch_config_validates() -> None:
    config = TrainConfig.model_validate(
        {"run_name": "r", "corpus": {"path": "c.txt"}, "encoder": {"base_model": None, "scratch": {"hidden_size": 48}}}
    )
    assert config.encoder.scratch is not None and config.encoder.scratch.heads == 4


def test_the_removed_absolute_gate_threshold_is_refused_with_what_replaced_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"export: export\.gate_threshold was removed: .* its parent version"):
        load_config(write(tmp_path, MINIMAL + "export: {gate_threshold: 0.3}\n"))
    assert load_config(write(tmp_path, MINIMAL)).export.gate.enabled  # the gate is on by default
