"""The MLM head decodes the masked positions only, with the loss and gradients of the full-vocabulary head."""

import torch
from torch import nn
from torch.nn import functional as F

from trainer.encoder import MaskedLmHead, PretrainingModel, from_scratch
from trainer.losses import IGNORE_INDEX, masked_lm_loss

VOCAB = 300


def tiny_model() -> PretrainingModel:
    encoder = from_scratch(VOCAB, hidden_size=32, layers=2, heads=2, max_seq_length=24, seed=5)
    model = PretrainingModel(encoder, MaskedLmHead(encoder))
    nn.init.normal_(model.mlm_head.bias, std=0.5)  # type: ignore[union-attr]  # a zero bias would hide a misplaced one
    return model.eval()  # no dropout: both computations see the same network


def masked_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask (rows padded to different lengths) and labels (about 15 % of real positions)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 20), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((20, 17, 9, 13)):
        mask[row, length:] = 0
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return torch.where(chosen, torch.full_like(ids, 4), ids), mask, labels


def full_vocabulary_loss(
    model: PretrainingModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The head as it was: logits [B, T, V] at every position, the cross-entropy over the masked ones."""
    head = model.mlm_head
    assert head is not None
    logits = head.transform(model.encoder.token_states(ids, mask)) @ head.word_embeddings.weight.T + head.bias
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def test_the_head_decodes_only_masked_rows_with_the_loss_and_gradients_of_the_full_vocabulary_head() -> None:
    model = tiny_model()
    ids, mask, labels = masked_batch(seed=1)
    masked = int((labels != IGNORE_INDEX).sum())
    assert 0 < masked < int(mask.sum()) // 4
    decoded_rows = []
    assert model.mlm_head is not None
    model.mlm_head.transform.register_forward_hook(lambda _m, inputs, _o: decoded_rows.append(inputs[0].shape))

    _, predictions = model(None, None, ids, mask, labels)
    assert predictions is not None
    assert decoded_rows == [torch.Size([masked, 32])] and predictions.logits.shape == (masked, VOCAB)
    assert torch.equal(predictions.labels, labels[labels != IGNORE_INDEX])
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss = masked_lm_loss(predictions.logits, predictions.labels)
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)

    reference = full_vocabulary_loss(model, ids, mask, labels)
    reference_gradients = torch.autograd.grad(reference, parameters, allow_unused=True)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name_and_parameter, gradient, expected in zip(
        model.named_parameters(), gradients, reference_gradients, strict=True
    ):
        assert (gradient is None) == (expected is None), name_and_parameter[0]
        if expected is not None:
            torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-6, msg=name_and_parameter[0])
    head_bias_gradient = gradients[[n for n, _ in model.named_parameters()].index("mlm_head.bias")]
    assert head_bias_gradient is not None and float(head_bias_gradient.abs().sum()) > 0


def test_a_batch_without_masked_positions_decodes_nothing_and_gives_a_differentiable_zero() -> None:
    model = tiny_model()
    ids, mask, labels = masked_batch(seed=2)
    _, predictions = model(None, None, ids, mask, torch.full_like(labels, IGNORE_INDEX))
    assert predictions is not None and predictions.logits.shape == (0, VOCAB)
    loss = masked_lm_loss(predictions.logits, predictions.labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # type: ignore[no-untyped-call]


def test_without_mlm_labels_the_model_returns_only_vectors() -> None:
    model = tiny_model()
    ids, mask, _ = masked_batch(seed=3)
    vectors, predictions = model(ids, mask)
    assert predictions is None and vectors is not None and vectors.shape == (4, 32)
