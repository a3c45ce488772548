"""Views over whole documents: independent crops from anywhere in a document, inverse cloze, their mix."""

import random
from collections import Counter

import pytest

from service.models.tokenization import TextTokenizer
from trainer.config import ViewMixConfig, ViewsConfig
from trainer.data.documents import (
    Document,
    batch_views,
    crop_window,
    document_views,
    draw_kind,
    inverse_cloze,
    special_ends,
    tokenize_documents,
)
from trainer.data.sample_text import paragraphs, sentences
from trainer.data.tokenizer import train_wordpiece
from trainer.data.views import make_views

MAX_LENGTH = 48
CAPACITY = MAX_LENGTH - 2  # [CLS] and [SEP]
# A long document of distinct sentences: many times what the model takes.
LONG_TEXT = " ".join(sentences()[:60])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = train_wordpiece([*paragraphs(), *sentences()], 1500, tmp_path_factory.mktemp("tokenizer"))
    return TextTokenizer(path, MAX_LENGTH)


@pytest.fixture(scope="module")
def long_document(tokenizer: TextTokenizer) -> Document:
    (document,) = tokenize_documents([LONG_TEXT], tokenizer)
    assert len(document.body) > 10 * MAX_LENGTH
    return document


def contains(long: list[int], short: list[int]) -> bool:
    return any(long[i : i + len(short)] == short for i in range(len(long) - len(short) + 1))


def inner(ids: list[int]) -> list[int]:
    return ids[1:-1]


def sentence_of(document: Document, query: list[int]) -> list[int]:
    """The sentence of ``document`` a query was drawn from (a query longer than the model is cut)."""
    (sentence,) = {tuple(s) for s in document.sentences if s[:CAPACITY] == inner(query)}
    return list(sentence)


def test_a_document_is_its_whole_text_between_the_tokenizers_ends(tokenizer: TextTokenizer) -> None:
    assert special_ends(tokenizer) == (1, 1)
    texts = [LONG_TEXT, *paragraphs()[:20]]
    documents = tokenize_documents(texts, tokenizer)
    for document, whole in zip(documents, tokenizer.encode(texts, truncate=False), strict=True):
        assert [*document.head, *document.body, *document.tail] == whole
    assert sum(len(document.sentences) >= 2 for document in documents) > len(texts) / 2


def test_crop_windows_come_from_the_whole_document_not_its_prefix(long_document: Document) -> None:
    body, rng = long_document.body, random.Random(0)
    starts = []
    for _ in range(2000):
        window = crop_window(long_document, (0.1, 0.5), CAPACITY, rng)
        assert window[0] == long_document.head[0] and window[-1] == long_document.tail[0]
        assert 1 <= len(inner(window)) <= CAPACITY
        start = next(i for i in range(len(body)) if body[i : i + len(inner(window))] == inner(window))
        starts.append(start / (len(body) - len(inner(window))))
    # Starts are uniform over the document: every tenth of it is drawn, about as often as the others.
    tenths = Counter(min(9, int(position * 10)) for position in starts)
    assert set(tenths) == set(range(10)) and min(tenths.values()) > 120
    assert sum(position * (len(body) - CAPACITY) > MAX_LENGTH for position in starts) > 0.8 * len(starts)


def test_crop_lengths_follow_the_configured_shares_or_token_counts(tokenizer: TextTokenizer) -> None:
    (short,) = tokenize_documents([paragraphs()[0]], tokenizer)
    rng, tokens = random.Random(1), len(short.body)
    lengths = [len(inner(crop_window(short, (0.2, 0.4), 10_000, rng))) for _ in range(500)]
    assert min(lengths) >= round(0.2 * tokens) and max(lengths) <= round(0.4 * tokens)
    counts = [len(inner(crop_window(short, (5, 9), 10_000, rng))) for _ in range(500)]
    assert set(counts) == set(range(5, 10))
    capped = [len(inner(crop_window(short, (0.9, 1.0), 10, rng))) for _ in range(50)]
    assert set(capped) == {10}


def test_the_inverse_cloze_query_is_a_sentence_missing_from_its_context(long_document: Document) -> None:
    rng, queries = random.Random(2), set()
    for _ in range(300):
        query, context = inverse_cloze(long_document, 0.0, CAPACITY, rng)
        sentence = sentence_of(long_document, query)
        assert inner(query) == sentence[:CAPACITY]
        assert not contains(inner(context), sentence)
        assert len(inner(context)) == CAPACITY
        queries.add(tuple(query))
    assert len(queries) > 40  # drawn from the whole document, not its first sentences


def test_with_keep_one_the_sentence_stays_in_its_context(tokenizer: TextTokenizer) -> None:
    (document,) = tokenize_documents([" ".join(sentences()[:3])], tokenizer)
    assert len(document.body) <= 10_000
    for seed in range(20):
        query, context = inverse_cloze(document, 1.0, 10_000, random.Random(seed))
        assert inner(context) == document.body and contains(inner(context), inner(query))


