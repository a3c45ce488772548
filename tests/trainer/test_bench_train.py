"""make bench-train's arithmetic: model FLOPs as torch's own FLOP counter counts them, and the peaks table (the
benchmark itself takes minutes and is not run here)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loadtests.train_flops import TrainingFlops, cuda_peak, measured_cpu_peak
from trainer.encoder import MaskedLmHead, PretrainingModel, from_scratch
from trainer.losses import IGNORE_INDEX


def tiny_model() -> PretrainingModel:
    encoder = from_scratch(300, hidden_size=32, layers=2, heads=2, max_seq_length=24, seed=1)
    return PretrainingModel(encoder, MaskedLmHead(encoder))


def counted_by_torch(model: PretrainingModel, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """The matrix-multiply FLOPs torch counts for one training pass of views and MLM over unpadded ``ids``."""
    mask = torch.ones_like(ids)
    with FlopCounterMode(display=False) as counter:
        vectors, predictions = model(ids, mask, ids, mask, labels)
        assert vectors is not None and predictions is not None
        (vectors.sum() + predictions.logits.sum()).backward()  # type: ignore[no-untyped-call]
    return int(counter.get_total_flops())


def every_fourth_masked(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, ::4] = ids[:, ::4]
    return labels


def test_the_model_flops_are_those_torch_counts_and_padding_is_not_counted() -> None:
    model = tiny_model()
    flops = TrainingFlops(model)
    ids = torch.randint(5, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = every_fourth_masked(ids)
    expected = counted_by_torch(model, ids, labels)
    assert float(flops.flops) == pytest.approx(expected, rel=1e-9)
    assert float(flops.tokens) == 2 * 3 * 16  # the views' pass and the MLM pass

    # Two texts of 16 and 7 tokens padded to 16: the FLOPs of the two texts alone, unpadded.
    short = ids[1:2, :7]
    one_by_one = counted_by_torch(model, ids[:1], every_fourth_masked(ids[:1])) + counted_by_torch(
        model, short, every_fourth_masked(short)
    )
    padded = torch.cat([ids[:1], torch.cat([short, torch.zeros(1, 9, dtype=ids.dtype)], dim=1)])
    mask = (torch.arange(16) < torch.tensor([[16], [7]])).long()
    padded_labels = torch.where(mask.bool(), every_fourth_masked(padded), IGNORE_INDEX)
    flops.reset()
    model(padded, mask, padded, mask, padded_labels)
    assert float(flops.flops) == pytest.approx(one_by_one, rel=1e-9)

    flops.reset()
    with torch.no_grad():  # evaluation, GradCache's first pass: no training FLOPs
        model(ids, torch.ones_like(ids))
    assert float(flops.flops) == 0.0


def test_peaks_by_device_name() -> None:
    assert cuda_peak("NVIDIA H100 80GB HBM3") == cuda_peak("NVIDIA H200") == 989e12
    assert cuda_peak("NVIDIA H100 PCIe") == 756e12
    assert cuda_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert cuda_peak("NVIDIA L4") == 121e12
    assert cuda_peak("NVIDIA L40S") is None and cuda_peak("Tesla T4") is None
    assert measured_cpu_peak([(64, 32, 48)], repeats=1) > 0
