"""The loop's metrics window: means since the last row, and the first non-finite step with its values."""

import math

import pytest
import torch

from trainer.metrics_window import MetricsWindow


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def test_the_window_reads_the_means_since_the_last_read_and_starts_again() -> None:
    window = MetricsWindow(torch.device("cpu"))
    for step, (loss, norm) in enumerate([(2.0, 1.0), (1.0, 3.0), (0.5, 2.0)], start=1):
        window.add(step, scalar(loss), scalar(norm))
    means = window.read()
    assert (means.steps, means.first_non_finite) == (3, None)
    assert means.loss == pytest.approx(3.5 / 3) and means.grad_norm == pytest.approx(2.0)
    window.add(4, scalar(0.25), scalar(0.5))
    means = window.read()
    assert (means.steps, means.loss, means.grad_norm) == (1, 0.25, 0.5)


def test_the_first_non_finite_step_is_kept_with_its_values_until_read() -> None:
    window = MetricsWindow(torch.device("cpu"))
    window.add(11, scalar(1.0), scalar(1.0))
    window.add(12, scalar(1.0), scalar(float("inf")))  # a gradient that overflowed, the loss still finite
    window.add(13, scalar(float("nan")), scalar(float("nan")))
    first = window.read().first_non_finite
    assert first is not None and (first.step, first.loss, first.grad_norm) == (12, 1.0, math.inf)
    window.add(14, scalar(float("nan")), scalar(1.0))
    first = window.read().first_non_finite
    assert first is not None and first.step == 14 and math.isnan(first.loss)
    window.add(15, scalar(1.0), scalar(1.0))
    assert window.read().first_non_finite is None
