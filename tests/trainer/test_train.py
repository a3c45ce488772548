"""Training on real text with tiny encoders: learning, exact resume, guards, gated export, serving."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.models.manifest import verify_version
from tests.helpers import private_settings
from tests.trainer.conftest import PII_LINES, poison_loss_from_step, tiny_config
from trainer.checkpoint import CorruptCheckpoint, list_checkpoints, load_checkpoint
from trainer.config import TrainConfig
from trainer.data.sample_text import paragraphs, sentences
from trainer.monitor import CollapseDetected
from trainer.release.export import ExportRefused
from trainer.release.publish import publish
from trainer.train import NonFiniteLoss, read_metrics, train


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def finished_run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """A 20-step run with checkpoints at steps 10 and 20."""
    config = tiny_config(corpus_file, tmp_path_factory.mktemp("run"))
    train(config)
    return config


def test_loss_falls_on_real_text(corpus_file: Path, tmp_path: Path) -> None:
    config = tiny_config(corpus_file, tmp_path, optim__max_steps=60, monitor__eval_every_steps=30)
    result = train(config)
    history = losses(result.run_dir)
    assert len(history) == 60
    assert sum(history[-10:]) / 10 < 0.8 * sum(history[:10]) / 10
    assert (result.run_dir / "curves.png").stat().st_size > 1000


def test_resuming_from_step_n_gives_the_weights_of_an_uninterrupted_run(
    finished_run: TrainConfig, tmp_path: Path
) -> None:
    checkpoints = list_checkpoints(finished_run.run_dir / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000010.pt", "step-00000020.pt"]
    # The run folder as an interrupted run leaves it: metrics already past the checkpoint resumed from.
    resumed = finished_run.model_copy(update={"output_dir": tmp_path})
    shutil.copytree(finished_run.run_dir, resumed.run_dir)
    with (resumed.run_dir / "metrics.jsonl").open("a") as torn:
        torn.write('{"step": 21, "lo')  # killed mid-write
    torch.manual_seed(12345)  # whatever state this process is in, resume restores the run's
    train(resumed, resume=resumed.run_dir / "checkpoints" / checkpoints[0].name)
    uninterrupted = load_checkpoint(checkpoints[1])["encoder"]
    after_resume = load_checkpoint(resumed.run_dir / "checkpoints" / "step-00000020.pt")["encoder"]
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(after_resume[name], tensor, atol=1e-6, rtol=0, msg=name)
    # Steps 11-20 are written again, once: no step repeats in metrics.jsonl.
    assert [record["step"] for record in read_metrics(resumed.run_dir)] == list(range(1, 21))
    assert losses(resumed.run_dir) == pytest.approx(losses(finished_run.run_dir), abs=1e-5)


def test_a_flipped_byte_in_a_checkpoint_is_refused_and_the_previous_good_one_offered(
    finished_run: TrainConfig, tmp_path: Path
) -> None:
    copy = tmp_path / "checkpoints"
    shutil.copytree(finished_run.run_dir / "checkpoints", copy)
    newest = copy / "step-00000020.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"step-00000010\.pt") as refused:
        load_checkpoint(newest)
    assert refused.value.previous_good == copy / "step-00000010.pt"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_loss_from_step(monkeypatch, 13)
    config = tiny_config(corpus_file, tmp_path)
    with pytest.raises(NonFiniteLoss, match="step 13"):
        train(config)
    kept = list_checkpoints(config.run_dir / "checkpoints")
    assert [p.name for p in kept] == ["step-00000010.pt"]
    load_checkpoint(kept[0])


def test_a_non_finite_loss_between_metrics_rows_is_caught_before_the_next_checkpoint(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows every 8 steps and at checkpoints (every 5): the loss turns NaN at step 13, no row comes before the
    # checkpoint of step 15, which must not be written.
    poison_loss_from_step(monkeypatch, 13)
    config = tiny_config(corpus_file, tmp_path, monitor__log_every_steps=8, checkpoint__every_steps=5)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 13"):
        train(config)
    assert [p.name for p in list_checkpoints(config.run_dir / "checkpoints")] == [
        "step-00000005.pt",
        "step-00000010.pt",
    ]
    assert [row["step"] for row in read_metrics(config.run_dir)] == [5, 8, 10]


def test_a_collapsing_run_stops_with_an_explanation(corpus_file: Path, tmp_path: Path) -> None:
    # MLM alone with a huge learning rate drives every text to one vector.
    config = tiny_config(
        corpus_file,
        tmp_path,
        objective__contrastive_weight=0.0,
        optim__learning_rate=0.5,
        optim__max_steps=40,
        monitor__min_effective_rank=3.0,
    )
    with pytest.raises(CollapseDetected, match="collapsed"):
        train(config)


def test_the_run_reports_its_pii_replacements_in_counts_only(finished_run: TrainConfig) -> None:
    summary = json.loads((finished_run.run_dir / "summary.json").read_text())
    dataset = summary["dataset"]
    assert dataset["pii_replaced"] == {"email": PII_LINES, "ip": PII_LINES, "phone": 0, "card": 0}
    assert dataset["kept"] == dataset["train"] + dataset["validation"] == dataset["documents_read"]
    assert summary["result"]["steps"] == 20
    state = load_checkpoint(finished_run.run_dir / "checkpoints" / "step-00000020.pt")
    assert state["dataset"] == dataset and "example.com" not in json.dumps(summary)


def test_export_holds_parity_records_provenance_and_is_served(finished_run: TrainConfig) -> None:
    checkpoint = finished_run.run_dir / "checkpoints" / "step-00000020.pt"
    version_dir = publish(checkpoint)
    manifest = verify_version(version_dir)
    assert (manifest.model, manifest.version, manifest.parent_version) == ("trained", 1, None)
    assert manifest.dataset_fingerprint == load_checkpoint(checkpoint)["dataset_fingerprint"]
    assert manifest.notes["dataset"]["pii_replaced"] == {"email": PII_LINES, "ip": PII_LINES, "phone": 0, "card": 0}
    assert manifest.training_config is not None and manifest.training_config["run_name"] == "tiny"
    assert manifest.evaluation is not None and manifest.evaluation.primary_metric == "neg_uniformity"
    assert 0 < manifest.evaluation.metrics["alignment"] < 4  # over two views of each validation text
    assert manifest.evaluation.gate is not None and manifest.evaluation.gate.decision == "off"  # tiny_config
    assert manifest.evaluation.passed_gate is None and manifest.forced is False
    assert manifest.reference_stats is not None and len(manifest.reference_stats.mean) == 32

    second = publish(checkpoint)
    assert verify_version(second).parent_version == 1
    # An INT8 twin is never a parent: the next export descends from the newest fp32 version.
    from trainer.release.quantize import quantize_version

    int8 = quantize_version(second, list(sentences()[:16]))
    assert (int8.name, verify_version(int8).precision) == ("3", "int8")
    assert verify_version(publish(checkpoint)).parent_version == 2
    with TestClient(create_app(private_settings(finished_run.export.repository))) as client:
        response = client.post(
            "/v1/embeddings", json={"input": "served from a trained checkpoint", "model": "trained@2"}
        )
        assert response.status_code == 200 and response.headers["x-model-version"] == "2"
        assert len(response.json()["data"][0]["embedding"]) == 32


def checkpoint_with_export(finished_run: TrainConfig, directory: Path, **export: object) -> Path:
    """The run's last checkpoint again, with other export settings in its configuration."""
    from trainer.checkpoint import save_checkpoint

    changed = finished_run.model_copy(update={"export": finished_run.export.model_copy(update=export)})
    state = load_checkpoint(finished_run.run_dir / "checkpoints" / "step-00000020.pt")
    state["config"] = changed.model_dump(mode="json")
    return save_checkpoint(directory / "checkpoints", 20, state, keep=1)


