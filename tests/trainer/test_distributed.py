"""The collective checks of a DDP run, with two real gloo processes on CPU."""

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import Topology, all_ranks_agree


def _agree(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        topology = Topology(rank, 2, 0, torch.device("cpu"))
        answers = {
            "everywhere": all_ranks_agree(True, topology),
            "not_on_rank_1": all_ranks_agree(rank != 1, topology),
            "nowhere": all_ranks_agree(False, topology),
        }
    finally:
        dist.destroy_process_group()
    (Path(results) / f"{rank}.json").write_text(json.dumps(answers))


def test_a_condition_failing_on_one_rank_fails_on_every_rank(tmp_path: Path) -> None:
    # The non-finite-loss guard: rank 0 must stop too when only rank 1 saw NaN, or it hangs in all-reduce.
    mp.spawn(_agree, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        answers = json.loads((tmp_path / f"{rank}.json").read_text())
        assert answers == {"everywhere": True, "not_on_rank_1": False, "nowhere": False}


def test_alone_the_flag_is_its_own_answer() -> None:
    alone = Topology(0, 1, 0, torch.device("cpu"))
    assert all_ranks_agree(True, alone) is True and all_ranks_agree(False, alone) is False
