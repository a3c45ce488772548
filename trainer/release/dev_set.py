"""The export gate's dev set: queries, the documents they are ranked against, and which one is relevant.

Self-supervised (no labels): cut from held-out corpus documents, the corpus's validation split, which
training never reads. Each document of at least two units (sentences, or a title line and sentences:
trainer.data.sentences) gives one pair: one sentence chosen with a seeded random generator is the query,
the rest of the document, in order, is its relevant document; every other pair's document is a
distractor. An inverse-cloze task on documents nobody trained on: an encoder that retrieves the document
a sentence was cut from represents what the corpus is about. At most ``size`` pairs, chosen with the same
seed, so a corpus and a seed always give the same set — the same for the parent and the candidate.

Labeled: the pairs of ``export.eval_file`` (trainer.release.evaluate.load_pairs), every distinct
document of the file a target.
"""

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Literal

from service.models.manifest import DevSetRecord
from trainer.data.sentences import split_document
from trainer.release.evaluate import LabeledPair

# A query sentence of fewer words ("Yes.", "See below.") says nothing about its document.
MIN_QUERY_WORDS = 4
# Held-out documents the dev set is drawn from, read into memory (the validation split of a big corpus is big).
HELD_OUT_DOCUMENTS = 20_000


@dataclass(frozen=True)
class DevSet:
    queries: list[str]
    targets: list[str]
    relevant: list[int]  # per query, the index of its document in targets
    source: Literal["self-supervised", "eval_file"]
    seed: int | None = None

    @property
    def sha256(self) -> str:
        content = json.dumps([self.queries, self.targets, self.relevant], ensure_ascii=False)
        return hashlib.sha256(content.encode()).hexdigest()

    def record(self) -> DevSetRecord:
        return DevSetRecord(
            source=self.source, queries=len(self.queries), targets=len(self.targets), sha256=self.sha256, seed=self.seed
        )


def query_and_rest(text: str, rng: random.Random) -> tuple[str, str] | None:
    """One unit of ``text`` (of MIN_QUERY_WORDS words or more) and the other units joined; None for a
    document of one unit, or without such a unit."""
    units = split_document(text)
    if len(units) < 2:
        return None
    eligible = [i for i, unit in enumerate(units) if len(unit.split()) >= MIN_QUERY_WORDS]
    if not eligible:
        return None
    chosen = rng.choice(eligible)
    return units[chosen], " ".join(units[:chosen] + units[chosen + 1 :])


def self_supervised_dev_set(held_out: Iterable[str], size: int, seed: int) -> DevSet:
    """Up to ``size`` (sentence → rest of its document) pairs from ``held_out`` documents (never trained on).

    Documents are drawn in a seeded random order among the first HELD_OUT_DOCUMENTS (not simply the first
    ones: held-out documents often come grouped by source), each kept when it has a query sentence; the query
    is chosen with the same generator."""
    documents = list(islice(held_out, HELD_OUT_DOCUMENTS))
    rng = random.Random(seed)
    order = list(range(len(documents)))
    rng.shuffle(order)
    queries: list[str] = []
    targets: list[str] = []
    for index in order:
        if len(queries) == size:
            break
        pair = query_and_rest(documents[index], rng)
        if pair is not None:
            queries.append(pair[0])
            targets.append(pair[1])
    return DevSet(queries, targets, list(range(len(queries))), "self-supervised", seed)


def labeled_dev_set(pairs: list[LabeledPair]) -> DevSet:
    """The labeled pairs as a dev set: every distinct document a target (as retrieval_metrics ranks them)."""
    targets = list(dict.fromkeys(pair.document for pair in pairs))
    index = {document: position for position, document in enumerate(targets)}
    return DevSet([pair.query for pair in pairs], targets, [index[pair.document] for pair in pairs], "eval_file")
