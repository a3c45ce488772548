"""Checkpoint files: at most K kept, each with its digest, nothing left behind."""

from pathlib import Path

from trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


def test_only_the_newest_k_checkpoints_are_kept_with_their_digests(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
        assert len(list_checkpoints(tmp_path)) == min(step, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000004.pt",
        "step-00000004.pt.sha256",
        "step-00000005.pt",
        "step-00000005.pt.sha256",
    ]  # older checkpoints went with their digests; no temporary file is left
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [4, 5]
