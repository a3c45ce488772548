"""Contrastive views and MLM masking on token ids: ends kept, reproducible from the generator passed
in, and BERT's proportions."""

import random
from dataclasses import dataclass

import pytest
import torch

from trainer.config import ViewsConfig
from trainer.data.views import crop_span, delete_tokens, identity, make_views, mask_tokens, view

CLS, SEP, PAD, UNK, MASK = 101, 102, 0, 100, 103
SPECIAL = frozenset({CLS, SEP, PAD, UNK, MASK})
TEXT = [CLS, *range(1000, 1040), SEP]  # 40 ordinary tokens between the ends


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's masking facts, without a tokenizer: masking is tokenizer-agnostic."""

    mask_id: int | None = MASK
    vocab_size: int = 2000
    special_ids: frozenset[int] = SPECIAL


def is_subsequence(short: list[int], long: list[int]) -> bool:
    remaining = iter(long)
    return all(token in remaining for token in short)


# -- views -----------------------------------------------------------------------------------------


def test_identity_is_an_equal_copy() -> None:
    twin = identity(TEXT)
    assert twin == TEXT and twin is not TEXT


def test_deletion_keeps_the_ends_and_order_and_drops_about_p() -> None:
    rng = random.Random(0)
    kept = [delete_tokens(TEXT, 0.3, rng) for _ in range(200)]
    assert all(v[0] == CLS and v[-1] == SEP and is_subsequence(v, TEXT) for v in kept)
    dropped_share = 1 - sum(len(v) - 2 for v in kept) / (200 * 40)
    assert 0.26 < dropped_share < 0.34


def test_deletion_never_drops_every_token() -> None:
    for seed in range(200):
        deleted = delete_tokens([CLS, 7, 8, 9, SEP], 0.99, random.Random(seed))
        assert deleted[0] == CLS and deleted[-1] == SEP and len(deleted) == 3
    assert delete_tokens([CLS, 7, SEP], 0.99, random.Random(0)) == [CLS, 7, SEP]
    assert delete_tokens(TEXT, 0.0, random.Random(0)) == TEXT
    with pytest.raises(ValueError, match="probability"):
        delete_tokens(TEXT, 1.0, random.Random(0))


def test_with_special_ids_padding_and_inner_specials_survive() -> None:
    padded = [CLS, 5, 6, SEP, 7, 8, SEP, PAD, PAD]  # a text pair, then padding
    for seed in range(50):
        deleted = delete_tokens(padded, 0.9, random.Random(seed), SPECIAL)
        assert deleted[0] == CLS and deleted[-3:] == [SEP, PAD, PAD] and SEP in deleted[1:-3]
        cropped = crop_span(padded, (0.2, 0.6), random.Random(seed), SPECIAL)
        assert cropped[0] == CLS and cropped[-3:] == [SEP, PAD, PAD]


def test_crop_is_a_contiguous_span_of_the_drawn_length() -> None:
    lengths = set()
    starts = set()
    for seed in range(300):
        cropped = crop_span(TEXT, (0.25, 0.5), random.Random(seed))
        inner = cropped[1:-1]
        assert cropped[0] == CLS and cropped[-1] == SEP
        assert inner == list(range(inner[0], inner[0] + len(inner)))  # contiguous
        assert inner[-1] <= 1039  # inside the text
        lengths.add(len(inner))
        starts.add(inner[0])
    assert lengths == set(range(10, 21))  # round(40 * [0.25, 0.5])
    assert len(starts) > 25 and min(starts) == 1000  # spans start all over the text, at its beginning too
    with pytest.raises(ValueError, match="fraction"):
        crop_span(TEXT, (0.6, 0.4), random.Random(0))


def test_a_view_crops_then_deletes_and_is_the_identity_when_both_are_off() -> None:
    config = ViewsConfig(token_deletion=0.5, span_crop=(0.5, 0.5))
    one = view(TEXT, config, random.Random(3))
    assert len(one) - 2 < 20 and is_subsequence(one, TEXT)
    assert view(TEXT, ViewsConfig(), random.Random(3)) == TEXT


def test_views_are_reproducible_from_the_generator_state_alone() -> None:
    config = ViewsConfig(token_deletion=0.2, span_crop=(0.3, 0.9))
    texts = [TEXT, [*TEXT[:10], SEP], [CLS, 5, SEP]]
    rng = random.Random(9)
    make_views(texts, config, rng)
    saved = rng.getstate()  # what a checkpoint keeps
    uninterrupted = [make_views(texts, config, rng) for _ in range(3)]
    restored = random.Random()
    restored.setstate(saved)
    random.seed(12345)  # global state must play no part
    assert [make_views(texts, config, restored) for _ in range(3)] == uninterrupted
    first, second = uninterrupted[0]
    assert first != second  # the two views are drawn independently


