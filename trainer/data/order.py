"""Sharding across DDP ranks and a resumable batch order, over a prepared corpus's documents.

Deterministic: the same texts, seed and world size give the same batches on every machine and in
every process, which is what exact resume and DDP sharding rely on.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

Remainder = Literal["truncate", "pad"]
T = TypeVar("T")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Every ``world_size``-th item from ``rank`` on.

    The shards of ranks 0 … world_size − 1 are disjoint and together hold every item; their sizes
    differ by at most one (the first ``len(items) % world_size`` ranks hold one more). Use
    equal_shard where every rank must take the same number of steps (DDP).
    """
    _check_rank(rank, world_size)
    return list(items[rank::world_size])


def equal_shard(items: Sequence[T], rank: int, world_size: int, remainder: Remainder = "truncate") -> list[T]:
    """Like shard, but every rank's shard has the same length, as DDP needs.

    ``truncate``: the last ``len(items) % world_size`` items are left out and each rank holds
    ``len(items) // world_size``; shards stay disjoint. ``pad``: items are repeated from the start
    (as torch's DistributedSampler does) until each rank holds ``ceil(len(items) / world_size)``;
    every item is covered and a few appear twice.
    """
    _check_rank(rank, world_size)
    if remainder == "truncate":
        return list(items[rank : len(items) - len(items) % world_size : world_size])
    if not items:
        raise ValueError("cannot pad an empty sequence into shards")
    total = math.ceil(len(items) / world_size) * world_size
    padded = (list(items) * math.ceil(total / len(items)))[:total]
    return padded[rank::world_size]


@dataclass(frozen=True)
class DataPosition:
    """Where a run is in its data: ``batch`` is the index, within ``epoch``, of the next batch."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, state: Mapping[str, object]) -> "DataPosition":
        """The position saved by to_dict; ValueError if ``state`` is not one."""
        epoch, batch = state.get("epoch"), state.get("batch")
        if not (isinstance(epoch, int) and isinstance(batch, int) and epoch >= 0 and batch >= 0):
            raise ValueError(f"not a data position: {dict(state)!r}")
        return cls(epoch=epoch, batch=batch)


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(size) drawn from a numpy Generator seeded with (seed, epoch).

    Seeding with the pair rather than seed + epoch keeps (seed 1, epoch 0) and (seed 0, epoch 1)
    apart. The same numpy version gives the same permutation on every machine.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(size)


class BatchOrder:
    """The batches of corpus indices one process trains on, epoch after epoch.

    Each epoch permutes all ``size`` indices (epoch_permutation), takes this rank's equal_shard of
    the permutation — so ranks see different texts every epoch, and ``truncate`` leaves out
    different ones — and cuts it into full batches. A last partial batch is dropped: every batch
    has the same number of in-batch negatives and every rank the same number of batches.

    The batch at a position depends only on the constructor's arguments and the position, so a run
    restored at a saved DataPosition sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        remainder: Remainder = "truncate",
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        per_rank = size // world_size if remainder == "truncate" else math.ceil(size / world_size)
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{size} texts over {world_size} process(es) give {per_rank} per process, "
                f"fewer than one batch of {batch_size}; add text or lower the batch size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.remainder = rank, world_size, remainder
        self._epoch: int | None = None
        self._shard = np.zeros(0, dtype=np.int64)

    def batch(self, position: DataPosition) -> list[int]:
        """The corpus indices of the batch at ``position``."""
        if position.batch >= self.batches_per_epoch:
            raise ValueError(
                f"position {position} is past the {self.batches_per_epoch} batches of an epoch "
                "(was the batch size or the number of processes changed?)"
            )
        if self._epoch != position.epoch:
            # equal_shard over a numpy array: 8 bytes a document, not a Python list of ints.
            permutation = epoch_permutation(self.size, self.seed, position.epoch)
            if self.remainder == "truncate":
                self._shard = permutation[self.rank : self.size - self.size % self.world_size : self.world_size]
            else:
                total = math.ceil(self.size / self.world_size) * self.world_size
                self._shard = np.resize(permutation, total)[self.rank :: self.world_size]
            self._epoch = position.epoch
        start = position.batch * self.batch_size
        return [int(i) for i in self._shard[start : start + self.batch_size]]

    def after(self, position: DataPosition) -> DataPosition:
        """The position of the batch that follows the one at ``position``."""
        if position.batch + 1 < self.batches_per_epoch:
            return DataPosition(position.epoch, position.batch + 1)
        return DataPosition(position.epoch + 1, 0)

    def batches(self, start: DataPosition | None = None) -> Iterator[tuple[list[int], DataPosition]]:
        """Batches from ``start`` (default: the beginning) on, without end, each with the position to
        save once it has been trained on."""
        position = start if start is not None else DataPosition()
        while True:
            indices = self.batch(position)
            position = self.after(position)
            yield indices, position
