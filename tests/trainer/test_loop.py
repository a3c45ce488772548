"""The training loop's mechanics on a tiny encoder: accumulation, schedule, clipping, optimiser, base models."""

import itertools
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

import trainer.step_loss as step_loss
from service.models.tokenization import TextTokenizer, pad_batch
from tests.trainer.conftest import tiny_config
from trainer.checkpoint import load_checkpoint
from trainer.data.loader import Batch
from trainer.data.order import DataPosition
from trainer.data.tokenizer import train_wordpiece
from trainer.distributed import Topology
from trainer.encoder import SentenceEncoder
from trainer.losses import IGNORE_INDEX
from trainer.release.publish import load_trained
from trainer.run_inputs import fused_adamw, warmup_cosine
from trainer.step_loss import StepLoss
from trainer.train import Trainer

CPU = Topology(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def mean_over_texts(self: StepLoss, batch: Batch) -> torch.Tensor:
    """A loss that is a mean of one term per text (InfoNCE is not: its negatives span the batch)."""
    embeddings = self.encoder.transformer.get_input_embeddings()
    rows = [ids[:length] for ids, length in zip(batch.prefix_ids, batch.prefix_lengths, strict=True)]
    return torch.stack([embeddings(row).pow(2).mean() for row in rows]).mean()


def test_accumulating_two_micro_batches_makes_the_update_of_one_twice_as_big(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StepLoss, "loss", mean_over_texts)
    accumulated = Trainer(tiny_config(corpus_file, tmp_path, optim__batch_size=4, optim__grad_accumulation=2), CPU)
    whole = Trainer(tiny_config(corpus_file, tmp_path, optim__batch_size=8), CPU)
    records = [(accumulated.train_step(), whole.train_step()) for _ in range(3)]
    # One optimiser step per two micro-batches: the data moved twice as many (half-size) batches.
    assert (accumulated.step, accumulated.position, whole.position) == (3, DataPosition(0, 6), DataPosition(0, 3))
    for a, b in records:
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # Adam alone would hide a 2x gradient
    after_whole = whole.encoder.state_dict()
    for name, tensor in accumulated.encoder.state_dict().items():
        torch.testing.assert_close(tensor, after_whole[name], atol=1e-6, rtol=0, msg=name)
    word_embeddings = "transformer.embeddings.word_embeddings.weight"
    initial = Trainer(tiny_config(corpus_file, tmp_path), CPU).encoder.state_dict()[word_embeddings]
    assert not torch.equal(initial, after_whole[word_embeddings])  # the steps did change the weights


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps=4, max_steps=20))
    rates = []
    for _ in range(21):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate of the next optimiser step
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])  # linear to the peak
    assert all(later < earlier for earlier, later in itertools.pairwise(rates[4:]))
    for step in range(4, 21):  # the cosine: half the peak halfway through the decay, 0 at the end
        assert rates[step] == pytest.approx(1.0 * (1 + math.cos(math.pi * (step - 4) / 16)))
    assert rates[12] == pytest.approx(1.0) and rates[20] == pytest.approx(0.0, abs=1e-12)


def test_clipping_covers_every_trained_parameter_the_mlm_head_included(corpus_file: Path, tmp_path: Path) -> None:
    config = tiny_config(corpus_file, tmp_path, optim__clip_norm=1e-4).model_copy(update={"precision": "bf16"})
    trainer = Trainer(config, CPU)
    assert trainer.use_bf16 and trainer.mlm_head is not None  # bf16 autocast runs on CPU too
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 1e-4  # so clipping did something
    gradients = [p.grad for p in trainer.trained_parameters if p.grad is not None]
    assert float(torch.stack([g.norm() for g in gradients]).norm()) <= 1e-4 * 1.001
    head = [p.grad for p in trainer.mlm_head.transform.parameters() if p.grad is not None]
    assert head and float(torch.stack([g.norm() for g in head]).norm()) > 0


