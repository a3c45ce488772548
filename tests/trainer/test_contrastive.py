"""Contrastive batches across processes and chunks, and false negatives: each against the plain loss of
one process holding the whole batch, or against a hand computation."""

import math
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.trainer.conftest import spawn_ranks, tiny_config
from tests.trainer.test_losses import cross_entropy, dot, unit_rows
from trainer.contrastive import (
    false_negative_mask,
    global_info_nce,
    grad_cache_backward,
    micro_batches_per_contrastive_batch,
)
from trainer.data.order import DataPosition
from trainer.distributed import Topology, shutdown
from trainer.losses import info_nce
from trainer.train import Trainer, read_metrics

TEMPERATURE = 0.1
CPU = Topology(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def masked_info_nce_reference(
    a: torch.Tensor, b: torch.Tensor, temperature: float, masked: set[tuple[int, int]]
) -> float:
    """info_nce with the logits of the ``masked`` (row, column) pairs left out of each softmax."""
    rows_a, rows_b = unit_rows(a), unit_rows(b)
    n = len(rows_a)

    def direction(anchors: list[list[float]], others: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            kept = [j for j in range(n) if (i, j) not in masked]
            total += cross_entropy([dot(anchors[i], others[j]) / temperature for j in kept], kept.index(i))
        return total / n

    return (direction(rows_a, rows_b) + direction(rows_b, rows_a)) / 2


def test_masking_a_false_negative_changes_the_loss_as_a_hand_computation_says() -> None:
    # Three texts whose two views are the same basis vector: a_i·b_i = 1, a_i·b_j = 0; temperature 1.
    # Each row's cross-entropy is log(1 + k/e) with k its negatives: 2 unmasked, 1 for texts 0 and 1 once
    # they are marked as one document.
    a = torch.eye(3)
    assert float(info_nce(a, a.clone(), 1.0)) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    mask = false_negative_mask(torch.tensor([7, 7, 8]))
    expected = (2 * math.log(1 + 1 / math.e) + math.log(1 + 2 / math.e)) / 3
    assert float(info_nce(a, a.clone(), 1.0, mask)) == pytest.approx(expected, rel=1e-6)


def test_a_masked_pair_leaves_exactly_its_logits_out_of_the_denominator() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    documents = torch.tensor([0, 1, 2, 1, 4, 5])  # texts 1 and 3 are of one document
    mask = false_negative_mask(documents)
    assert mask.sum() == 2 and mask[1, 3] and mask[3, 1] and not mask.diagonal().any()
    expected = masked_info_nce_reference(a, b, TEMPERATURE, {(1, 3), (3, 1)})
    assert float(info_nce(a, b, TEMPERATURE, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(info_nce(a, b, TEMPERATURE)) != pytest.approx(expected, rel=1e-3)


def test_pairs_above_the_reference_cosine_are_masked_and_the_rest_kept() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])  # texts 0 and 1 are near-duplicates
    mask = false_negative_mask(torch.arange(3), reference, threshold=0.95)
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert not false_negative_mask(torch.arange(3), reference, threshold=None).any()


def encoder(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8))


def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=generator)
    return x, x + 0.3 * torch.randn(n, 12, generator=generator)


