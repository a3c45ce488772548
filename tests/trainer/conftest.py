"""Trainer fixtures: a real-text corpus (with a little PII), a tiny encoder run's configuration, a poisoned loss."""

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import trainer.step_loss as step_loss
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
    """A 20-step run of a 2-layer, 32-wide encoder trained from scratch, a metrics row (and a finite check) at every
    step; ``section__key=value`` overrides."""
    raw: dict = {
        "run_name": "tiny",
        "output_dir": str(output_dir),
        # Views cut in the test process: DataLoader workers are forks, and a fork of this many-threaded pytest
        # process can deadlock (seen once in CI); the workers have tests of their own (data/test_prepare.py).
        "corpus": {"path": str(corpus_file), "workers": 0},
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
        "monitor": {"eval_every_steps": 10, "validation_sample": 64, "log_every_steps": 1},  # a row every step
        # The gate off: tiny runs export one checkpoint several times (the gate's own tests turn it on).
        "export": {"model": "trained", "repository": str(output_dir / "repository"), "gate": {"enabled": False}},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return TrainConfig.model_validate(raw)


def poison_loss_from_step(monkeypatch: pytest.MonkeyPatch, step: int) -> Callable[..., torch.Tensor]:
    """Make the contrastive loss NaN from the ``step``-th step on (one loss call per step in the tiny runs): a NaN
    cannot be produced on demand from real data. Returns the real loss, to put back."""
    real = step_loss.global_info_nce
    calls = {"n": 0}

    def poisoned(a: torch.Tensor, b: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
        calls["n"] += 1
        loss = real(a, b, temperature, mask)
        return loss * float("nan") if calls["n"] >= step else loss

    monkeypatch.setattr(step_loss, "global_info_nce", poisoned)
    return real


def spawn_ranks(
    target: Callable[..., None],
    args: tuple[Any, ...],
    results: list[Path],
    timeout_s: float = 300,
    grace_after_results_s: float = 20,
) -> None:
    """Run ``target(rank, *args)`` in two gloo processes and wait for them, never forever: a rank that raised fails
    the test (mp.spawn's error); ranks still running after ``timeout_s`` are killed. When every file in ``results``
    is written the ranks did their work: ranks still running ``grace_after_results_s`` later hung exiting (the
    deadlock ``trainer.distributed.shutdown`` prevents, seen in CI before it did) and are killed, and the test goes
    on to check the results, with a warning; ranks killed without their results fail the test."""
    context = mp.spawn(target, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if all(path.is_file() for path in results):
            deadline = min(deadline, time.monotonic() + grace_after_results_s)
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            if all(path.is_file() for path in results):
                warnings.warn("gloo ranks hung exiting after writing their results; killed", stacklevel=2)
                return
            pytest.fail(f"two gloo processes were still running after {timeout_s:g} s without their results")
