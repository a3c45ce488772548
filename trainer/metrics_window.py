"""The loop's loss and gradient norm between two metrics rows, kept on the device.

Reading a tensor's value (``.item()``, ``float()``, ``bool()``) makes the host wait for every kernel queued
before it; doing that once per step keeps a GPU idle between steps. Steps add their values here as tensors,
and the loop reads the window once per metrics row: one sync per row instead of several per micro-batch.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NonFiniteStep:
    """The first step of a window whose loss or gradient norm was not finite, with both values."""

    step: int
    loss: float
    grad_norm: float


@dataclass(frozen=True)
class WindowMeans:
    steps: int
    loss: float  # mean over the window's steps
    grad_norm: float  # mean over the window's steps (before clipping)
    first_non_finite: NonFiniteStep | None


class MetricsWindow:
    """Sums of the loss and gradient norm over the steps since the last ``read``, and the first step where
    either was not finite, as device tensors; ``add`` never waits for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, grad norm
        self._first_non_finite = torch.zeros(3, dtype=torch.float64, device=self.device)  # step (0: none), loss, norm

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count one optimiser step (``step`` ≥ 1): its loss and gradient norm, 0-d tensors on the device."""
        values = torch.stack([loss.detach(), grad_norm.detach()]).to(torch.float64)
        self.steps += 1
        self._sums += values
        first = self._first_non_finite
        is_first = ~torch.isfinite(values).all() & (first[0] == 0)
        step_values = torch.cat([torch.full((1,), float(step), dtype=torch.float64, device=self.device), values])
        self._first_non_finite = torch.where(is_first, step_values, first)

    def read(self) -> WindowMeans:
        """The window's means and its first non-finite step, read with one device-to-host copy; starts a new
        window."""
        loss_sum, norm_sum, bad_step, bad_loss, bad_norm = torch.cat([self._sums, self._first_non_finite]).tolist()
        steps = max(1, self.steps)
        first = NonFiniteStep(int(bad_step), bad_loss, bad_norm) if bad_step else None
        means = WindowMeans(self.steps, loss_sum / steps, norm_sum / steps, first)
        self._reset()
        return means
