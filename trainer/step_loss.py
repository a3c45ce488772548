"""The loss of one step on this process's share of a contrastive batch: InfoNCE over two views against every
process's views, near-duplicates and texts of one document masked out of the negatives, plus masked-token
modelling; in one forward with its graph, or with GradCache in chunks (backward included)."""

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from service.models.tokenization import TextTokenizer
from trainer.config import TrainConfig
from trainer.contrastive import false_negative_mask, gather_detached, global_info_nce, grad_cache_backward
from trainer.data.loader import Batch
from trainer.data.prepare import PreparedCorpus
from trainer.data.views import mask_tokens
from trainer.encoder import MaskedLmHead, SentenceEncoder
from trainer.losses import IGNORE_INDEX, masked_lm_loss
from trainer.run_inputs import build_encoder


class StepLoss:
    """The objective of ``config`` on ``model`` (the pretraining model, DDP-wrapped under torchrun), whose
    encoder is ``encoder`` and MLM head ``mlm_head``."""

    def __init__(
        self,
        config: TrainConfig,
        corpus: PreparedCorpus,
        model: nn.Module,
        encoder: SentenceEncoder,
        mlm_head: MaskedLmHead | None,
        tokenizer: TextTokenizer,
        device: torch.device,
        use_bf16: bool,
    ) -> None:
        self.config = config
        self.corpus = corpus  # the false-negative check rebuilds the initial encoder from it
        self.model = model
        self.encoder = encoder
        self.mlm_head = mlm_head
        self.tokenizer = tokenizer
        self.device = device
        self.use_bf16 = use_bf16
        self.reference_encoder: SentenceEncoder | None = None  # the frozen initial encoder, built on first use

    def loss(self, batch: Batch) -> torch.Tensor:
        """The step's loss of this process's batch with one forward (and its graph); InfoNCE scores
        against every process's views."""
        objective = self.config.objective
        device = self.device
        total = torch.zeros((), device=device)
        view_ids = view_mask = mlm_ids = mlm_mask = labels = None
        if objective.contrastive_weight > 0:
            # Both views in one batch: one forward per step, as DDP requires.
            view_ids, view_mask = batch.view_ids, batch.view_mask
        if objective.mlm_weight > 0 and self.mlm_head is not None:
            mlm_mask = batch.prefix_mask
            mlm_ids, labels = mask_tokens(batch.prefix_ids, mlm_mask, self.tokenizer, objective.mlm_probability)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            vectors, predictions = self.model(view_ids, view_mask, mlm_ids, mlm_mask, labels)
        if vectors is not None:
            size = len(batch.documents)
            a, b = vectors[:size], vectors[size:]
            mask = self.negative_mask(batch)
            total = total + objective.contrastive_weight * global_info_nce(
                a.float(), b.float(), objective.temperature, mask
            )
        if predictions is not None:
            total = total + objective.mlm_weight * masked_lm_loss(predictions.logits.float(), predictions.labels)
        return total

    def cached_backward(self, batch: Batch, scale: float) -> torch.Tensor:
        """Back-propagate ``scale`` × the step's loss of this process's batch with GradCache (chunks of
        ``objective.grad_cache_chunk`` texts); returns that scaled loss, detached."""
        objective = self.config.objective
        device = self.device
        chunk = objective.grad_cache_chunk
        assert chunk is not None
        size = len(batch.documents)
        mask = self.negative_mask(batch)
        # Every random draw but dropout happens before the passes, so that restoring the RNG repeats the dropout.
        inputs = []
        for start in range(0, size, chunk):
            first, second = slice(start, min(start + chunk, size)), slice(size + start, size + min(start + chunk, size))
            view_ids, view_mask = batch.views(first, second)
            masked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            if objective.mlm_weight > 0 and self.mlm_head is not None:
                prefix_ids, mlm_mask = batch.prefixes(first)
                mlm_ids, labels = mask_tokens(prefix_ids, mlm_mask, self.tokenizer, objective.mlm_probability)
                masked = (mlm_ids, mlm_mask, labels)
            inputs.append((view_ids, view_mask, masked))
        # A tensor, not an int: counting on the host would sync with the device once per step.
        masked_positions = sum(
            ((m[2] != IGNORE_INDEX).sum() for _, _, m in inputs if m is not None),
            torch.zeros((), dtype=torch.long, device=device),
        )

        def embed_chunk(i: int, with_graph: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            view_ids, view_mask, masked = inputs[i]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                if not with_graph:
                    return self.encoder(view_ids, view_mask), None
                vectors, predictions = self.model(view_ids, view_mask, *(masked if masked else (None, None, None)))
            extra = None
            if predictions is not None:
                # This chunk's share of the MLM mean over every masked position of the batch.
                share = predictions.labels.numel() / masked_positions.clamp(min=1)
                mlm = masked_lm_loss(predictions.logits.float(), predictions.labels)
                extra = scale * objective.mlm_weight * share * mlm
            assert vectors is not None
            return vectors, extra

        def loss_of_embeddings(chunks: list[torch.Tensor]) -> torch.Tensor:
            a = torch.cat([c[: len(c) // 2] for c in chunks]).float()
            b = torch.cat([c[len(c) // 2 :] for c in chunks]).float()
            return scale * objective.contrastive_weight * global_info_nce(a, b, objective.temperature, mask)

        def chunk_context(i: int) -> AbstractContextManager[Any]:
            # Gradients are all-reduced once, after the last chunk.
            last = i == len(inputs) - 1
            return (
                self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last else nullcontext()
            )

        return grad_cache_backward(embed_chunk, len(inputs), loss_of_embeddings, chunk_context, device)

    def negative_mask(self, batch: Batch) -> torch.Tensor:
        """The global batch's false-negative mask (``false_negative_mask``): same document, or, with
        ``objective.false_negative_threshold``, a cosine above it under the frozen initial encoder."""
        device = self.device
        threshold = self.config.objective.false_negative_threshold
        reference = None
        if threshold is not None:
            if self.reference_encoder is None:
                # from_scratch reseeds torch: the run's random streams must not notice the rebuild.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    encoder, _ = build_encoder(self.config, self.corpus)
                self.reference_encoder = encoder.to(device).eval().requires_grad_(False)
            size = len(batch.documents)
            chunk = self.config.objective.grad_cache_chunk or size
            with torch.no_grad():
                local = torch.cat(
                    [self.reference_encoder(*batch.prefixes(slice(i, i + chunk))) for i in range(0, size, chunk)]
                )
            reference = gather_detached(local.float())
        ids = gather_detached(batch.documents)
        return false_negative_mask(ids, reference, threshold)
