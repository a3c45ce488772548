"""Contrastive batches larger than one forward: every rank's embeddings as candidates, gradient caching,
and false negatives kept out of the denominator.

- ``gather_rows`` concatenates a tensor over the ranks of a process group; the gradient that reaches
  the local slice is the sum of every rank's gradient for it, so each rank scores its queries against
  the global batch and the parameters still learn from all of them.
- ``grad_cache_backward`` (GradCache, Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
  under Memory Limited Setup") embeds a batch in chunks without a graph, takes the loss's gradient
  with respect to the embeddings, then re-runs each chunk with a graph and back-propagates that cached
  gradient. Memory: the activations of one chunk plus the embeddings of the whole batch.
- ``false_negative_mask`` marks pairs that are not negatives: texts of one document, and pairs that a
  frozen reference encoder already finds more similar than a threshold.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.distributed as dist

from trainer.losses import info_nce


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns the local one.

    Written out (rather than torch.distributed.nn.functional.all_gather) because its backward must
    run on gloo, which has no reduce_scatter."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """``local`` [B, ...] of every rank, in rank order: [world × B, ...]. Every rank must pass the same B.

    Differentiable: the local slice's gradient is the sum over ranks of each rank's gradient for it.
    Alone (no process group) returns ``local`` itself."""
    if _world()[1] == 1:
        return local
    gathered: torch.Tensor = _GatherWithGrad.apply(local)  # type: ignore[no-untyped-call]
    return gathered


def gather_detached(local: torch.Tensor) -> torch.Tensor:
    """``local`` of every rank in rank order, without gradient (ids, reference embeddings)."""
    if _world()[1] == 1:
        return local.detach()
    parts = [torch.empty_like(local) for _ in range(_world()[1])]
    dist.all_gather(parts, local.detach().contiguous())
    return torch.cat(parts)


def false_negative_mask(
    documents: torch.Tensor, reference: torch.Tensor | None = None, threshold: float | None = None
) -> torch.Tensor:
    """[N, N] bool, True where text j must not be a negative of text i; the diagonal is always False.

    ``documents`` [N]: the document id of each text; two texts of one document are never negatives.
    ``reference`` [N, D]: embeddings under a frozen encoder (L2-normalised here); with ``threshold``
    set, pairs whose cosine exceeds it are masked too (near-duplicates: likely unlabeled positives)."""
    mask = documents[:, None] == documents[None, :]
    if reference is not None and threshold is not None:
        unit = torch.nn.functional.normalize(reference.float(), dim=1)
        mask = mask | (unit @ unit.T > threshold)
    return mask & ~torch.eye(len(documents), dtype=torch.bool, device=documents.device)


def global_info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against the views of every rank (``info_nce``'s loss).

    ``a``, ``b`` [B, D]: this rank's two views; ``mask`` [world × B, world × B] from
    ``false_negative_mask`` over the global batch, or None. Returns the mean over this rank's rows:
    DDP's gradient average over ranks then equals the gradient of one process holding the global
    batch (``gather_rows`` sums the per-rank gradients of each slice; the average divides by the
    number of ranks, which the mean over the local rows had counted once per rank)."""
    rank, world = _world()
    if world == 1:
        return info_nce(a, b, temperature, mask)
    all_a, all_b = gather_rows(a), gather_rows(b)
    rows = slice(rank * a.shape[0], (rank + 1) * a.shape[0])
    local_mask = None if mask is None else mask[rows]
    return info_nce(a, b, temperature, local_mask, candidates=(all_a, all_b), offset=rows.start)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextmanager
def _rng_restored(state: dict[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    yield


def grad_cache_backward(
    embed_chunk: Callable[[int, bool], tuple[torch.Tensor, torch.Tensor | None]],
    chunks: int,
    loss_of_embeddings: Callable[[list[torch.Tensor]], torch.Tensor],
    chunk_context: Callable[[int], AbstractContextManager[Any]],
    device: torch.device,
) -> torch.Tensor:
    """Back-propagate ``loss_of_embeddings`` over a batch embedded in ``chunks`` pieces; returns the loss
    (detached), the gradients accumulated in the parameters.

    ``embed_chunk(i, with_graph)`` returns chunk i's embeddings and, when ``with_graph``, an extra loss
    term of that chunk already weighted into the total (or None): e.g. its share of the MLM loss. It
    is called twice per chunk, first under no_grad; the CPU/CUDA RNG is restored in between, so the
    dropout of both passes is the same and the cached gradient is exact. ``chunk_context(i)`` wraps
    the second pass (DDP's no_sync on all but the last chunk)."""
    states, cached = [], []
    with torch.no_grad():
        for i in range(chunks):
            states.append(_rng_state(device))
            cached.append(embed_chunk(i, False)[0].detach().requires_grad_())
    loss = loss_of_embeddings(cached)
    loss.backward()  # type: ignore[no-untyped-call]
    total = loss.detach()
    for i, (state, leaf) in enumerate(zip(states, cached, strict=True)):
        with _rng_restored(state, device), chunk_context(i):
            vectors, extra = embed_chunk(i, True)
            cached_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            surrogate = (vectors * cached_grad).sum()  # its gradient w.r.t. the parameters is the chain rule's
            if extra is not None:
                surrogate = surrogate + extra
                total = total + extra.detach()
            surrogate.backward()  # type: ignore[no-untyped-call]
    return total


def micro_batches_per_contrastive_batch(contrastive_batch: int | None, batch_size: int, world_size: int) -> int:
    """How many micro-batches each process reads into one contrastive batch; a clear error when
    ``contrastive_batch`` is not a multiple of ``batch_size`` × ``world_size``."""
    if contrastive_batch is None:
        return 1
    if contrastive_batch % (batch_size * world_size):
        raise ValueError(
            f"objective.contrastive_batch {contrastive_batch} is not a multiple of optim.batch_size {batch_size} × "
            f"{world_size} processes"
        )
    return contrastive_batch // (batch_size * world_size)
