"""A WordPiece vocabulary learnt by byte-pair-style merges, deterministically: the same texts give the same
vocabulary, ids included, in every process.

``tokenizers``' own WordPieceTrainer does not: it numbers the ``##`` continuation pieces in the order its
hash map yields the words, and merges of equal count are ranked by those numbers, so two runs on the same
corpus learn different vocabularies (seen: a test's loss moved past its bound between two runs). Here the
pieces are numbered in sorted order and ties go to the lower ids, as the library does once the ids are
fixed.
"""

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise

from tokenizers import normalizers, pre_tokenizers

PREFIX = "##"

Pair = tuple[int, int]


def count_words(
    texts: Iterable[str], normalizer: normalizers.Normalizer, pre_tokenizer: pre_tokenizers.PreTokenizer
) -> Counter[str]:
    """How often each word occurs in ``texts``, words as the tokenizer's normalizer and pre-tokenizer cut them."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def learn_vocabulary(
    word_counts: Counter[str], vocab_size: int, special_tokens: list[str], min_frequency: int
) -> dict[str, int]:
    """A WordPiece vocabulary of at most ``vocab_size`` entries (never fewer than the special tokens and every
    character seen): the special tokens, each character as a word start and as a ``##`` continuation, then
    the merge of the most frequent adjacent pair, again and again, while a pair occurs ``min_frequency`` times."""
    vocabulary: dict[str, int] = {}
    pieces: list[str] = []

    def piece_id(piece: str) -> int:
        if piece not in vocabulary:
            vocabulary[piece] = len(pieces)
            pieces.append(piece)
        return vocabulary[piece]

    for token in special_tokens:
        piece_id(token)
    ordered_words = sorted(word_counts)
    for character in sorted({character for word in ordered_words for character in word}):
        piece_id(character)
    for character in sorted({character for word in ordered_words for character in word[1:]}):
        piece_id(PREFIX + character)

    words = [[piece_id(word[0]), *(piece_id(PREFIX + character) for character in word[1:])] for word in ordered_words]
    counts = [word_counts[word] for word in ordered_words]
    pair_counts: defaultdict[Pair, int] = defaultdict(int)
    pair_words: defaultdict[Pair, set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in pairwise(symbols):
            pair_counts[pair] += counts[index]
            pair_words[pair].add(index)
    queue = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(queue)

    while len(vocabulary) < vocab_size and queue:
        negative_count, pair = heapq.heappop(queue)
        if -negative_count != pair_counts.get(pair, 0):
            continue  # a stale entry: the pair's count changed since it was queued
        if -negative_count < min_frequency:
            break
        left, right = pieces[pair[0]], pieces[pair[1]]
        merged = piece_id(left + right.removeprefix(PREFIX))
        changed: set[Pair] = set()
        for index in sorted(pair_words.pop(pair)):
            changed.update(_merge(words, index, counts[index], pair, merged, pair_counts, pair_words))
        pair_counts.pop(pair, None)
        for changed_pair in sorted(changed):
            if pair_counts.get(changed_pair, 0) > 0:
                heapq.heappush(queue, (-pair_counts[changed_pair], changed_pair))
    return vocabulary


def _merge(
    words: list[list[int]],
    index: int,
    count: int,
    pair: Pair,
    merged: int,
    pair_counts: defaultdict[Pair, int],
    pair_words: defaultdict[Pair, set[int]],
) -> set[Pair]:
    """Replace every occurrence of ``pair`` in word ``index`` (left to right, never overlapping) by ``merged``,
    keeping the pair counts and the word index in step; return the pairs whose counts changed."""
    symbols = words[index]
    for old in pairwise(symbols):
        pair_counts[old] -= count
    result: list[int] = []
    position = 0
    while position < len(symbols):
        if position + 1 < len(symbols) and (symbols[position], symbols[position + 1]) == pair:
            result.append(merged)
            position += 2
        else:
            result.append(symbols[position])
            position += 1
    words[index] = result
    old_pairs = set(pairwise(symbols))
    new_pairs = set(pairwise(result))
    for new in pairwise(result):
        pair_counts[new] += count
    for gone in old_pairs - new_pairs:
        pair_words[gone].discard(index)
    for added in new_pairs:
        pair_words[added].add(index)
    return old_pairs | new_pairs