def test_the_context_window_holds_the_place_the_sentence_was_taken_from(long_document: Document) -> None:
    body, rng = long_document.body, random.Random(3)
    for _ in range(200):
        query, context = inverse_cloze(long_document, 0.0, CAPACITY, rng)
        sentence = sentence_of(long_document, query)
        where = next(i for i in range(len(body)) if body[i : i + len(sentence)] == sentence)
        removed = body[:where] + body[where + len(sentence) :]
        start = next(i for i in range(len(removed)) if removed[i : i + CAPACITY] == inner(context))
        assert start <= where <= start + CAPACITY


def test_a_one_sentence_document_cannot_be_a_cloze() -> None:
    with pytest.raises(ValueError, match="two sentences"):
        inverse_cloze(Document([[5, 6, 7]], [101], [102]), 0.1, 10, random.Random(0))


def test_kinds_are_drawn_in_the_configured_proportions() -> None:
    rng = random.Random(4)
    weights = ViewMixConfig(crop=0.3, inverse_cloze=0.7).weights()
    drawn = Counter(draw_kind(weights, rng) for _ in range(10_000))
    assert set(drawn) == {"crop", "inverse_cloze"}
    assert drawn["crop"] / 10_000 == pytest.approx(0.3, abs=0.02)


def test_the_mix_of_views_a_batch_gets_follows_the_weights(tokenizer: TextTokenizer) -> None:
    texts = list(paragraphs()[:400])
    prefixes = tokenizer.encode(texts, truncate=True)
    documents = tokenize_documents(texts, tokenizer)
    config = ViewsConfig(mix=ViewMixConfig(prefix=1.0, inverse_cloze=3.0), inverse_cloze_keep=0.0)
    first, second = batch_views(documents, config, MAX_LENGTH, random.Random(5))
    # A prefix pair is the truncated text twice (no span crop, no deletion); a cloze pair never is.
    prefix_pairs = sum(a == b == prefix for a, b, prefix in zip(first, second, prefixes, strict=True))
    assert prefix_pairs / len(texts) == pytest.approx(0.25, abs=0.06)


@pytest.mark.parametrize(
    "mix", [{"crop": 1.0}, {"inverse_cloze": 1.0}, {"prefix": 1.0, "crop": 1.0, "inverse_cloze": 1.0}]
)
def test_every_view_fits_the_model_and_keeps_the_ends(tokenizer: TextTokenizer, mix: dict[str, float]) -> None:
    texts = [LONG_TEXT, "One short sentence only.", *paragraphs()[:30]]
    config = ViewsConfig(mix=ViewMixConfig(**mix), token_deletion=0.1, span_crop=(0.5, 1.0), crop_length=(8, 200))
    documents = tokenize_documents(texts, tokenizer)
    first, second = batch_views(documents, config, MAX_LENGTH, random.Random(6))
    cls, sep = tokenizer.encode([""], truncate=True)[0]
    for ids in first + second:
        assert 3 <= len(ids) <= MAX_LENGTH and ids[0] == cls and ids[-1] == sep


def test_views_are_deterministic_and_a_restored_generator_draws_the_same(tokenizer: TextTokenizer) -> None:
    documents = tokenize_documents([LONG_TEXT, *paragraphs()[:15]], tokenizer)
    config = ViewsConfig(mix=ViewMixConfig(crop=0.5, inverse_cloze=0.5), token_deletion=0.1)
    assert batch_views(documents, config, MAX_LENGTH, random.Random(7)) == batch_views(
        documents, config, MAX_LENGTH, random.Random(7)
    )
    rng = random.Random(8)
    batch_views(documents, config, MAX_LENGTH, rng)
    saved = rng.getstate()
    uninterrupted = [batch_views(documents, config, MAX_LENGTH, rng) for _ in range(3)]
    restored = random.Random()
    restored.setstate(saved)
    assert [batch_views(documents, config, MAX_LENGTH, restored) for _ in range(3)] == uninterrupted


def test_prefix_views_alone_draw_exactly_what_they_drew_before(tokenizer: TextTokenizer) -> None:
    # Prefixes cut from whole tokenised documents are the texts tokenised with truncation.
    texts = [LONG_TEXT, *paragraphs()[:10]]
    prefixes = tokenizer.encode(texts, truncate=True)
    documents = tokenize_documents(texts, tokenizer)
    config = ViewsConfig(token_deletion=0.2, span_crop=(0.3, 0.9))
    assert batch_views(documents, config, MAX_LENGTH, random.Random(9)) == make_views(
        prefixes, config, random.Random(9)
    )


def test_document_views_need_one_prefix_per_document(long_document: Document) -> None:
    with pytest.raises(ValueError):
        document_views([long_document], [], ViewsConfig(mix=ViewMixConfig(crop=1)), MAX_LENGTH, random.Random(0))
