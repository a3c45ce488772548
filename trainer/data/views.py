"""Two views of each text for contrastive learning, and BERT masking for masked-token modelling.

Everything works on token ids, so any tokenizer will do. A view keeps the special tokens at the
ends ([CLS] … [SEP], and any padding) and changes only what lies between them. Randomness comes
only from the generator passed in (a ``random.Random`` for views, a ``torch.Generator`` for
masking), so a run restored with its generators' states draws exactly the same views and masks.

Where ``special_ids`` is None the ids are taken to be in the BERT layout, one special token at each
end; given, the leading and trailing runs of those ids are the ends, and special ids between them
are never deleted.
"""

import random
from collections.abc import Collection, Sequence
from typing import Protocol

import torch

from trainer.config import ViewsConfig
from trainer.losses import IGNORE_INDEX


def _body(ids: Sequence[int], special_ids: Collection[int] | None) -> tuple[int, int]:
    """(start, stop): ids[:start] and ids[stop:] are the special ends every view keeps."""
    if special_ids is None:
        return (1, len(ids) - 1) if len(ids) >= 2 else (len(ids), len(ids))
    start = 0
    while start < len(ids) and ids[start] in special_ids:
        start += 1
    stop = len(ids)
    while stop > start and ids[stop - 1] in special_ids:
        stop -= 1
    return start, stop


def identity(ids: Sequence[int]) -> list[int]:
    """``ids`` unchanged: the SimCSE view (Gao et al. 2021). Two identical inputs become two views
    through the encoder's dropout masks, which differ between the two forward passes."""
    return list(ids)


def delete_tokens(
    ids: Sequence[int], probability: float, rng: random.Random, special_ids: Collection[int] | None = None
) -> list[int]:
    """``ids`` with each non-special token between the ends dropped with ``probability``.

    At least one such token always stays (a random one when every draw said drop); with one or
    none there is nothing to delete and ``ids`` come back unchanged. Draws one ``rng.random()``
    per deletable token.
    """
    if not 0 <= probability < 1:
        raise ValueError(f"token deletion probability must be in [0, 1), got {probability}")
    start, stop = _body(ids, special_ids)
    body = ids[start:stop]
    deletable = [i for i, token in enumerate(body) if special_ids is None or token not in special_ids]
    if probability == 0 or len(deletable) <= 1:
        return list(ids)
    dropped = {i for i in deletable if rng.random() < probability}
    if len(dropped) == len(deletable):
        dropped.remove(deletable[rng.randrange(len(deletable))])
    return [*ids[:start], *(token for i, token in enumerate(body) if i not in dropped), *ids[stop:]]


def crop_span(
    ids: Sequence[int],
    fraction: tuple[float, float],
    rng: random.Random,
    special_ids: Collection[int] | None = None,
) -> list[int]:
    """A random contiguous span of the tokens between the ends, with the ends kept.

    The span covers a share of those tokens drawn uniformly from ``fraction`` = (low, high),
    rounded, at least one token; its start is uniform over the places it fits.
    """
    low, high = fraction
    if not 0 < low <= high <= 1:
        raise ValueError(f"span crop fraction must satisfy 0 < low <= high <= 1, got {fraction}")
    start, stop = _body(ids, special_ids)
    tokens = stop - start
    if tokens <= 1:
        return list(ids)
    length = min(tokens, max(1, round(tokens * rng.uniform(low, high))))
    offset = start + rng.randrange(tokens - length + 1)
    return [*ids[:start], *ids[offset : offset + length], *ids[stop:]]


def view(
    ids: Sequence[int], config: ViewsConfig, rng: random.Random, special_ids: Collection[int] | None = None
) -> list[int]:
    """One view of ``ids``: span crop (when ``config.span_crop`` is set), then token deletion (when
    ``config.token_deletion`` > 0); the identity view when neither is on."""
    if config.span_crop is not None:
        ids = crop_span(ids, config.span_crop, rng, special_ids)
    if config.token_deletion > 0:
        return delete_tokens(ids, config.token_deletion, rng, special_ids)
    return identity(ids)


def make_views(
    token_ids: Sequence[Sequence[int]],
    config: ViewsConfig,
    rng: random.Random,
    special_ids: Collection[int] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Two independently drawn views of every text: (first views, second views), row i of each
    from text i."""
    first = [view(ids, config, rng, special_ids) for ids in token_ids]
    second = [view(ids, config, rng, special_ids) for ids in token_ids]
    return first, second


class MaskingVocabulary(Protocol):
    """What masking needs to know of a tokenizer; service.models.tokenization.TextTokenizer has it."""

    @property
    def mask_id(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_ids(self) -> Collection[int]: ...


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocabulary: MaskingVocabulary,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019) of a padded batch: (masked ids, labels).

    ``input_ids``, ``attention_mask``: [B, T]. Each real (mask 1), non-special position is chosen
    with ``probability``, and every row with such a position gets at least one. Of the chosen, 80 %
    become [MASK], 10 % a random non-special token and 10 % stay; ``labels`` holds the original id
    at chosen positions and -100 elsewhere. Both come back on ``input_ids``' device.

    Random numbers are drawn on ``generator``'s device (torch's global CPU generator when None),
    a fixed amount per call whatever the data, then moved to the batch's device: the same generator
    state gives the same masks on CPU and GPU.
    """
    mask_id = vocabulary.mask_id
    if mask_id is None:
        raise ValueError("the tokenizer has no [MASK] token; masked-token modelling needs one")
    if not 0 < probability < 1:
        raise ValueError(f"masking probability must be in (0, 1), got {probability}")
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"expected [B, T] ids and mask, got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    draw_device = generator.device if generator is not None else torch.device("cpu")
    shape = input_ids.shape

    def uniform() -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=draw_device).to(input_ids.device)

    choose, fallback, action = uniform(), uniform(), uniform()
    special = torch.tensor(sorted(vocabulary.special_ids), dtype=input_ids.dtype, device=draw_device)
    # Random replacements skip special ids so [PAD] or [CLS] never appear inside a text.
    ordinary = torch.arange(vocabulary.vocab_size, device=draw_device)
    ordinary = ordinary[~torch.isin(ordinary, special)]
    random_ids = ordinary[torch.randint(len(ordinary), shape, generator=generator, device=draw_device)]

    maskable = attention_mask.bool() & ~torch.isin(input_ids, special.to(input_ids.device))
    chosen = (choose < probability) & maskable
    needs_one = maskable.any(dim=1) & ~chosen.any(dim=1)
    forced = fallback.masked_fill(~maskable, -1.0).argmax(dim=1, keepdim=True)
    chosen |= torch.zeros_like(chosen).scatter_(1, forced, True) & needs_one[:, None]

    masked = torch.where(chosen & (action < 0.8), mask_id, input_ids)
    replaced = chosen & (action >= 0.8) & (action < 0.9)
    masked = torch.where(replaced, random_ids.to(input_ids.device, input_ids.dtype), masked)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    return masked, labels
