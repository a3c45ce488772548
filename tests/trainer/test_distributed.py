"""DDP with two real gloo processes on CPU: collective checks, the NaN guard, per-rank streams, no_sync, per-rank
resume."""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.trainer.conftest import spawn_ranks, tiny_config
from trainer.checkpoint import load_checkpoint
from trainer.data.loader import Batch
from trainer.distributed import Topology, all_ranks_agree, shutdown
from trainer.step_loss import StepLoss
from trainer.train import NonFiniteLoss, Trainer

CPU = Topology(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _join(rank: int, init_file: str) -> Topology:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    return Topology(rank, 2, 0, torch.device("cpu"))


def _digest(module: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in module.state_dict().values())).hexdigest()


def _agree(rank: int, init_file: str, results: str) -> None:
    topology = _join(rank, init_file)
    try:
        answers = {
            "everywhere": all_ranks_agree(True, topology),
            "not_on_rank_1": all_ranks_agree(rank != 1, topology),
            "nowhere": all_ranks_agree(False, topology),
        }
    finally:
        shutdown(topology)
    (Path(results) / f"{rank}.json").write_text(json.dumps(answers))


def test_a_condition_failing_on_one_rank_fails_on_every_rank(tmp_path: Path) -> None:
    # The non-finite-loss guard: rank 0 must stop too when only rank 1 saw NaN, or it hangs in all-reduce.
    spawn_ranks(_agree, (str(tmp_path / "init"), str(tmp_path)), [tmp_path / f"{rank}.json" for rank in (0, 1)])
    for rank in (0, 1):
        answers = json.loads((tmp_path / f"{rank}.json").read_text())
        assert answers == {"everywhere": True, "not_on_rank_1": False, "nowhere": False}


def test_alone_the_flag_is_its_own_answer() -> None:
    alone = Topology(0, 1, 0, torch.device("cpu"))
    assert all_ranks_agree(True, alone) is True and all_ranks_agree(False, alone) is False


def _poisoned_on_rank_1(rank: int, init_file: str, corpus_file: str, output_dir: str, results: str) -> None:
    topology = _join(rank, init_file)
    try:
        config = tiny_config(
            Path(corpus_file),
            Path(output_dir),
            monitor__log_every_steps=4,
            optim__max_steps=8,
            checkpoint__every_steps=8,
            objective__mlm_weight=0.0,
        )
        trainer = Trainer(config, topology)
        if rank == 1:  # the loss of this rank alone turns NaN from its third step on
            real_loss, calls = trainer.step_loss.loss, {"n": 0}

            def poisoned(batch: Batch) -> torch.Tensor:
                calls["n"] += 1
                return real_loss(batch) * (float("nan") if calls["n"] >= 3 else 1.0)

            trainer.step_loss.loss = poisoned  # type: ignore[method-assign]
        try:
            trainer.run()
            stopped = None
        except NonFiniteLoss as error:
            stopped = str(error)
        (Path(results) / f"{rank}.json").write_text(json.dumps({"stopped": stopped, "step": trainer.step}))
    finally:
        shutdown(topology)


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_metrics_row_naming_its_step(
    corpus_file: Path, tmp_path: Path
) -> None:
    spawn_ranks(
        _poisoned_on_rank_1,
        (str(tmp_path / "init"), str(corpus_file), str(tmp_path / "runs"), str(tmp_path)),
        [tmp_path / f"{rank}.json" for rank in (0, 1)],
    )
    reports = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0] == reports[1]  # both stopped, at the same step (the row of step 4), with the same reason
    assert reports[0]["step"] == 4 and reports[0]["stopped"].startswith("loss became nan at step 3 on rank 1")
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


