"""Checkpoint files: at most K kept, each with its digest, nothing left behind; nothing executable is loaded."""

import hashlib
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import (
    OldCheckpointFormat,
    UnsafeCheckpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    weights_path,
)


def test_only_the_newest_k_checkpoints_are_kept_with_their_digests(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
        assert len(list_checkpoints(tmp_path)) == min(step, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000004.pt",
        "step-00000004.pt.sha256",
        "step-00000004.safetensors",
        "step-00000005.pt",
        "step-00000005.pt.sha256",
        "step-00000005.safetensors",
    ]  # older checkpoints went with their weights and digests; no temporary file is left
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [4, 5]


def test_weights_go_to_safetensors_and_the_rest_loads_with_weights_only(tmp_path: Path) -> None:
    encoder = torch.nn.Embedding(5, 3)
    state = {
        "step": 7,
        "encoder": encoder.state_dict(),
        "mlm_head": {"weight": encoder.weight, "bias": torch.zeros(5)},  # tied to the encoder, as the MLM decoder is
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": [{"python": (3, (1, 2, 3), None), "torch": torch.get_rng_state()}],
        "config": {"run_name": "r"},
    }
    path = save_checkpoint(tmp_path, 7, state, keep=1)
    from safetensors.torch import load_file

    stored = load_file(weights_path(path))
    assert set(stored) == {"encoder.weight", "mlm_head.weight", "mlm_head.bias"}
    assert "encoder" not in torch.load(path, weights_only=True)  # the weights are not in the pickle
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["encoder"]["weight"], encoder.weight) and loaded["config"]["run_name"] == "r"
    assert torch.equal(loaded["mlm_head"]["weight"], encoder.weight)
    assert loaded["rng"][0]["python"] == (3, (1, 2, 3), None)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_a_tampered_pickle_payload_is_refused_even_with_a_matching_digest(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"step": 1, "encoder": {"w": torch.zeros(2)}}, keep=1)
    buffer = io.BytesIO()
    torch.save({"step": 1, "config": Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(Exception, match="sha256"):  # the digest catches it first
        load_checkpoint(path)
    # An attacker who also rewrites the digest file still gets nothing executed: weights_only refuses it.
    digest = path.with_name(path.name + ".sha256")
    lines = [line for line in digest.read_text().splitlines() if not line.endswith(f"  {path.name}")]
    lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
    digest.write_text("\n".join(lines) + "\n")
    with pytest.raises(UnsafeCheckpoint, match="other than tensors"):
        load_checkpoint(path)


def test_a_checkpoint_of_the_old_single_pickle_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "step-00000010.pt"
    data = pickle.dumps({"step": 10})
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(data).hexdigest())
    with pytest.raises(OldCheckpointFormat, match="old single-pickle format"):
        load_checkpoint(path)
