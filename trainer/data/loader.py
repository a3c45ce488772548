"""Training batches cut from the prepared shards in DataLoader workers: the next contrastive batch's
documents (trainer.data.order), their views (trainer.data.documents) and prefixes, padded into tensors,
in pinned memory on CUDA.

A batch's views are drawn from a generator seeded by (run seed, rank, epoch, batch): they depend only on
where the batch is in the run, so a restored run draws the same views without any worker state, and the
workers never touch the training process's random streams.
"""

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from service.models.tokenization import pad_batch
from trainer.config import ViewsConfig
from trainer.data.documents import batch_views, prefix
from trainer.data.order import BatchOrder, DataPosition
from trainer.data.shards import TokenShards


@dataclass
class Batch:
    """One process's share of a contrastive batch of B documents."""

    documents: torch.Tensor  # [B] corpus indices: texts of one document are never each other's negatives
    view_ids: torch.Tensor  # [2B, T]: every first view, then every second view (empty without views)
    view_mask: torch.Tensor
    prefix_ids: torch.Tensor  # [B, P]: each document truncated to the model's length (MLM, reference encoder)
    prefix_mask: torch.Tensor
    view_lengths: list[int]  # on the host, so that cutting chunks never waits for the device
    prefix_lengths: list[int]
    after: DataPosition  # where the run is once this batch is trained on

    @property
    def tokens(self) -> int:
        """Real tokens in the prefixes (what the encoder reads of each document), for throughput."""
        return sum(self.prefix_lengths)

    def views(self, *rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The view rows of ``rows``, one after another, padded to the longest of them (ids, mask)."""
        return _cut(self.view_ids, self.view_mask, self.view_lengths, rows)

    def prefixes(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix rows of ``rows``, padded to the longest of them (ids, mask)."""
        return _cut(self.prefix_ids, self.prefix_mask, self.prefix_lengths, (rows,))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (the DataLoader's pin-memory thread calls it on CUDA)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return replace(
            self,
            documents=move(self.documents),
            view_ids=move(self.view_ids),
            view_mask=move(self.view_mask),
            prefix_ids=move(self.prefix_ids),
            prefix_mask=move(self.prefix_mask),
        )


def _cut(
    ids: torch.Tensor, mask: torch.Tensor, lengths: list[int], rows: tuple[slice, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max((length for part in rows for length in lengths[part]), default=0)
    if len(rows) == 1:
        return ids[rows[0], :longest], mask[rows[0], :longest]
    return torch.cat([ids[part, :longest] for part in rows]), torch.cat([mask[part, :longest] for part in rows])


def _padded(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not token_ids:
        return torch.zeros((0, 0), dtype=torch.int64), torch.zeros((0, 0), dtype=torch.int64)
    batch = pad_batch(token_ids, pad_id)
    return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)


class ContrastiveBatches(Dataset[Batch]):
    """The batch that starts at a position: ``reads`` consecutive batches of ``order``, views and prefixes cut."""

    def __init__(
        self,
        shards: TokenShards,
        order: BatchOrder,
        reads: int,
        views: ViewsConfig | None,
        max_length: int,
        pad_id: int,
        seed: int,
    ) -> None:
        self.shards, self.order, self.reads, self.views = shards, order, reads, views
        self.max_length, self.pad_id, self.seed = max_length, pad_id, seed

    def positions(self, start: DataPosition) -> Iterator[DataPosition]:
        """The start of every batch from ``start`` on, without end."""
        while True:
            yield start
            for _ in range(self.reads):
                start = self.order.after(start)

    def __getitem__(self, start: DataPosition) -> Batch:
        indices, position = [], start
        for _ in range(self.reads):
            indices += self.order.batch(position)
            position = self.order.after(position)
        documents = [self.shards.document(i) for i in indices]
        prefixes = [prefix(document, self.max_length) for document in documents]
        views: list[list[int]] = []
        if self.views is not None:
            rng = random.Random(f"{self.seed}/{self.order.rank}/{start.epoch}/{start.batch}")
            first, second = batch_views(documents, self.views, self.max_length, rng)
            views = first + second
        view_ids, view_mask = _padded(views, self.pad_id)
        prefix_ids, prefix_mask = _padded(prefixes, self.pad_id)
        lengths = [len(v) for v in views], [len(p) for p in prefixes]
        return Batch(torch.tensor(indices), view_ids, view_mask, prefix_ids, prefix_mask, *lengths, position)


class _Positions(Sampler[DataPosition]):
    def __init__(self, batches: ContrastiveBatches, start: DataPosition) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[DataPosition]:
        return self.batches.positions(self.start)


WORKER_TIMEOUT_S = 600


def batch_stream(batches: ContrastiveBatches, start: DataPosition, workers: int, pin_memory: bool) -> Iterator[Batch]:
    """The batches from ``start`` on, cut by ``workers`` processes ahead of the training step (0: in this one)."""
    loader = DataLoader(
        batches,
        batch_size=None,
        sampler=_Positions(batches, start),
        num_workers=workers,
        pin_memory=pin_memory,
        # Its own generator: creating the iterator must not draw from the run's torch stream (exact resume).
        generator=torch.Generator(),
        prefetch_factor=2 if workers else None,
        # A batch takes milliseconds to cut: a worker silent this long is stuck (e.g. a fork of a process whose
        # other threads held a lock), and the run stops with an error instead of hanging.
        timeout=WORKER_TIMEOUT_S if workers else 0,
    )
    return iter(loader)
