"""make bench's compute floor: FLOPs counted from the graph agree with a BERT encoder's arithmetic."""

from pathlib import Path

import pytest

from loadtests.compute_floor import compute_floor, graph_flops
from trainer.encoder import from_scratch
from trainer.release.export import write_onnx

HIDDEN, LAYERS, HEADS = 32, 2, 2
INTERMEDIATE = 4 * HIDDEN  # from_scratch's feed-forward width


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("floor") / "model.onnx"
    encoder = from_scratch(vocab_size=30522, hidden_size=HIDDEN, layers=LAYERS, heads=HEADS, max_seq_length=64)
    write_onnx(encoder.eval(), path, attention="sdpa")
    return path


@pytest.mark.parametrize("tokens", [1, 10, 40])
def test_flops_per_token_are_the_encoders_multiplications(traced: Path, tokens: int) -> None:
    # Per token and layer: Q, K, V and output projections (4·h² multiply-adds), the feed-forward (2·h·i), and
    # the attention products Q·Kᵀ and weights·V (2·L·h, growing with the length L); 2 FLOPs a multiply-add.
    per_layer = 2 * (4 * HIDDEN**2 + 2 * HIDDEN * INTERMEDIATE + 2 * tokens * HIDDEN)
    flops = graph_flops(traced, tokens)
    assert flops.per_token == LAYERS * per_layer
    assert flops.weight_shapes == {
        (HIDDEN, HIDDEN): LAYERS * 4 * 2 * HIDDEN**2,
        (HIDDEN, INTERMEDIATE): LAYERS * 2 * HIDDEN * INTERMEDIATE,
        (INTERMEDIATE, HIDDEN): LAYERS * 2 * HIDDEN * INTERMEDIATE,
    }


def test_the_floor_is_the_measured_matmul_speed_over_each_inputs_flops(traced: Path) -> None:
    floor = compute_floor(traced, tokens_per_input=20.0, batch=32, threads=1, seconds=0.5)
    assert floor.matmul_gflops > 0
    assert floor.inputs_per_s == pytest.approx(floor.matmul_gflops * 1e9 / (floor.flops_per_token * 20.0))
