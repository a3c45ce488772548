"""Sharding across ranks and a batch order that resumes exactly."""

import json

import numpy as np
import pytest

from trainer.data.order import BatchOrder, DataPosition, epoch_permutation, equal_shard, shard


@pytest.mark.parametrize(("size", "world_size"), [(10, 3), (9, 3), (2, 4), (0, 2), (17, 1)])
def test_shards_are_disjoint_near_equal_and_cover_everything(size: int, world_size: int) -> None:
    items = list(range(size))
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    assert sorted(i for s in shards for i in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)  # extras on low ranks


@pytest.mark.parametrize(("size", "world_size"), [(10, 3), (9, 3), (2, 4), (17, 1)])
def test_equal_shards_truncate_or_pad_to_one_length(size: int, world_size: int) -> None:
    items = list(range(size))
    truncated = [equal_shard(items, rank, world_size, "truncate") for rank in range(world_size)]
    assert {len(s) for s in truncated} == {size // world_size}
    assert sorted(i for s in truncated for i in s) == items[: size - size % world_size]
    padded = [equal_shard(items, rank, world_size, "pad") for rank in range(world_size)]
    assert {len(s) for s in padded} == {-(-size // world_size)}
    assert {i for s in padded for i in s} == set(items)


def test_shard_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 3"):
        shard([1, 2, 3], 3, 3)
    with pytest.raises(ValueError, match="empty"):
        equal_shard([], 0, 2, "pad")


def test_epoch_permutations_are_seeded_by_seed_and_epoch() -> None:
    first = epoch_permutation(100, seed=7, epoch=0)
    assert sorted(first.tolist()) == list(range(100))
    assert np.array_equal(first, epoch_permutation(100, seed=7, epoch=0))
    assert not np.array_equal(first, epoch_permutation(100, seed=7, epoch=1))
    assert not np.array_equal(epoch_permutation(100, seed=1, epoch=0), epoch_permutation(100, seed=0, epoch=1))
    with pytest.raises(ValueError, match="non-negative"):
        epoch_permutation(10, seed=-1, epoch=0)


def test_an_epoch_gives_each_rank_full_disjoint_batches() -> None:
    orders = [BatchOrder(103, 8, seed=5, rank=rank, world_size=3) for rank in range(3)]
    assert {order.batches_per_epoch for order in orders} == {4}  # 103 // 3 = 34 per rank → 4 full batches
    for epoch in range(2):
        seen = [[i for batch in range(4) for i in order.batch(DataPosition(epoch, batch))] for order in orders]
        assert all(len(s) == len(set(s)) == 32 for s in seen)
        assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2])
    assert orders[0].batch(DataPosition(0, 0)) != orders[0].batch(DataPosition(1, 0))  # reshuffled per epoch


def test_a_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_one() -> None:
    def fresh() -> BatchOrder:
        return BatchOrder(50, 4, seed=11, rank=1, world_size=2, remainder="pad")

    stream = fresh().batches()
    uninterrupted = [next(stream)[0] for _ in range(20)]  # 6 batches per epoch: crosses three epochs

    stream = fresh().batches()
    before = []
    for _ in range(9):
        indices, position = next(stream)
        before.append(indices)
    saved = json.dumps(position.to_dict())  # what a checkpoint keeps
    assert DataPosition.from_dict(json.loads(saved)) == DataPosition(epoch=1, batch=3)

    resumed = fresh().batches(DataPosition.from_dict(json.loads(saved)))
    after = [next(resumed)[0] for _ in range(11)]
    assert before + after == uninterrupted


def test_batch_order_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchOrder(10, 8, seed=0, world_size=2)
    order = BatchOrder(10, 4, seed=0)
    with pytest.raises(ValueError, match="past the 2 batches"):
        order.batch(DataPosition(0, 2))
    with pytest.raises(ValueError, match="not a data position"):
        DataPosition.from_dict({"epoch": 1})
