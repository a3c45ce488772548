"""Evaluation of an encoder: representation quality, and retrieval when labeled pairs are given.

Every evaluation names one primary metric (what an export gate reads): ``mrr@10`` when a labeled
set of (query, relevant document) pairs is given, else ``neg_uniformity`` (−uniformity: how well the
embeddings spread over the sphere; a collapsed encoder scores ≈ 0).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.losses import alignment, effective_rank, uniformity

EmbedFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class LabeledPair:
    query: str
    document: str


@dataclass(frozen=True)
class EvaluationResult:
    primary_metric: str
    metrics: dict[str, float]

    @property
    def primary(self) -> float:
        return self.metrics[self.primary_metric]


def load_pairs(path: Path) -> list[LabeledPair]:
    """Labeled JSONL: one {"query": ..., "document": ...} per line."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append(LabeledPair(query=str(record["query"]), document=str(record["document"])))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'query' and 'document' ({error})") from None
    return pairs


def representation_metrics(vectors: np.ndarray, positives: np.ndarray | None = None) -> dict[str, float]:
    """Uniformity, effective rank and mean per-dimension std of unit ``vectors``; alignment with
    ``positives`` (a second view of the same texts) when given (Wang & Isola 2020)."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    metrics = {
        "uniformity": float(uniformity(x)),
        "neg_uniformity": -float(uniformity(x)),
        "effective_rank": float(effective_rank(x)),
        "mean_dimension_std": float(x.std(dim=0).mean()),
    }
    if positives is not None:
        metrics["alignment"] = float(alignment(x, torch.from_numpy(np.ascontiguousarray(positives, dtype=np.float32))))
    return metrics


def retrieval_metrics(embed: EmbedFn, pairs: list[LabeledPair], k: int = 10) -> dict[str, float]:
    """recall@k and MRR@k of each query against every document of the set (its own is the relevant one)."""
    documents = list(dict.fromkeys(pair.document for pair in pairs))
    index = {document: position for position, document in enumerate(documents)}
    query_vectors = embed([pair.query for pair in pairs])
    document_vectors = embed(documents)
    scores = query_vectors @ document_vectors.T
    relevant = np.array([index[pair.document] for pair in pairs])
    relevant_scores = scores[np.arange(len(pairs)), relevant]
    ranks = (scores > relevant_scores[:, None]).sum(axis=1)  # 0 = ranked first
    hit = ranks < k
    return {
        f"recall@{k}": float(hit.mean()),
        f"mrr@{k}": float(np.where(hit, 1.0 / (ranks + 1), 0.0).mean()),
        "queries": float(len(pairs)),
        "documents": float(len(documents)),
    }


def evaluate(embed: EmbedFn, texts: list[str], pairs: list[LabeledPair] | None = None) -> EvaluationResult:
    """Representation metrics on ``texts``, plus retrieval metrics (and MRR@10 as primary) given ``pairs``."""
    metrics = representation_metrics(embed(texts))
    if pairs:
        metrics.update(retrieval_metrics(embed, pairs))
        return EvaluationResult("mrr@10", metrics)
    return EvaluationResult("neg_uniformity", metrics)