def test_with_labeled_pairs_the_gate_compares_with_the_parent_on_them_and_force_is_recorded(
    finished_run: TrainConfig, tmp_path: Path
) -> None:
    from trainer.__main__ import evaluate_command
    from trainer.config import ExportGateConfig

    documents = list(paragraphs()[:40])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": d.split(".")[0], "document": d}) + "\n" for d in documents))
    gated = checkpoint_with_export(
        finished_run, tmp_path, eval_file=pairs, gate=ExportGateConfig(resamples=500), repository=tmp_path
    )
    # A scratch model's first version has no parent: exported, recorded as not gated.
    first = verify_version(publish(gated)).evaluation
    assert first is not None and first.gate is not None and first.gate.decision == "not_gated"
    assert first.passed_gate is None and first.primary_metric == "neg_uniformity"

    # The same weights again: identical to their parent, so not better than it — refused, nothing written.
    with pytest.raises(
        ExportRefused,
        match=r"does not beat trained@1 on the eval_file dev set \(40 queries\).*"
        r"interval \[\+0\.0000, \+0\.0000\].*--force",
    ):
        publish(gated)
    assert sorted(p.name for p in (tmp_path / "trained").iterdir() if p.is_dir()) == ["1"]

    forced = verify_version(publish(gated, force=True))
    evaluation = forced.evaluation
    assert forced.forced is True and forced.parent_version == 1
    assert evaluation is not None and evaluation.passed_gate is False and evaluation.primary_metric == "mrr@10"
    gate = evaluation.gate
    assert gate is not None and gate.decision == "refused" and gate.parent == "trained@1"
    assert gate.dev_set is not None and (gate.dev_set.source, gate.dev_set.queries) == ("eval_file", 40)
    assert gate.interval == (0.0, 0.0) and gate.difference == 0.0 and gate.resamples == 500
    assert gate.parent_scores == gate.candidate and 0 < gate.candidate["mrr@10"] <= gate.candidate["recall@10"] <= 1
    assert evaluation.metrics["mrr@10"] == gate.candidate["mrr@10"] and "alignment" in evaluation.metrics

    # python -m trainer evaluate --checkpoint ... --pairs ... ranks the same pairs (in torch: to parity).
    from argparse import Namespace

    report = evaluate_command(Namespace(checkpoint=gated, version_dir=None, pairs=pairs, texts=None))
    assert report["primary_metric"] == "mrr@10"
    assert report["primary"] == pytest.approx(gate.candidate["mrr@10"], abs=0.01)