def test_continuing_from_a_base_model_folder_starts_from_its_weights(corpus_file: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    train_wordpiece(corpus_file.read_text().splitlines(), 800, base)
    vocab_size = TextTokenizer(base / "tokenizer.json", 64).vocab_size
    torch.manual_seed(11)
    shape = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base_model = BertModel(shape, add_pooling_layer=False).eval()
    base_model.save_pretrained(base)

    config = tiny_config(
        corpus_file, tmp_path / "runs", encoder__base_model=str(base), encoder__scratch=None, optim__max_steps=3
    )
    trainer = Trainer(config, CPU)
    assert trainer.tokenizer_dir == base and trainer.encoder.max_seq_length == 64
    base_weights = base_model.state_dict()
    loaded = trainer.encoder.transformer.state_dict()
    assert set(loaded) == set(base_weights)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, base_weights[name]), name
    # Step 0 embeddings are the base's own.
    batch = pad_batch(
        trainer.tokenizer.encode(["The river rose.", "A tuple is a sequence."], truncate=True),
        trainer.tokenizer.pad_id,
    )
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    with torch.no_grad():
        expected = SentenceEncoder(base_model, 64)(ids, mask)
        torch.testing.assert_close(trainer.encoder.eval()(ids, mask), expected)

    result = trainer.run()
    trained = load_checkpoint(result.last_checkpoint)["encoder"]
    name = "transformer.embeddings.word_embeddings.weight"
    assert not torch.equal(trained[name], base_weights["embeddings.word_embeddings.weight"])
    reloaded = load_trained(result.last_checkpoint)  # rebuilt from the base folder, then the trained weights
    assert reloaded.tokenizer_dir == base
    for key, tensor in reloaded.encoder.state_dict().items():
        assert torch.equal(tensor, trained[key]), key


def test_adamw_is_fused_on_cuda_and_torch_default_elsewhere(corpus_file: Path, tmp_path: Path) -> None:
    assert fused_adamw(torch.device("cuda", 0)) is True
    assert fused_adamw(torch.device("cpu")) is None
    trainer = Trainer(tiny_config(corpus_file, tmp_path), CPU)
    assert not trainer.optimizer.defaults["fused"] and not trainer.optimizer.defaults["foreach"]


def without_dropout(trainer: Trainer) -> Trainer:
    for module in trainer.encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return trainer


def every_fifth_token_masked(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, vocabulary: object, probability: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A masking that depends on the positions only, so that a whole batch and its chunks get the same masks."""
    chosen = (torch.arange(input_ids.shape[1]) % 5 == 1) & attention_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return torch.where(chosen, torch.full_like(input_ids, 3), input_ids), labels


def test_grad_cache_gives_the_masked_token_loss_of_the_plain_step(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each chunk decodes its own masked rows; their shares must add up to the mean over the whole batch.
    monkeypatch.setattr(step_loss, "mask_tokens", every_fifth_token_masked)
    settings = {"optim__batch_size": 8, "objective__contrastive_batch": 32, "objective__mlm_weight": 2.0}
    plain = Trainer(tiny_config(corpus_file, tmp_path, **settings), CPU)
    cached = Trainer(tiny_config(corpus_file, tmp_path, objective__grad_cache_chunk=8, **settings), CPU)
    for trainer in (plain, cached):
        without_dropout(trainer)
    for _ in range(2):
        a, b = plain.train_step(), cached.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert plain.mlm_head is not None and cached.mlm_head is not None
    torch.testing.assert_close(cached.mlm_head.bias, plain.mlm_head.bias, rtol=0, atol=1e-6)


def test_torch_compile_compiles_the_transformer_in_place(corpus_file: Path, tmp_path: Path) -> None:
    eager = Trainer(tiny_config(corpus_file, tmp_path), CPU)
    compiled = Trainer(tiny_config(corpus_file, tmp_path).model_copy(update={"torch_compile": True}), CPU)
    assert eager.encoder.transformer._compiled_call_impl is None
    assert compiled.encoder.transformer._compiled_call_impl is not None
    # Checkpoints and export read the same parameter names.
    assert list(compiled.encoder.state_dict()) == list(eager.encoder.state_dict())


@pytest.mark.skipif(
    not os.environ.get("EMBEDSERVE_COMPILE_TESTS"),
    reason="torch.compile of a 2-layer, 32-wide encoder took 293 s (then 230 s more to recompile for another length) "
    "on the 2-core CPU this was written on; set EMBEDSERVE_COMPILE_TESTS=1 to run it",
)
def test_a_compiled_encoder_trains_to_the_losses_of_the_eager_one(corpus_file: Path, tmp_path: Path) -> None:
    settings = {"objective__mlm_weight": 0.0, "optim__max_steps": 2}
    eager = without_dropout(Trainer(tiny_config(corpus_file, tmp_path, **settings), CPU))
    config = tiny_config(corpus_file, tmp_path, **settings).model_copy(update={"torch_compile": True})
    compiled = without_dropout(Trainer(config, CPU))
    for _ in range(2):
        a, b = eager.train_step(), compiled.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
