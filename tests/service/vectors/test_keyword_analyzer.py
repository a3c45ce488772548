"""The keyword leg on real Milvus Lite against a plain Python BM25 (loadtests/bm25.py) on the same texts: a new
collection's analyser (lower case, English stop words, k1 1.2, b 0.75) ranks and scores as the reference does; a
collection from before keeps Milvus's default analyser, which keeps stop words (and, on Lite, k1 1.5)."""

import random
from pathlib import Path

import pytest

from loadtests.bm25 import Bm25, word_tokens
from service.models.store import ModelStore
from service.vectors.keywords import BM25_B, BM25_K1, ENGLISH_STOP_WORDS
from service.vectors.protocol import ItemIn, SearchRequest
from service.vectors.store import VectorStore
from tests.service.vectors.test_store import TableEncoder, open_store
from trainer.data.sample_text import sentences

TEXTS = list(sentences()[:600])
LITE_DEFAULT_K1 = 1.5  # milvus_lite's SparseInvertedIndex, when the index names none


def queries() -> list[str]:
    """Words of the texts, stop words and capitals among them, two to five at a time."""
    rng = random.Random(3)
    words = [word for text in TEXTS for word in text.split()]
    chosen = [" ".join(rng.sample(words, rng.randint(2, 5))) for _ in range(60)]
    return [*chosen, "The history of the", "AssertionError", "is it to be or not to be", "optimization"]


async def keyword_hits(store: VectorStore, name: str, query: str) -> list[tuple[str, float]]:
    hits, _ = await store.search(name, SearchRequest(query=query, mode="keyword", top_k=10, output_fields=[]))
    return [(hit.id, hit.score) for hit in hits]


def assert_matches(hits: list[tuple[str, float]], reference: list[tuple[int, float]], query: str) -> None:
    """Same scores, place by place; the same ids wherever a score is not tied with its neighbour's."""
    assert len(hits) == len(reference), query
    for place, ((item, score), (index, expected)) in enumerate(zip(hits, reference, strict=True)):
        assert score == pytest.approx(expected, rel=1e-5), (query, place)
        tied = any(
            abs(other - expected) <= 1e-5 * expected
            for other_place, (_, other) in enumerate(reference)
            if other_place != place
        )
        if not tied:
            assert item == f"t{index:04d}", (query, place)


@pytest.fixture(scope="module")
def models(model_repository: Path) -> ModelStore:
    return ModelStore.scan(model_repository)


async def filled(store: VectorStore, name: str) -> None:
    await store.create(name, "tiny@1", {})
    await store.upsert(name, [ItemIn(id=f"t{i:04d}", text=text) for i, text in enumerate(TEXTS)])
    # One segment: Milvus Lite keeps BM25 statistics per segment (see the README), the reference over all texts.
    await store._milvus.call("flush", (await store._catalog.get(name)).active.name)


async def test_new_collections_rank_as_bm25_with_english_stop_words(models: ModelStore, tmp_path: Path) -> None:
    reference = Bm25(TEXTS, word_tokens(ENGLISH_STOP_WORDS), k1=BM25_K1, b=BM25_B)
    async with open_store(tmp_path / "milvus.db", TableEncoder(models)) as store:
        await filled(store, "english")
        assert (await store.describe("english")).keyword_analyzer == "english_stop"
        for query in queries():
            assert_matches(await keyword_hits(store, "english", query), reference.top(query, 10), query)
        # Stop words alone match nothing; case does not matter.
        assert await keyword_hits(store, "english", "the of and to") == []
        assert await keyword_hits(store, "english", "ASSERTIONERROR") == await keyword_hits(
            store, "english", "assertionerror"
        )


async def test_collections_from_before_keep_milvus_default_analyser(models: ModelStore, tmp_path: Path) -> None:
    plain = Bm25(TEXTS, word_tokens(), k1=LITE_DEFAULT_K1, b=BM25_B)
    stopped = Bm25(TEXTS, word_tokens(ENGLISH_STOP_WORDS), k1=BM25_K1, b=BM25_B)
    async with open_store(tmp_path / "milvus.db", TableEncoder(models), keyword_analyzer="standard") as store:
        await filled(store, "legacy")
        assert (await store.describe("legacy")).keyword_analyzer == "standard"
        differs = 0
        for query in queries():
            hits = await keyword_hits(store, "legacy", query)
            assert_matches(hits, plain.top(query, 10), query)
            differs += [item for item, _ in hits] != [f"t{i:04d}" for i, _ in stopped.top(query, 10)]
        assert differs >= 10  # the two analysers do rank differently
        assert await keyword_hits(store, "legacy", "the of and to") != []