def test_views_leave_the_global_random_state_alone() -> None:
    random.seed(1)
    expected = random.random()
    random.seed(1)
    make_views([TEXT] * 4, ViewsConfig(token_deletion=0.3, span_crop=(0.5, 1.0)), random.Random(0))
    assert random.random() == expected


def test_simcse_twins_are_identical_inputs() -> None:
    first, second = make_views([TEXT, [*TEXT[:5], SEP]], ViewsConfig(), random.Random(0))
    assert first == second == [TEXT, [*TEXT[:5], SEP]]


# -- masking ---------------------------------------------------------------------------------------


def batch(rows: int = 64, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [CLS] ordinary tokens [SEP] then padding, of random lengths; row 0 has no ordinary token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), PAD)
    mask = torch.zeros((rows, length), dtype=torch.long)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)
    lengths[0] = 2
    for row, n in enumerate(lengths.tolist()):
        ids[row, :n] = torch.randint(1000, 2000, (n,), generator=generator)
        ids[row, 0], ids[row, n - 1] = CLS, SEP
        mask[row, :n] = 1
    return ids, mask


def test_masking_follows_bert() -> None:
    ids, mask = batch()
    masked, labels = mask_tokens(ids, mask, Vocabulary(), 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    maskable = (mask == 1) & (ids != CLS) & (ids != SEP)
    assert not bool((chosen & ~maskable).any())  # never special tokens or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert 0.13 < float(chosen.sum()) / float(maskable.sum()) < 0.17
    as_mask = float((masked[chosen] == MASK).float().mean())
    unchanged = float((masked[chosen] == ids[chosen]).float().mean())
    assert 0.76 < as_mask < 0.84 and 0.07 < unchanged < 0.13
    randomised = masked[chosen & (masked != MASK) & (masked != ids)]
    assert len(randomised) > 0 and not bool(torch.isin(randomised, torch.tensor(sorted(SPECIAL))).any())


def test_random_replacements_are_never_special_tokens() -> None:
    # A vocabulary that is mostly special ids: drawing from all of it would hit them 3 times in 4.
    vocabulary = Vocabulary(mask_id=4, vocab_size=8, special_ids=frozenset(range(6)))
    ids = torch.randint(6, 8, (64, 128), generator=torch.Generator().manual_seed(3))
    masked, labels = mask_tokens(ids, torch.ones_like(ids), vocabulary, 0.5, torch.Generator().manual_seed(3))
    replaced = masked[(labels != -100) & (masked != 4)]
    assert len(replaced) > 300 and set(replaced.tolist()) <= {6, 7}


def test_every_row_with_a_maskable_token_gets_one() -> None:
    ids, mask = batch(rows=200, length=5)
    _, labels = mask_tokens(ids, mask, Vocabulary(), 0.05, torch.Generator().manual_seed(1))
    per_row = (labels != -100).sum(dim=1)
    assert int(per_row[0]) == 0  # [CLS] [SEP] only: nothing to mask
    assert bool((per_row[1:] >= 1).all())


def test_masking_probability_is_configurable() -> None:
    ids, mask = batch(seed=2)
    _, labels = mask_tokens(ids, mask, Vocabulary(), 0.4, torch.Generator().manual_seed(2))
    maskable = (mask == 1) & (ids != CLS) & (ids != SEP)
    assert 0.37 < float((labels != -100).sum()) / float(maskable.sum()) < 0.43


def test_masks_come_from_the_generator_alone() -> None:
    ids, mask = batch()
    generator = torch.Generator().manual_seed(7)
    global_state = torch.get_rng_state()
    first = mask_tokens(ids, mask, Vocabulary(), 0.15, generator)
    saved = generator.get_state()
    second = mask_tokens(ids, mask, Vocabulary(), 0.15, generator)
    assert torch.equal(torch.get_rng_state(), global_state)
    restored = torch.Generator()
    restored.set_state(saved)
    again = mask_tokens(ids, mask, Vocabulary(), 0.15, restored)
    assert torch.equal(again[0], second[0]) and torch.equal(again[1], second[1])
    assert not torch.equal(first[1], second[1])


def test_masking_needs_a_mask_token_and_a_sane_batch() -> None:
    ids, mask = batch(rows=2, length=4)
    with pytest.raises(ValueError, match=r"no \[MASK\] token"):
        mask_tokens(ids, mask, Vocabulary(mask_id=None))
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, mask, Vocabulary(), 0.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mask_tokens(ids, mask[:, :3], Vocabulary())
