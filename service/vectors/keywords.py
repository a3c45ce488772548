"""How collections analyse their text for keyword (BM25) search.

A collection's analyser is part of its Milvus schema, fixed when its physical collection is created; the catalog
records its name (``Physical.keyword_analyzer``). New collections get ``EMBEDSERVE_KEYWORD_ANALYZER``.

- ``english_stop`` (the default): Milvus's standard tokenizer, lower case, and Lucene's English stop words (Milvus's
  ``_english_`` list, written out because Milvus Lite takes stop words only as a list); BM25 with k1 = 1.2 and
  b = 0.75, written out because Milvus Lite's own k1 is 1.5 where Milvus's is 1.2.
- ``standard``: what collections created before the choice existed have: Milvus's default analyser (standard
  tokenizer, lower case) and the engine's own BM25 parameters.

No stemming: Milvus Lite has no stemmer (it ignores the filter), and on the man-page set of ``make bench-search`` an
English (Porter2) stemmer lowered keyword MRR@10 (README, "Keyword analyser").
"""

from typing import Any, Literal

KeywordAnalyzer = Literal["english_stop", "standard"]  # as service.settings.Settings.keyword_analyzer

LEGACY_ANALYZER: KeywordAnalyzer = "standard"

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET, Milvus's "_english_".
ENGLISH_STOP_WORDS = (
    *("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not"),
    *("of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was"),
    *("will", "with"),
)

BM25_K1 = 1.2
BM25_B = 0.75


def analyzer_params(analyzer: KeywordAnalyzer) -> dict[str, Any] | None:
    """The text field's ``analyzer_params`` (None: Milvus's default analyser)."""
    if analyzer == "standard":
        return None
    return {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": list(ENGLISH_STOP_WORDS)}]}


def bm25_index_params(analyzer: KeywordAnalyzer) -> dict[str, float]:
    """The BM25 index's parameters (empty: the engine's defaults)."""
    if analyzer == "standard":
        return {}
    return {"bm25_k1": BM25_K1, "bm25_b": BM25_B}
