"""Each loss and metric against a slow, obviously-correct reference written with Python loops
(as lightly tests NT-Xent against ``_calc_ntxent_loss_manual``), plus the behaviour it exists for."""

import math

import numpy as np
import pytest
import torch

from trainer.losses import alignment, dimension_std, effective_rank, info_nce, masked_lm_loss, uniformity

Rows = list[list[float]]


def unit_rows(x: torch.Tensor) -> Rows:
    rows = []
    for row in x.tolist():
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([v / norm for v in row])
    return rows


def dot(u: list[float], v: list[float]) -> float:
    return sum(p * q for p, q in zip(u, v, strict=True))


def squared_distance(u: list[float], v: list[float]) -> float:
    return sum((p - q) ** 2 for p, q in zip(u, v, strict=True))


def cross_entropy(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(x) for x in logits))


def info_nce_reference(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    """Cross-view negatives only (SimCSE), both directions averaged."""
    rows_a, rows_b = unit_rows(a), unit_rows(b)
    n = len(rows_a)

    def direction(anchors: Rows, others: Rows) -> float:
        return sum(cross_entropy([dot(anchors[i], others[j]) / temperature for j in range(n)], i) for i in range(n)) / n

    return (direction(rows_a, rows_b) + direction(rows_b, rows_a)) / 2


def nt_xent_reference(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    """SimCLR's NT-Xent: the 2B − 2 negatives include the same-view rows. info_nce must NOT equal this."""
    rows = unit_rows(a) + unit_rows(b)
    n = len(rows) // 2
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        logits = [dot(rows[i], rows[j]) / temperature for j in others]
        total += cross_entropy(logits, others.index(positive))
    return total / (2 * n)


def masked_lm_reference(logits: torch.Tensor, labels: torch.Tensor) -> float:
    losses = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label != -100:
                losses.append(cross_entropy(logits[b, t].tolist(), label))
    return sum(losses) / len(losses)


def alignment_reference(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
    rows_a, rows_b = unit_rows(a), unit_rows(b)
    distances = [math.sqrt(squared_distance(u, v)) for u, v in zip(rows_a, rows_b, strict=True)]
    return sum(math.pow(d, alpha) for d in distances) / len(distances)


def uniformity_reference(x: torch.Tensor, t: float) -> float:
    rows = unit_rows(x)
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return math.log(sum(math.exp(-t * squared_distance(rows[i], rows[j])) for i, j in pairs) / len(pairs))


def effective_rank_reference(x: torch.Tensor) -> float:
    singular: list[float] = np.linalg.svd(x.numpy(), compute_uv=False).tolist()  # an independent SVD
    total = sum(singular)
    return math.exp(-sum(s / total * math.log(s / total) for s in singular if s > 0))


def dimension_std_reference(x: torch.Tensor) -> list[float]:
    rows = unit_rows(x)
    stds = []
    for d in range(len(rows[0])):
        column = [row[d] for row in rows]
        mean = sum(column) / len(column)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in column) / (len(column) - 1)))
    return stds


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- InfoNCE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "dim", "temperature"), [(2, 3, 1.0), (8, 16, 0.05), (16, 4, 0.5), (5, 64, 0.1), (1, 8, 0.2)]
)
def test_info_nce_matches_the_reference(batch: int, dim: int, temperature: float) -> None:
    a, b = randn(batch, dim, seed=batch), randn(batch, dim, seed=dim + 100)
    expected = info_nce_reference(a, b, temperature)
    assert float(info_nce(a, b, temperature)) == pytest.approx(expected, abs=1e-9)
    assert float(info_nce(a.float(), b.float(), temperature)) == pytest.approx(expected, abs=1e-5)
    # Rows are normalised inside: scaling a row changes nothing.
    scale = torch.linspace(0.5, 3.0, batch, dtype=torch.float64)[:, None]
    assert float(info_nce(a * scale, b, temperature)) == pytest.approx(expected, abs=1e-9)


def test_info_nce_uses_cross_view_negatives_only() -> None:
    a, b = randn(8, 16, seed=1), randn(8, 16, seed=2)
    assert float(info_nce(a, b, 0.1)) != pytest.approx(nt_xent_reference(a, b, 0.1), abs=1e-3)


