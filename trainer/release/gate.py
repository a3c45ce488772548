"""The export gate: does the candidate beat its parent on the dev set?

One scoring function for both: every query ranked against every target of the dev set, its reciprocal rank
within the top 10 (0 beyond) and whether its document is there (recall@10). Both models are scored through
ONNX Runtime on the CPU, as the gateway runs them: the parent exists only as an exported graph, so the
candidate is traced to a temporary ONNX file first (candidate_embedder) and no difference of runtime enters a
comparison of small differences.

The decision is a paired bootstrap over the queries (Efron & Tibshirani 1993; for retrieval, Sakai 2006):
``resamples`` times, draw as many queries as the set holds with replacement and take the mean of the
per-query differences (candidate − parent); the 2.5th and 97.5th percentiles of those means are the 95 %
interval of the MRR@10 difference. The candidate passes when the interval's lower bound is above
``min_delta`` (0 for export: better than the parent, not merely not worse).
"""

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.models.manifest import GateRecord, read_manifest
from service.models.store import ONNX_FILE
from service.models.tokenization import TOKENIZER_FILE, TextTokenizer
from trainer.config import ExportGateConfig
from trainer.encoder import SentenceEncoder, load_base
from trainer.release.dev_set import DevSet
from trainer.release.evaluate import EmbedFn
from trainer.release.export import embed_with_onnx, write_onnx
from trainer.run_inputs import resolve_base

CONFIDENCE = 0.95
K = 10
MIN_QUERIES = 2


@dataclass(frozen=True)
class Scores:
    reciprocal_ranks: np.ndarray  # per query, 1/rank of its document when ranked within K, else 0
    hits: np.ndarray  # per query, whether its document is ranked within K

    def summary(self) -> dict[str, float]:
        return {f"mrr@{K}": float(self.reciprocal_ranks.mean()), f"recall@{K}": float(self.hits.mean())}


def score(embed: EmbedFn, dev_set: DevSet) -> Scores:
    """Rank every target for every query of ``dev_set`` by cosine (unit vectors: dot product); a tie with
    another target counts in the relevant one's favour, as in trainer.release.evaluate.retrieval_metrics."""
    queries, targets = embed(dev_set.queries), embed(dev_set.targets)
    scores = queries @ targets.T
    relevant = np.asarray(dev_set.relevant)
    relevant_scores = scores[np.arange(len(relevant)), relevant]
    ranks = (scores > relevant_scores[:, None]).sum(axis=1)  # 0 = ranked first
    hits = ranks < K
    return Scores(np.where(hits, 1.0 / (ranks + 1), 0.0), hits)


def paired_bootstrap(
    candidate: np.ndarray, parent: np.ndarray, resamples: int, seed: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The percentile-bootstrap ``confidence`` interval of mean(candidate − parent) over paired queries."""
    differences = np.asarray(candidate, dtype=np.float64) - np.asarray(parent, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // max(1, len(differences)))  # bounded memory: ~32 MB of indices at a time
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = rng.integers(0, len(differences), size=(rows, len(differences)))
        means[start : start + rows] = differences[picks].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def judge(
    candidate: EmbedFn,
    parent: EmbedFn,
    parent_name: str,
    dev_set: DevSet,
    config: ExportGateConfig,
    min_delta: float = 0.0,
) -> GateRecord:
    """Score both with the same function on the same dev set and decide: passed when the lower bound of the
    interval of the MRR@10 difference is above ``min_delta``. A dev set of fewer than MIN_QUERIES queries
    compares nothing: refused, without scores."""
    if len(dev_set.queries) < MIN_QUERIES:
        return GateRecord(decision="refused", parent=parent_name, dev_set=dev_set.record(), min_delta=min_delta)
    ours, theirs = score(candidate, dev_set), score(parent, dev_set)
    low, high = paired_bootstrap(ours.reciprocal_ranks, theirs.reciprocal_ranks, config.resamples, config.seed)
    return GateRecord(
        decision="passed" if low > min_delta else "refused",
        parent=parent_name,
        dev_set=dev_set.record(),
        candidate=ours.summary(),
        parent_scores=theirs.summary(),
        difference=float(ours.reciprocal_ranks.mean() - theirs.reciprocal_ranks.mean()),
        interval=(low, high),
        confidence=CONFIDENCE,
        resamples=config.resamples,
        seed=config.seed,
        min_delta=min_delta,
    )


def failed_check(gate: GateRecord) -> str:
    """A refused gate in one line: the scores and the interval's lower bound against what it had to exceed."""
    assert gate.dev_set is not None
    if gate.interval is None or gate.parent_scores is None:
        return (
            f"mrr@10 not compared with {gate.parent}: the {gate.dev_set.source} dev set has {gate.dev_set.queries} "
            f"pair(s), fewer than {MIN_QUERIES}"
        )
    return (
        f"mrr@10 {gate.candidate['mrr@10']:.4f} vs {gate.parent} {gate.parent_scores['mrr@10']:.4f}: the lower bound "
        f"of the {gate.confidence:.0%} interval of the difference, {gate.interval[0]:+.4f}, is not above "
        f"{gate.min_delta:g}"
    )


def refusal(gate: GateRecord) -> str:
    """Why the gate refused, with its numbers, and how to proceed."""
    assert gate.dev_set is not None
    if gate.interval is None or gate.parent_scores is None:
        return (
            f"evaluation gate: {failed_check(gate)}. Nothing was exported. To proceed: give export.eval_file "
            "(labeled pairs), hold out more documents of several sentences (corpus.validation_fraction), or "
            "export anyway with --force (the manifest records forced: true)."
        )
    low, high = gate.interval
    return (
        f"evaluation gate: the candidate does not beat {gate.parent} on the {gate.dev_set.source} dev set "
        f"({gate.dev_set.queries} queries): MRR@10 {gate.candidate['mrr@10']:.4f} vs "
        f"{gate.parent_scores['mrr@10']:.4f}, difference {gate.difference:+.4f}, {gate.confidence:.0%} interval "
        f"[{low:+.4f}, {high:+.4f}] (its lower bound must be > {gate.min_delta:g}). Nothing was exported. To "
        "proceed: train longer (more optim.max_steps) or with a lower optim.learning_rate, check the corpus, or "
        "export anyway with --force (the manifest records forced: true)."
    )


@contextlib.contextmanager
def candidate_embedder(encoder: SentenceEncoder, tokenizer_dir: Path) -> Iterator[EmbedFn]:
    """``encoder`` as an embedding function through ONNX Runtime (traced to a temporary file)."""
    tokenizer = TextTokenizer(tokenizer_dir / TOKENIZER_FILE, encoder.max_seq_length)
    with tempfile.TemporaryDirectory(prefix="gate-") as folder:
        path = Path(folder) / ONNX_FILE
        write_onnx(encoder.eval().cpu(), path)
        yield lambda texts: embed_with_onnx(path, tokenizer, texts)


def version_embedder(version_dir: Path) -> EmbedFn:
    """An exported version as an embedding function, as the gateway runs it."""
    manifest = read_manifest(version_dir)
    tokenizer = TextTokenizer(version_dir / TOKENIZER_FILE, manifest.max_seq_length)
    return lambda texts: embed_with_onnx(version_dir / ONNX_FILE, tokenizer, texts)


@contextlib.contextmanager
def base_embedder(base_model: str) -> Iterator[EmbedFn]:
    """The run's base model as it would be served (its own token limit), through the same path."""
    folder = resolve_base(base_model)
    with candidate_embedder(load_base(folder), folder.path) as embed:
        yield embed