def test_a_checkpoint_written_with_the_removed_absolute_threshold_still_exports(
    finished_run: TrainConfig, tmp_path: Path
) -> None:
    from trainer.checkpoint import save_checkpoint

    state = load_checkpoint(finished_run.run_dir / "checkpoints" / "step-00000020.pt")
    state["config"]["export"] = {**state["config"]["export"], "gate_threshold": 0.5, "repository": str(tmp_path)}
    state["config"]["export"].pop("gate")  # as written before the gate section existed
    version = verify_version(publish(save_checkpoint(tmp_path / "checkpoints", 20, state, keep=1)))
    # No parent (a scratch model's first version): not gated; the old threshold means nothing any more.
    assert version.evaluation is not None and version.evaluation.gate is not None
    assert version.evaluation.gate.decision == "not_gated" and version.forced is False


def test_a_corpus_too_small_to_split_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from trainer.run_inputs import load_corpus

    (tmp_path / "c.txt").write_text("only one document here\n")
    config = tiny_config(tmp_path / "c.txt", tmp_path, corpus__min_chars=5)
    with pytest.raises(ValueError, match=r"add text or change corpus\.validation_fraction"):
        load_corpus(config)


def test_torchrun_runs_the_loop_as_one_gloo_process(corpus_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    config = tiny_config(corpus_file, tmp_path, optim__max_steps=4, checkpoint__every_steps=4)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=1", "-m", "trainer", "train", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(config.run_dir / "checkpoints" / "step-00000004.pt")
    assert state["step"] == 4
    # The corpus report is logged as one structured line, counts only.
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    prepared = next(entry for entry in logged if entry["msg"] == "corpus prepared")
    assert prepared["pii_replaced"] == {"email": PII_LINES, "ip": PII_LINES, "phone": 0, "card": 0}
    assert "example.com" not in result.stderr
