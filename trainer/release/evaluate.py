"""Evaluation of an encoder: representation quality, and retrieval when labeled pairs are given.

Every evaluation names one primary metric (what an export gate reads): ``mrr@10`` when a labeled
set of (query, relevant document) pairs is given, else ``neg_uniformity`` (−uniformity: how well the
embeddings spread over the sphere; a collapsed encoder scores ≈ 0).

Alignment (Wang & Isola 2020; lower is better) is measured over positive pairs: two views of each
text drawn with the trainer's own augmentations (span crop, then token deletion) from a fixed seed,
so the same encoder always scores the same, in torch or ONNX; and, given labeled pairs, over
(query, relevant document) pairs as ``pair_alignment``.
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import ViewsConfig
from trainer.data.views import make_views
from trainer.losses import alignment, effective_rank, uniformity

# Fixed, not the run's own views: alignment must compare encoders trained with different settings.
EVALUATION_VIEWS = ViewsConfig(token_deletion=0.1, span_crop=(0.6, 1.0))
VIEWS_SEED = 0

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
    """Labeled JSONL: one {"query": ..., "document": ...} per line (blank lines skipped).

    ValueError names the file and line of a record that is not such an object with two strings, and
    the file when it holds no pair at all (retrieval metrics would otherwise silently be missing)."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            query, document = record["query"], record["document"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'query' and 'document' ({error})") from None
        if not (isinstance(query, str) and isinstance(document, str)):
            raise ValueError(f"{path}:{number}: 'query' and 'document' must be strings")
        pairs.append(LabeledPair(query=query, document=document))
    if not pairs:
        raise ValueError(f"{path}: no (query, document) pairs")
    return pairs


def text_views(
    texts: list[str], config: ViewsConfig = EVALUATION_VIEWS, seed: int = VIEWS_SEED
) -> tuple[list[str], list[str]]:
    """Two views of each text (first views, second views), the same for the same texts on every call.

    The views are drawn by trainer.data.views over each text's words rather than its token ids, so any
    embedding function of texts (torch, ONNX) can be evaluated with them."""
    words = [text.split() for text in texts]
    positions = [list(range(len(w))) for w in words]
    first, second = make_views(positions, config, random.Random(seed), special_ids=())
    return (
        [" ".join(w[i] for i in kept) for w, kept in zip(words, first, strict=True)],
        [" ".join(w[i] for i in kept) for w, kept in zip(words, second, strict=True)],
    )


def _alignment(a: np.ndarray, b: np.ndarray) -> float:
    return float(alignment(torch.from_numpy(np.asarray(a, np.float32)), torch.from_numpy(np.asarray(b, np.float32))))


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
        metrics["alignment"] = _alignment(vectors, positives)
    return metrics


def retrieval_metrics(embed: EmbedFn, pairs: list[LabeledPair], k: int = 10) -> dict[str, float]:
    """recall@k and MRR@k of each query against every distinct document of the set (its own is the
    relevant one; a tie with another document counts in the relevant one's favour), and
    ``pair_alignment`` over the (query, relevant document) pairs."""
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
        "pair_alignment": _alignment(query_vectors, document_vectors[relevant]),
        "queries": float(len(pairs)),
        "documents": float(len(documents)),
    }


def evaluate(embed: EmbedFn, texts: list[str], pairs: list[LabeledPair] | None = None) -> EvaluationResult:
    """Representation metrics on ``texts`` (alignment over two views of each, see text_views), plus
    retrieval metrics and pair alignment (and MRR@10 as primary) given ``pairs``."""
    first, second = text_views(texts)
    metrics = representation_metrics(embed(texts))
    metrics["alignment"] = _alignment(embed(first), embed(second))
    if pairs:
        metrics.update(retrieval_metrics(embed, pairs))
        return EvaluationResult("mrr@10", metrics)
    return EvaluationResult("neg_uniformity", metrics)