# -- per-rank streams and the scratch tokenizer ---------------------------------------------------------------
def _one_step(rank: int, init_file: str, corpus_file: str, output_dir: str, results: str) -> None:
    import trainer.data.tokenizer as tokenizers

    real_train_wordpiece = tokenizers.train_wordpiece

    def counted(texts: Iterable[str], vocab_size: int, output: Path) -> Path:
        with (Path(results) / f"tokenizer-written-by-{rank}").open("a") as calls:
            calls.write(f"{output}\n")
        return real_train_wordpiece(texts, vocab_size, output)

    tokenizers.train_wordpiece = counted  # type: ignore[assignment]
    topology = _join(rank, init_file)
    try:
        trainer = Trainer(tiny_config(Path(corpus_file), Path(output_dir)), topology)
        dropout = torch.nn.functional.dropout(torch.ones(256), 0.5, training=True).nonzero().flatten().tolist()
        first = trainer.next_contrastive_batch().view_ids[:4].tolist()
        initial = _digest(trainer.encoder)
        record = trainer.train_step()
        report = {
            "seed": trainer.seed,
            "dropout": dropout,
            "views": first,
            "initial": initial,
            "after_step": _digest(trainer.encoder),
            "loss": record["loss"],
        }
    finally:
        shutdown(topology)
    (Path(results) / f"{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def one_ddp_step(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """Two gloo processes build the trainer (scratch tokenizer included) and take one step; what each saw."""
    root = tmp_path_factory.mktemp("ddp-step")
    results = root / "results"
    results.mkdir()
    spawn_ranks(
        _one_step,
        (str(root / "init"), str(corpus_file), str(root / "runs"), str(results)),
        [results / f"{rank}.json" for rank in (0, 1)],
    )
    return root / "runs", results, [json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1)]


def test_each_rank_draws_its_own_dropout_and_views_but_the_parameters_stay_identical(
    one_ddp_step: tuple[Path, Path, list[dict]],
) -> None:
    _, _, (rank0, rank1) = one_ddp_step
    assert rank0["seed"] == 3 and rank1["seed"] != 3  # rank 0 keeps the run seed; rank 1's is derived from it
    assert rank0["dropout"] != rank1["dropout"] and rank0["views"] != rank1["views"]
    assert rank0["loss"] != rank1["loss"]  # different texts and masks
    assert rank0["initial"] == rank1["initial"]  # the model is built under the run seed on every rank
    assert rank0["after_step"] == rank1["after_step"] != rank0["initial"]  # one all-reduced update everywhere


def test_the_scratch_tokenizer_is_written_once_by_rank_0_and_renamed_into_place(
    one_ddp_step: tuple[Path, Path, list[dict]],
) -> None:
    runs, results, _ = one_ddp_step
    written = (results / "tokenizer-written-by-0").read_text().splitlines()
    assert len(written) == 1 and not (results / "tokenizer-written-by-1").exists()
    run_dir = runs / "tiny"
    assert Path(written[0]).parent == run_dir and Path(written[0]).name.startswith(".tokenizer.")  # a temporary
    assert sorted(p.name for p in (run_dir / "tokenizer").iterdir()) == ["tokenizer.json", "vocab.txt"]
    assert (run_dir / "corpus" / "manifest.json").is_file()  # prepared once, by rank 0, then renamed into place
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # nothing half-written left


def test_a_failed_tokenizer_write_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.data.tokenizer as tokenizers

    def interrupted(texts: Iterable[str], vocab_size: int, output: Path) -> Path:
        (output / "tokenizer.json").write_text("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizers, "train_wordpiece", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenizers.write_tokenizer(["a text"], 100, tmp_path / "run" / "tokenizer")
    assert list((tmp_path / "run").iterdir()) == []


# -- no_sync during accumulation --------------------------------------------------------------------------
def mean_over_texts(self: StepLoss, batch: Batch) -> torch.Tensor:
    """A loss that is a mean of one term per text, through the DDP forward, without dropout."""
    self.model.eval()
    vectors, _ = self.model(batch.prefix_ids, batch.prefix_mask)
    return vectors[:, :4].sum(dim=1).mean()


def _accumulate(rank: int, init_file: str, corpus_file: str, output_dir: str, results: str) -> None:
    StepLoss.loss = mean_over_texts  # type: ignore[method-assign]
    topology = _join(rank, init_file)
    try:
        base = {"objective__mlm_weight": 0.0, "optim__max_steps": 2}
        accumulated = Trainer(
            tiny_config(Path(corpus_file), Path(output_dir), optim__batch_size=4, optim__grad_accumulation=2, **base),
            topology,
        )
        whole = Trainer(tiny_config(Path(corpus_file), Path(output_dir), optim__batch_size=8, **base), topology)
        no_sync_calls = []
        real_no_sync = accumulated.model.no_sync

        def counted_no_sync() -> Any:
            no_sync_calls.append(accumulated.step)
            return real_no_sync()

        accumulated.model.no_sync = counted_no_sync  # type: ignore[method-assign]
        gradient_differences, weight_differences = [], []
        for _ in range(2):
            accumulated.train_step()
            whole.train_step()
            pairs = list(zip(accumulated.encoder.parameters(), whole.encoder.parameters(), strict=True))
            gradient_differences.append(max(float((a.grad - b.grad).abs().max()) for a, b in pairs))
            weight_differences.append(max(float((a - b).abs().max()) for a, b in pairs))
        report = {
            "no_sync_at_steps": no_sync_calls,
            "gradient_differences": gradient_differences,
            "weight_differences": weight_differences,
            "gradient_norm": float(torch.stack([p.grad.norm() for p in whole.encoder.parameters()]).norm()),
            "weights": _digest(accumulated.encoder),
        }
    finally:
        shutdown(topology)
    (Path(results) / f"{rank}.json").write_text(json.dumps(report))


def test_accumulation_skips_the_all_reduce_on_non_final_micro_batches_and_matches_one_big_batch(
    corpus_file: Path, tmp_path: Path
) -> None:
    spawn_ranks(
        _accumulate,
        (str(tmp_path / "init"), str(corpus_file), str(tmp_path / "runs"), str(tmp_path)),
        [tmp_path / f"{rank}.json" for rank in (0, 1)],
    )
    reports = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["no_sync_at_steps"] == [0, 1]  # the first of the two micro-batches of each step
        assert report["gradient_norm"] > 1e-3
        assert max(report["gradient_differences"]) < 1e-6 and max(report["weight_differences"]) < 1e-6
    assert reports[0]["weights"] == reports[1]["weights"]


# -- per-rank RNG in checkpoints, exact resume, refused config changes ----------------------------------------
def _train_4_steps(
    rank: int, init_file: str, corpus_file: str, output_dir: str, results: str, resume: str | None
) -> None:
    topology = _join(rank, init_file)
    try:
        trainer = Trainer(
            tiny_config(Path(corpus_file), Path(output_dir), optim__max_steps=4, checkpoint__every_steps=2), topology
        )
        if resume is not None:
            trainer.restore(load_checkpoint(Path(resume)))
        losses = {}
        while trainer.step < 4:
            record = trainer.train_step()
            losses[record["step"]] = record["loss"]
            if trainer.step == 2 and resume is None:
                trainer.save()
        name = "resumed" if resume else "uninterrupted"
        (Path(results) / f"{name}-{rank}.json").write_text(
            json.dumps({"losses": losses, "weights": _digest(trainer.encoder)})
        )
    finally:
        shutdown(topology)


@pytest.fixture(scope="module")
def two_process_runs(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-process run of 4 steps with a checkpoint at step 2, and the same run resumed there in new processes."""
    root = tmp_path_factory.mktemp("ddp-resume")
    runs, results = root / "runs", root / "results"
    results.mkdir()
    for name, resume in (("first", None), ("second", str(runs / "tiny" / "checkpoints" / "step-00000002.pt"))):
        spawn_ranks(
            _train_4_steps,
            (str(root / f"init-{name}"), str(corpus_file), str(runs), str(results), resume),
            [results / f"{'resumed' if resume else 'uninterrupted'}-{rank}.json" for rank in (0, 1)],
        )
    return runs / "tiny" / "checkpoints" / "step-00000002.pt", results


def test_a_resumed_two_process_run_continues_each_rank_on_its_own_stream(two_process_runs: tuple[Path, Path]) -> None:
    checkpoint, results = two_process_runs
    rng = load_checkpoint(checkpoint)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    for rank in (0, 1):
        uninterrupted = json.loads((results / f"uninterrupted-{rank}.json").read_text())
        resumed = json.loads((results / f"resumed-{rank}.json").read_text())
        assert list(resumed["losses"]) == ["3", "4"]
        for step in ("3", "4"):
            assert resumed["losses"][step] == pytest.approx(uninterrupted["losses"][step], abs=1e-6), (rank, step)
        assert resumed["weights"] == uninterrupted["weights"]


def test_resuming_with_another_world_size_is_refused_unless_allowed(
    two_process_runs: tuple[Path, Path], corpus_file: Path
) -> None:
    checkpoint, _ = two_process_runs
    state = load_checkpoint(checkpoint)
    config = tiny_config(corpus_file, checkpoint.parents[2], optim__max_steps=4, checkpoint__every_steps=2)
    alone = Trainer(config, CPU)
    with pytest.raises(ValueError, match=r"world size \(2 processes, now 1\).*--allow-config-change"):
        alone.restore(state)
    assert alone.step == 0
    alone.restore(state, allow_config_change=True)
    assert alone.step == 2 and torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])  # rank 0's own stream
    assert alone.train_step()["step"] == 3


def test_resuming_with_another_batch_or_objective_is_refused_unless_allowed(corpus_file: Path, tmp_path: Path) -> None:
    from trainer.train import train

    config = tiny_config(corpus_file, tmp_path, optim__max_steps=1, checkpoint__every_steps=1)
    checkpoint = train(config).last_checkpoint
    state = load_checkpoint(checkpoint)
    bigger = tiny_config(corpus_file, tmp_path, optim__batch_size=32)
    with pytest.raises(ValueError, match=r"global batch \(16 texts per step, now 32\).*--allow-config-change"):
        Trainer(bigger, CPU).restore(state)
    warmer = tiny_config(corpus_file, tmp_path, objective__temperature=0.05)
    with pytest.raises(ValueError, match=r"objective \(temperature differ\)"):
        Trainer(warmer, CPU).restore(state)
    accumulated = tiny_config(corpus_file, tmp_path, optim__max_steps=2, optim__grad_accumulation=2)
    result = train(accumulated, resume=checkpoint, allow_config_change=True)  # the flag, as the CLI passes it
    assert result.steps == 2
