"""Trainer fixtures: a real-text corpus (with a little PII) and the configuration of a tiny encoder run."""

from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.data.sample_text import paragraphs, sentences

PII_LINES = 8  # each with one email and one IPv4 address


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    tickets = [
        f"Ticket {i}: ops{i}@example.com reported from 10.0.{i}.7 that the nightly build fails."
        for i in range(PII_LINES)
    ]
    path.write_text("\n".join([*paragraphs(), *tickets, *sentences()]))
    return path


def tiny_config(corpus_file: Path, output_dir: Path, **overrides: object) -> TrainConfig:
    """A 20-step run of a 2-layer, 32-wide encoder trained from scratch; ``section__key=value`` overrides."""
    raw: dict = {
        "run_name": "tiny",
        "output_dir": str(output_dir),
        "corpus": {"path": str(corpus_file)},
        "encoder": {
            "base_model": None,
            "scratch": {"vocab_size": 1500, "hidden_size": 32, "layers": 2, "heads": 2, "max_seq_length": 48},
        },
        "objective": {
            "contrastive_weight": 1.0,
            "mlm_weight": 0.5,
            "temperature": 0.1,
            "views": {"token_deletion": 0.1, "span_crop": [0.6, 1.0]},
        },
        "optim": {"max_steps": 20, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 3, "seed": 3},
        "checkpoint": {"every_steps": 10, "keep": 3},
        "monitor": {"eval_every_steps": 10, "validation_sample": 64},
        "export": {"model": "trained", "repository": str(output_dir / "repository"), "gate_threshold": 0.5},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return TrainConfig.model_validate(raw)
