"""Collapse watch: a run whose embeddings stop carrying information is stopped with an explanation."""

import torch

from trainer.config import MonitorConfig
from trainer.losses import alignment, effective_rank, uniformity


class CollapseDetected(Exception):
    pass


def check_collapse(vectors: torch.Tensor, twins: torch.Tensor, config: MonitorConfig) -> dict[str, float]:
    """Per-dimension std, effective rank, alignment and uniformity of validation embeddings.

    ``twins`` are second views (another dropout pass) of the same texts. Raises CollapseDetected
    when the embeddings have collapsed to (nearly) one point or a low-dimensional subspace."""
    report = {
        "mean_dimension_std": float(vectors.std(dim=0).mean()),
        "effective_rank": float(effective_rank(vectors)),
        "alignment": float(alignment(vectors, twins)),
        "uniformity": float(uniformity(vectors)),
    }
    if report["mean_dimension_std"] < config.min_dimension_std:
        raise CollapseDetected(
            f"embeddings collapsed: mean per-dimension std {report['mean_dimension_std']:.2e} < "
            f"{config.min_dimension_std:.0e} (every text maps to nearly the same vector; uniformity "
            f"{report['uniformity']:.3f}). Lower the learning rate, raise the temperature, or check the data."
        )
    if report["effective_rank"] < config.min_effective_rank:
        raise CollapseDetected(
            f"embeddings collapsed to a low-dimensional subspace: effective rank {report['effective_rank']:.2f} < "
            f"{config.min_effective_rank}. Lower the learning rate or add contrastive weight."
        )
    return report
