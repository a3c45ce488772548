"""A plain BM25 over a fixed set of texts: the reference the keyword leg's analyser is checked against
(``tests/service/vectors/test_keyword_analyzer.py``) and measured beside (``make bench-search``).

score(q, d) = Σ over q's terms t (repeats counted) of
    idf(t) · tf(t, d) · (k1 + 1) / (tf(t, d) + k1 · (1 - b + b · |d| / avgdl)),
idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) — Lucene's form, the one Milvus documents — with statistics over
every text (one index, not per segment). Ties go to the earlier text.
"""

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

Tokenizer = Callable[[str], list[str]]
WORD = re.compile(r"\w+")


def word_tokens(stop_words: Iterable[str] = (), stem: Callable[[list[str]], list[str]] | None = None) -> Tokenizer:
    """Lower-cased ``\\w+`` runs (Milvus Lite's standard tokenizer), less ``stop_words``, then ``stem``med."""
    stopped = frozenset(stop_words)

    def tokens(text: str) -> list[str]:
        words = [word for word in WORD.findall(text.lower()) if word not in stopped]
        return stem(words) if stem is not None else words

    return tokens


class Bm25:
    """BM25 over ``texts`` (their index in the sequence is their id)."""

    def __init__(self, texts: Sequence[str], tokens: Tokenizer, k1: float = 1.2, b: float = 0.75) -> None:
        self.tokens = tokens
        self.k1 = k1
        self.b = b
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lengths: list[int] = []
        for index, text in enumerate(texts):
            counts = Counter(tokens(text))
            self.lengths.append(sum(counts.values()))
            for term, count in counts.items():
                self.postings[term].append((index, count))
        self.average_length = sum(self.lengths) / len(self.lengths) if self.lengths else 0.0

    def idf(self, term: str) -> float:
        df = len(self.postings.get(term, ()))
        return math.log(1.0 + (len(self.lengths) - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> dict[int, float]:
        """Every text holding a query term, with its score."""
        scores: dict[int, float] = defaultdict(float)
        for term, repeats in Counter(self.tokens(query)).items():
            idf = self.idf(term)
            for index, tf in self.postings.get(term, ()):
                norm = self.k1 * (1.0 - self.b + self.b * self.lengths[index] / self.average_length)
                scores[index] += repeats * idf * tf * (self.k1 + 1.0) / (tf + norm)
        return dict(scores)

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best (text index, score), best first."""
        return sorted(self.scores(query).items(), key=lambda pair: (-pair[1], pair[0]))[:k]