def test_info_nce_is_zero_for_one_pair_and_refuses_mismatched_views() -> None:
    assert float(info_nce(randn(1, 4, seed=0), randn(1, 4, seed=1), 0.1)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(randn(4, 8, seed=0), randn(5, 8, seed=1), 0.1)


def test_info_nce_prefers_matched_pairs_and_has_finite_gradients() -> None:
    a = randn(32, 16, seed=0, dtype=torch.float32).requires_grad_()
    b = (a.detach() + 0.05 * randn(32, 16, seed=1, dtype=torch.float32)).requires_grad_()
    matched = info_nce(a, b, 0.1)
    shuffled = info_nce(a, b[torch.randperm(32, generator=torch.Generator().manual_seed(2))], 0.1)
    assert matched.item() < shuffled.item() - 1.0
    matched.backward()  # type: ignore[no-untyped-call]
    for grad in (a.grad, b.grad):
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


# -- masked-token modelling ------------------------------------------------------------------------


def test_masked_lm_loss_matches_the_reference_and_skips_unmasked_positions() -> None:
    logits = randn(3, 5, 11, seed=3).requires_grad_()
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[1, 4], labels[2, 0], labels[2, 3] = 7, 0, 10, 2
    loss = masked_lm_loss(logits, labels)
    assert loss.item() == pytest.approx(masked_lm_reference(logits.detach(), labels), abs=1e-9)
    loss.backward()  # type: ignore[no-untyped-call]
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad[0, 0].abs().sum()) == 0 and float(logits.grad[0, 1].abs().sum()) > 0


def test_masked_lm_loss_without_masked_positions_is_a_differentiable_zero() -> None:
    logits = randn(2, 4, 9, seed=4).requires_grad_()
    empty = masked_lm_loss(logits, torch.full((2, 4), -100))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()  # type: ignore[no-untyped-call]
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        masked_lm_loss(logits, torch.full((2, 5), -100))


# -- representation metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_alignment_matches_the_reference(alpha: float) -> None:
    a, b = randn(7, 5, seed=5), randn(7, 5, seed=6)  # not unit length: normalised inside
    assert float(alignment(a, b, alpha)) == pytest.approx(alignment_reference(a, b, alpha), abs=1e-9)
    assert float(alignment(a, 2 * a, alpha)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_uniformity_matches_the_reference(t: float) -> None:
    x = randn(9, 4, seed=7)
    assert float(uniformity(x, t)) == pytest.approx(uniformity_reference(x, t), abs=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        uniformity(x[:1], t)


@pytest.mark.parametrize(("rows", "dim"), [(6, 4), (20, 8), (5, 12)])
def test_effective_rank_matches_the_reference(rows: int, dim: int) -> None:
    x = randn(rows, dim, seed=rows * dim)
    assert float(effective_rank(x)) == pytest.approx(effective_rank_reference(x), abs=1e-9)
    assert float(effective_rank(x.float())) == pytest.approx(effective_rank_reference(x), abs=1e-5)


def test_effective_rank_counts_equal_directions() -> None:
    assert float(effective_rank(torch.eye(5, 16))) == pytest.approx(5.0, abs=1e-9)
    assert float(effective_rank(torch.zeros(4, 3))) == 1.0


def test_dimension_std_matches_the_reference() -> None:
    x = randn(10, 6, seed=8)
    assert dimension_std(x).tolist() == pytest.approx(dimension_std_reference(x), abs=1e-9)


def test_a_collapsed_batch_shows_in_every_metric() -> None:
    spread = randn(256, 16, seed=9, dtype=torch.float32)
    identical = torch.full((256, 16), 0.3)
    near_point = 1.0 + 1e-4 * randn(256, 16, seed=10, dtype=torch.float32)
    line = randn(256, 1, seed=11) * randn(1, 16, seed=12)
    assert float(effective_rank(spread)) > 12
    for collapsed in (identical, near_point, line):
        assert float(effective_rank(collapsed)) == pytest.approx(1.0, abs=1e-2)
    assert float(uniformity(spread)) < -2.0
    assert float(uniformity(identical)) == pytest.approx(0.0, abs=1e-6)
    assert float(uniformity(near_point)) > -1e-3
    assert float(dimension_std(spread).mean()) > 0.15  # ≈ 1/√16 on the sphere
    assert float(dimension_std(near_point).mean()) < 1e-3


def test_metrics_have_finite_gradients() -> None:
    x = randn(12, 6, seed=13).requires_grad_()
    y = randn(12, 6, seed=14).requires_grad_()
    (alignment(x, y) + uniformity(x) + dimension_std(y).mean() + effective_rank(x)).backward()  # type: ignore[no-untyped-call]
    for grad in (x.grad, y.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())
