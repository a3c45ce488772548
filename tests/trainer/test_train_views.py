"""Training with views over whole documents (independent crops and inverse cloze): it learns, and a
resumed run draws the same views as an uninterrupted one."""

import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import tiny_config
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.config import TrainConfig
from trainer.train import read_metrics, train

WHOLE_DOCUMENT_VIEWS = {
    "mix": {"crop": 0.5, "inverse_cloze": 0.5},
    "crop_length": [0.2, 0.6],
    "inverse_cloze_keep": 0.1,
    "token_deletion": 0.1,
}


def whole_document_config(corpus_file: Path, output_dir: Path, **overrides: object) -> TrainConfig:
    return tiny_config(corpus_file, output_dir, objective__views=WHOLE_DOCUMENT_VIEWS, **overrides)


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir)]


def test_the_loss_falls_with_whole_document_views(corpus_file: Path, tmp_path: Path) -> None:
    config = whole_document_config(
        corpus_file, tmp_path, objective__mlm_weight=0.0, optim__max_steps=60, monitor__eval_every_steps=30
    )
    history = losses(train(config).run_dir)
    assert len(history) == 60
    assert sum(history[-10:]) / 10 < 0.85 * sum(history[:10]) / 10


def test_a_resumed_run_draws_the_views_of_an_uninterrupted_one(corpus_file: Path, tmp_path: Path) -> None:
    finished = whole_document_config(corpus_file, tmp_path / "finished")
    train(finished)
    checkpoints = list_checkpoints(finished.run_dir / "checkpoints")
    resumed = finished.model_copy(update={"output_dir": tmp_path / "resumed"})
    shutil.copytree(finished.run_dir, resumed.run_dir)
    torch.manual_seed(12345)
    train(resumed, resume=resumed.run_dir / "checkpoints" / checkpoints[0].name)
    uninterrupted = load_checkpoint(checkpoints[-1])
    after_resume = load_checkpoint(resumed.run_dir / "checkpoints" / checkpoints[-1].name)
    # Each batch's views are seeded by its place in the run, so the resumed run drew the same views.
    for name, tensor in uninterrupted["encoder"].items():
        torch.testing.assert_close(after_resume["encoder"][name], tensor, atol=1e-6, rtol=0, msg=name)
    assert losses(resumed.run_dir) == pytest.approx(losses(finished.run_dir), abs=1e-5)
