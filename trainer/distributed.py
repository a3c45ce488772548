"""Process-group set-up for torchrun (DDP across GPUs and nodes; one gloo process on CPU works too)."""

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_topology() -> Topology:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.

    NCCL on CUDA, gloo on CPU; each process drives the GPU of its LOCAL_RANK."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Topology(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return Topology(rank, world_size, local_rank, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


# How long the process group's worker threads get, with the GIL free, to finish freeing their last collective.
_WORKERS_SETTLE_S = 0.1


def shutdown(topology: Topology, after_error: bool = False) -> None:
    """Leave the process group, every rank at once unless ``after_error`` (a failing rank may be alone here).

    gloo's worker threads free each finished collective's tensors themselves, which takes the GIL; the group's
    destructor joins them while holding it. Destroyed while one of them still frees its last collective, the
    process never exits (seen in CI: torchrun waiting on a rank stuck in ``~ProcessGroupGloo``). A barrier and a
    short sleep, both waited with the GIL free, let them finish first."""
    if not topology.distributed:
        return
    if not after_error:
        dist.barrier()
    time.sleep(_WORKERS_SETTLE_S)
    dist.destroy_process_group()


def all_ranks_agree(flag: bool, topology: Topology) -> bool:
    """True when ``flag`` holds on every process; ``flag`` itself when running alone.

    A collective under DDP: every rank must call it at the same point, so that a condition seen on
    one rank only (a non-finite loss) stops all of them instead of leaving the others waiting in the
    next gradient all-reduce."""
    if not topology.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=topology.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def rank_seed(run_seed: int, rank: int) -> int:
    """The seed of one process's random streams (dropout, views, masking), derived from the run's seed.

    Rank 0 keeps the run seed, so a one-process run is unchanged; other ranks get independent streams,
    so no two processes draw the same dropout masks or views."""
    if rank == 0:
        return run_seed
    return int(np.random.SeedSequence([run_seed, rank]).generate_state(1)[0])


def barrier(topology: Topology) -> None:
    """Wait until every process gets here (a no-op alone)."""
    if topology.distributed:
        dist.barrier()


def gather_to_all(value: Any, topology: Topology) -> list[Any]:
    """Every process's ``value``, indexed by rank (a collective; ``[value]`` alone)."""
    if not topology.distributed:
        return [value]
    gathered: list[Any] = [None] * topology.world_size
    dist.all_gather_object(gathered, value)
    return gathered
