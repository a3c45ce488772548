"""Model FLOPs utilisation (MFU) of training: the model FLOPs of the steps, and the device's peak.

Model FLOPs of one training pass (forward and backward) of the encoder, counted from its config
(Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B), for a text of n real tokens:

    6 · N · n  +  12 · L · H · n²

N = L · (4·H² + 2·H·I) is the weights of the layers' matrix multiplies (Q, K, V, output; the two
feed-forward matrices of inner size I): 2 FLOPs per weight per token forward, 4 backward. The second
term is attention (QKᵀ and the weighted sum of V: 4·n·H per token per layer forward, three times that
with backward). Embedding lookups, biases, norms and softmax are not matrix multiplies and are left
out. Padding is not counted: padded positions are computed and thrown away, which MFU should show.
The MLM head adds 6 · (H² + H·V) per masked position (its transform and the tied decoder).

Only passes with a graph count (``PretrainingModel`` forwards, the training passes): evaluation, the
frozen reference encoder and GradCache's graph-free first pass are extra hardware work, not model FLOPs.

The peak: on CUDA, a table of dense bf16 tensor-core peaks by device name; on CPU, measured in the same
run with fp32 matrix multiplies at the model's GEMM shapes (the best of them), so CPU MFU says how close
training comes to what torch's GEMMs reach on these cores.
"""

import inspect
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.encoder import PretrainingModel
from trainer.losses import IGNORE_INDEX

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s, by a whole word of the
# device's name. First match wins: the H100 PCIe and NVL before the SXM figure other H100s and the H200 share.
CUDA_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),  # not the L40 / L40S: whole words only
)


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model: PretrainingModel) -> "EncoderShape":
        config = model.encoder.transformer.config
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size)

    @property
    def layer_weights(self) -> int:
        """N: the weights of the transformer layers' matrix multiplies."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)

    def pass_flops(self, lengths: torch.Tensor) -> torch.Tensor:
        """Training FLOPs (forward + backward) of one encoder pass over texts of ``lengths`` real tokens."""
        n = lengths.to(torch.float64)
        return 6 * self.layer_weights * n.sum() + 12 * self.layers * self.hidden * (n * n).sum()

    def mlm_flops(self, masked_positions: torch.Tensor) -> torch.Tensor:
        """Training FLOPs of the MLM head over ``masked_positions`` decoded rows."""
        return 6 * (self.hidden**2 + self.hidden * self.vocab) * masked_positions.to(torch.float64)

    def gemm_shapes(self, rows: int) -> list[tuple[int, int, int]]:
        """(m, k, n) of the layers' matrix multiplies over ``rows`` token positions, and of the decoder."""
        h, i = self.hidden, self.intermediate
        return [(rows, h, h), (rows, h, i), (rows, i, h), (max(1, rows // 7), h, self.vocab)]


class TrainingFlops:
    """Counts the model FLOPs and real tokens of every training forward of ``model``, on the device (no sync)."""

    def __init__(self, model: PretrainingModel) -> None:
        self.shape = EncoderShape.of(model)
        self._signature = inspect.signature(model.forward)
        device = next(model.parameters()).device
        self.flops = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def reset(self) -> None:
        self.flops.zero_()
        self.tokens.zero_()

    def _count(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return
        inputs = self._signature.bind(*args, **kwargs).arguments
        for name in ("view_mask", "mlm_mask"):
            mask = inputs.get(name)
            if mask is not None:
                lengths = mask.sum(dim=1)
                self.flops += self.shape.pass_flops(lengths)
                self.tokens += lengths.sum()
        labels = inputs.get("mlm_labels")
        if labels is not None:
            self.flops += self.shape.mlm_flops((labels != IGNORE_INDEX).sum())


def cuda_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by name, None for a device not in the table."""
    return next((peak for key, peak in CUDA_BF16_PEAKS if re.search(rf"\b{key}\b", device_name)), None)


def measured_cpu_peak(shapes: list[tuple[int, int, int]], repeats: int = 3) -> float:
    """The best fp32 FLOP/s of torch matrix multiplies at ``shapes`` (m, k, n) on this CPU."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up: thread pool, allocation
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - started))
    return best
