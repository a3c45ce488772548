"""Contrastive views over whole documents, not only the prefix that fits the model.

Three kinds, mixed per text by ``ViewsConfig.mix``:

- prefix: the document truncated to the model's length, then ``trainer.data.views.view`` (span crop,
  token deletion), as before whole-document views existed;
- crop: two windows drawn independently from anywhere in the untruncated document (independent
  cropping, Contriever, Izacard et al. 2022);
- inverse_cloze: one sentence (or the title line) against the rest of its document around it,
  with the sentence removed from that context unless ``inverse_cloze_keep`` says keep it (ICT,
  Lee et al. 2019). A document of one sentence gets crop views instead.

Token deletion then applies to every view. Every view keeps the tokenizer's special ends and fits
the model's length. Randomness comes only from the ``random.Random`` passed in (seeded by the batch's
place in the run, see trainer.data.loader), so a restored run draws the same views.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from trainer.config import ViewsConfig
from trainer.data.sentences import split_document
from trainer.data.views import delete_tokens, make_views, view


class _Token(Protocol):
    @property
    def special(self) -> bool: ...


class DocumentTokenizer(Protocol):
    """What whole-document views need of a tokenizer; service.models.tokenization.TextTokenizer has it."""

    @property
    def max_seq_length(self) -> int: ...

    def encode(self, texts: list[str], *, truncate: bool) -> list[list[int]]: ...

    def tokens(self, texts: list[str], *, add_special_tokens: bool) -> Sequence[Sequence[_Token]]: ...


@dataclass(frozen=True)
class Document:
    """One whole document as token ids: its sentences' ids (no special tokens), in order, and the special
    ends every view of it carries (``head`` before, ``tail`` after)."""

    sentences: list[list[int]]
    head: list[int]
    tail: list[int]

    @property
    def body(self) -> list[int]:
        return [token for sentence in self.sentences for token in sentence]


def special_ends(tokenizer: DocumentTokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text (1 and 1 for BERT)."""
    probe = tokenizer.tokens(["a"], add_special_tokens=True)[0]
    head = next((i for i, token in enumerate(probe) if not token.special), len(probe))
    tail = next((i for i, token in enumerate(reversed(probe)) if not token.special), 0)
    return head, tail


def tokenize_documents(texts: list[str], tokenizer: DocumentTokenizer) -> list[Document]:
    """Each text whole (never truncated), cut into sentences (trainer.data.sentences) and tokenized
    sentence by sentence, in one batch."""
    head, tail = special_ends(tokenizer)
    units = [split_document(text) for text in texts]
    encoded = iter(tokenizer.encode([unit for doc in units for unit in doc], truncate=False))
    documents = []
    for doc in units:
        ids = [next(encoded) for _ in doc]
        ends = ids[0] if ids else tokenizer.encode([""], truncate=False)[0]
        sentences = [sentence[head : len(sentence) - tail] for sentence in ids]
        documents.append(Document([s for s in sentences if s], ends[:head], ends[len(ends) - tail :]))
    return documents


def window_length(tokens: int, length: tuple[float, float], capacity: int, rng: random.Random) -> int:
    """A window length for a body of ``tokens``: a share of it drawn uniformly from ``length`` when both
    bounds are <= 1, else a whole number of tokens drawn uniformly from it; within [1, min(tokens, capacity)]."""
    low, high = length
    drawn = round(tokens * rng.uniform(low, high)) if high <= 1 else rng.randint(int(low), int(high))
    return max(1, min(tokens, capacity, drawn))


def crop_window(document: Document, length: tuple[float, float], capacity: int, rng: random.Random) -> list[int]:
    """One window of the whole body, its start uniform over every place it fits, between the ends."""
    body = document.body
    if not body:
        return [*document.head, *document.tail]
    size = window_length(len(body), length, capacity, rng)
    start = rng.randrange(len(body) - size + 1)
    return [*document.head, *body[start : start + size], *document.tail]


def inverse_cloze(document: Document, keep: float, capacity: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(query, context): a sentence drawn uniformly, and the other sentences around the place it was, cut to
    ``capacity`` tokens by a window that contains that place; the sentence itself stays in the context with
    probability ``keep``. Needs at least two sentences."""
    if len(document.sentences) < 2:
        raise ValueError("inverse cloze needs a document of at least two sentences")
    chosen = rng.randrange(len(document.sentences))
    sentence = document.sentences[chosen]
    kept = rng.random() < keep
    before = [token for s in document.sentences[:chosen] for token in s]
    after = [token for s in document.sentences[chosen + 1 :] for token in s]
    context = [*before, *(sentence if kept else []), *after]
    place = len(before)
    if len(context) > capacity:
        # Any start in this range gives a window over the place the sentence was taken from.
        start = rng.randint(max(0, place - capacity), min(place, len(context) - capacity))
        context = context[start : start + capacity]
    query = [*document.head, *sentence[:capacity], *document.tail]
    return query, [*document.head, *context, *document.tail]


def draw_kind(weights: dict[str, float], rng: random.Random) -> str:
    """A view kind drawn in proportion to ``weights``; no draw when there is only one."""
    kinds = list(weights)
    if len(kinds) == 1:
        return kinds[0]
    return rng.choices(kinds, weights=[weights[kind] for kind in kinds])[0]


def document_views(
    documents: Sequence[Document],
    prefixes: Sequence[Sequence[int]],
    config: ViewsConfig,
    max_length: int,
    rng: random.Random,
) -> tuple[list[list[int]], list[list[int]]]:
    """Two views of every document, row i of each from document i, each of a kind drawn from ``config.mix``;
    ``prefixes`` are the documents' ids truncated to ``max_length`` (for prefix views)."""
    first, second = [], []
    for document, prefix in zip(documents, prefixes, strict=True):
        capacity = max(1, max_length - len(document.head) - len(document.tail))
        kind = draw_kind(config.mix.weights(), rng)
        if kind == "prefix":
            a, b = view(prefix, config, rng), view(prefix, config, rng)
        elif kind == "inverse_cloze" and len(document.sentences) >= 2:
            a, b = inverse_cloze(document, config.inverse_cloze_keep, capacity, rng)
        else:
            a = crop_window(document, config.crop_length, capacity, rng)
            b = crop_window(document, config.crop_length, capacity, rng)
        if kind != "prefix" and config.token_deletion > 0:
            a, b = delete_tokens(a, config.token_deletion, rng), delete_tokens(b, config.token_deletion, rng)
        first.append(a)
        second.append(b)
    return first, second


def prefix(document: Document, max_length: int) -> list[int]:
    """The document truncated to ``max_length`` tokens, ends included: what the tokenizer gives for its text
    with truncation on (a WordPiece body is the concatenation of its sentences' pieces)."""
    capacity = max(0, max_length - len(document.head) - len(document.tail))
    return [*document.head, *document.body[:capacity], *document.tail]


def batch_views(
    documents: Sequence[Document], config: ViewsConfig, max_length: int, rng: random.Random
) -> tuple[list[list[int]], list[list[int]]]:
    """Two views of every document under ``config`` (see document_views). With prefix views only, exactly
    trainer.data.views.make_views of the documents' prefixes (the same draws)."""
    prefixes = [prefix(document, max_length) for document in documents]
    if set(config.mix.weights()) == {"prefix"}:
        return make_views(prefixes, config, rng)
    return document_views(documents, prefixes, config, max_length, rng)