def plain(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = info_nce(model(x), model(y), TEMPERATURE, mask)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def cached(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, chunk: int, context=None
) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    starts = list(range(0, len(x), chunk))

    def embed_chunk(i: int, with_graph: bool) -> tuple[torch.Tensor, None]:
        part = slice(starts[i], starts[i] + chunk)
        return model(torch.cat([x[part], y[part]])), None

    def loss_of_embeddings(chunks: list[torch.Tensor]) -> torch.Tensor:
        a = torch.cat([c[: len(c) // 2] for c in chunks])
        b = torch.cat([c[len(c) // 2 :] for c in chunks])
        return global_info_nce(a, b, TEMPERATURE, mask)

    loss = grad_cache_backward(
        embed_chunk, len(starts), loss_of_embeddings, context or (lambda i: nullcontext()), torch.device("cpu")
    )
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_grad_cache_at_chunk_8_equals_the_plain_loss_and_gradients_at_batch_32() -> None:
    x, y = pairs(32)
    mask = false_negative_mask(torch.tensor([i // 2 if i < 4 else i for i in range(32)]))  # a few masked pairs
    model = encoder()
    plain_loss, plain_grads = plain(model, x, y, mask)
    cached_loss, cached_grads = cached(model, x, y, mask, chunk=8)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-6)
    for g, h in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_grad_cache_repeats_each_chunks_dropout_in_its_second_pass() -> None:
    x, y = pairs(32)
    model = encoder(dropout=0.5)
    torch.manual_seed(9)
    cached_loss, cached_grads = cached(model, x, y, None, chunk=8)
    # The reference: the same chunks in the same RNG order, all with a graph, one backward.
    torch.manual_seed(9)
    model.zero_grad()
    chunks = [model(torch.cat([x[s : s + 8], y[s : s + 8]])) for s in range(0, 32, 8)]
    loss = info_nce(torch.cat([c[:8] for c in chunks]), torch.cat([c[8:] for c in chunks]), TEMPERATURE)
    loss.backward()
    assert cached_loss == pytest.approx(float(loss.detach()), rel=1e-6)
    for g, p in zip(cached_grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def _two_ranks(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, y = pairs(32)
        mask = false_negative_mask(torch.tensor([i // 2 if i < 4 else i for i in range(32)]))
        mask[3, 20] = mask[20, 3] = True  # a masked pair across ranks
        mine = slice(rank * 16, (rank + 1) * 16)
        model = DistributedDataParallel(encoder())
        loss = global_info_nce(model(x[mine]), model(y[mine]), TEMPERATURE, mask)
        loss.backward()
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, loss.detach())
        gathered = {"loss": float(sum(losses) / 2), "grads": [p.grad.clone() for p in model.parameters()]}

        def no_sync_but_last(i: int):
            return model.no_sync() if i < 3 else nullcontext()

        # GradCache on each rank (4 chunks of 4 texts) under DDP, across the ranks' batches.
        cached_loss, cached_grads = cached(model, x[mine], y[mine], mask, chunk=4, context=no_sync_but_last)
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, torch.tensor(cached_loss))
        both = {"gathered": gathered, "cached": {"loss": float(sum(losses) / 2), "grads": cached_grads}}
        torch.save(both, Path(results) / f"{rank}.pt")
    finally:
        shutdown(Topology(rank, 2, 0, torch.device("cpu")))


def test_two_gloo_processes_of_batch_16_match_one_process_of_batch_32(tmp_path: Path) -> None:
    spawn_ranks(_two_ranks, (str(tmp_path / "init"), str(tmp_path)), [tmp_path / f"{rank}.pt" for rank in (0, 1)])
    x, y = pairs(32)
    mask = false_negative_mask(torch.tensor([i // 2 if i < 4 else i for i in range(32)]))
    mask[3, 20] = mask[20, 3] = True
    single_loss, single_grads = plain(encoder(), x, y, mask)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"{rank}.pt")
        for variant in ("gathered", "cached"):
            assert results[variant]["loss"] == pytest.approx(single_loss, rel=1e-5), (rank, variant)
            for g, h in zip(results[variant]["grads"], single_grads, strict=True):
                torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {variant}")


def test_a_contrastive_batch_must_divide_into_every_process_micro_batches() -> None:
    assert micro_batches_per_contrastive_batch(None, 16, 4) == 1
    assert micro_batches_per_contrastive_batch(128, 16, 4) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        micro_batches_per_contrastive_batch(96, 16, 4)


def without_dropout(trainer: Trainer) -> Trainer:
    for module in trainer.encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return trainer


def test_the_trainer_step_with_grad_cache_equals_the_plain_step(corpus_file: Path, tmp_path: Path) -> None:
    settings = {"optim__batch_size": 8, "objective__mlm_weight": 0.0, "objective__contrastive_batch": 32}
    plain_trainer = without_dropout(Trainer(tiny_config(corpus_file, tmp_path, **settings), CPU))
    cached_config = tiny_config(corpus_file, tmp_path, objective__grad_cache_chunk=8, **settings)
    cached_trainer = without_dropout(Trainer(cached_config, CPU))
    for _ in range(2):
        a, b = plain_trainer.train_step(), cached_trainer.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert cached_trainer.position == DataPosition(0, 8)  # four micro-batches of 8 per contrastive batch of 32


def test_a_run_with_every_option_trains_and_keeps_its_reference_frozen(corpus_file: Path, tmp_path: Path) -> None:
    config = tiny_config(
        corpus_file,
        tmp_path,
        objective__contrastive_batch=32,
        objective__grad_cache_chunk=8,
        objective__false_negative_threshold=0.9,
    )
    trainer = Trainer(config, CPU)
    assert trainer.mlm_head is not None  # the MLM share of each chunk goes through the second pass
    initial = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    records = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert trainer.step_loss.reference_encoder is not None
    for name, tensor in trainer.step_loss.reference_encoder.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(t, initial[n]) for n, t in trainer.encoder.state_dict().items())


def test_two_torchrun_processes_train_with_every_option(corpus_file: Path, tmp_path: Path) -> None:
    # The Trainer's own path under DDP: gathered views and document ids, the reference encoder on each
    # rank, GradCache chunks under no_sync.
    config = tiny_config(
        corpus_file,
        tmp_path,
        optim__max_steps=3,
        optim__batch_size=8,
        checkpoint__every_steps=3,
        objective__contrastive_batch=32,
        objective__grad_cache_chunk=8,
        objective__false_negative_threshold=0.9,
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer", "train", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(config.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
