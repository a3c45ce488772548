"""Self-supervised losses and representation metrics: pure functions of embeddings or logits.

Each is tested against a slow, obviously-correct reference in tests/trainer/test_losses.py. How the
losses are weighted against each other is the training loop's business.
"""

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # the label of positions masked_lm_loss skips (also torch's cross_entropy default)


def _check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"expected two [B, D] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    negative_mask: torch.Tensor | None = None,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives (SimCLR, Chen et al. 2020; SimCSE, Gao et al. 2021).

    ``a``, ``b``: [B, D], row i of each a view of text i; both are L2-normalised here. Logits are
    cosine similarities / ``temperature``. For anchor a_i the positive is b_i and the negatives are
    the other B − 1 rows of ``b`` — cross-view only, as in SimCSE; SimCLR's NT-Xent would also use
    the same-view rows a_j. The loss is the mean of the a→b and b→a cross-entropies (SimCSE itself
    uses a→b only). Returns a scalar; 0 for B = 1, where there is no negative.

    ``candidates``: (all_a, all_b), [N, D] each, the views of a larger batch (every rank's) whose rows
    ``offset`` … ``offset`` + B − 1 are ``a`` and ``b``; a_i then scores against all N rows of all_b.
    ``negative_mask``: [B, N] bool (N = B without candidates), True where column j is no negative of
    row i (a false negative): its logit is dropped from the denominator. Never True at the positive.
    """
    _check_pairs(a, b)
    all_a, all_b = candidates if candidates is not None else (a, b)
    _check_pairs(all_a, all_b)
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    all_a, all_b = F.normalize(all_a, dim=1), F.normalize(all_b, dim=1)
    a_to_b = a @ all_b.T / temperature
    b_to_a = b @ all_a.T / temperature
    if negative_mask is not None:
        a_to_b = a_to_b.masked_fill(negative_mask, float("-inf"))
        b_to_a = b_to_a.masked_fill(negative_mask, float("-inf"))
    targets = torch.arange(a.shape[0], device=a.device) + offset
    return (F.cross_entropy(a_to_b, targets) + F.cross_entropy(b_to_a, targets)) / 2


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions (BERT, Devlin et al. 2019).

    ``logits``: [..., V], e.g. [B, T, V], or [N, V] for the N masked rows alone (the MLM head's
    output); ``labels``: the same leading shape, the original token id at masked positions and -100
    elsewhere. With no masked position the loss is 0 — still attached to the graph, so backward works
    and gives zero gradients — never NaN. No device-to-host sync: the count stays a tensor.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)


def alignment(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Mean ‖a_i − b_i‖^alpha over positive pairs, rows L2-normalised first (Wang & Isola 2020).

    ``a``, ``b``: [B, D], row i of each a view of the same text. Lower is better: 0 when every pair
    maps to the same point; at most 2^alpha.
    """
    _check_pairs(a, b)
    distances: torch.Tensor = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1)
    return distances.pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log of the mean of exp(−t‖x_i − x_j‖²) over pairs i < j, rows L2-normalised first
    (Wang & Isola 2020).

    ``x``: [N, D], N ≥ 2. Lower is better (spread over the sphere); 0, its maximum, when every row
    is the same point (collapse).
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs [N, D] with N >= 2, got {tuple(x.shape)}")
    x = F.normalize(x, dim=1)
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """exp of the Shannon entropy of the singular values of ``x`` normalised to sum 1
    (Roy & Vetterli 2007; RankMe, Garrido et al. 2023).

    ``x``: [N, D], as given (not centred), so a batch whose rows are all one vector has rank 1.
    Ranges from 1 (rows on one line) to min(N, D) (energy spread evenly over that many
    directions). Computed in float64; returns a float64 scalar, 1 for an all-zero ``x``.
    """
    if x.dim() != 2:
        raise ValueError(f"effective_rank needs [N, D], got {tuple(x.shape)}")
    singular = torch.linalg.svdvals(x.to(torch.float64))
    # Clamping instead of branching on zeros keeps the result on the device and the gradient
    # finite; a zero singular value adds 0 · log(tiny) = 0 to the entropy.
    tiny = torch.finfo(torch.float64).tiny
    p = singular / singular.sum().clamp(min=tiny)
    return torch.exp(-(p * p.clamp(min=tiny).log()).sum())


def dimension_std(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation over the batch of each dimension of the L2-normalised rows of ``x``
    (the collapse indicator of SimSiam, Chen & He 2021).

    ``x``: [N, D], N ≥ 2; returns [D] (unbiased, N − 1 in the denominator). About 1/√D per
    dimension for embeddings spread over the sphere; 0 when every row is the same vector.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"dimension_std needs [N, D] with N >= 2, got {tuple(x.shape)}")
    return F.normalize(x, dim=1).std(dim=0)
