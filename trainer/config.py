"""The training run's configuration: a YAML file validated by these models; every field documented.

Example (``examples/run.yaml``)::

    run_name: support-tickets
    corpus: {path: data/tickets.jsonl, text_field: body}
    encoder: {base_model: minilm}
    objective: {contrastive_weight: 1.0, mlm_weight: 0.0, temperature: 0.05}
    optim: {max_steps: 500, batch_size: 32, learning_rate: 3.0e-5}
    export: {model: minilm, gate_threshold: 0.0}
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # A misspelt key must fail loudly, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class CorpusConfig(_Strict):
    path: Path = Field(description="A .txt file (one document per line), a .jsonl file, or a folder of them.")
    text_field: str = Field("text", description="The field holding the text in .jsonl records.")
    min_chars: int = Field(20, ge=1, description="Documents shorter than this after normalisation are dropped.")
    scrub_pii: bool = Field(True, description="Replace emails, phone numbers, IPs and card numbers by placeholders.")
    validation_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of documents held out for validation.")
    split_seed: str = Field("embedserve", description="Mixed into the hash that assigns each text to a split.")


class ScratchEncoderConfig(_Strict):
    vocab_size: int = Field(8000, ge=100, description="WordPiece vocabulary size, trained on the corpus.")
    hidden_size: int = Field(256, ge=8, description="Width of the transformer (and of the embeddings).")
    layers: int = Field(4, ge=1, description="Transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    max_seq_length: int = Field(128, ge=8, description="Longest input in tokens.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ScratchEncoderConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden_size ({self.hidden_size})")
        return self


class EncoderConfig(_Strict):
    base_model: str | None = Field(
        "minilm",
        description="Continue from a base model: 'minilm' (the packaged all-MiniLM-L6-v2) or a local "
        "sentence-transformers/Hugging Face folder. null = train from scratch (see scratch).",
    )
    scratch: ScratchEncoderConfig | None = Field(None, description="Shape of an encoder trained from scratch.")
    max_seq_length: int | None = Field(None, description="Override the base model's token limit.")

    @model_validator(mode="after")
    def _one_source(self) -> "EncoderConfig":
        if (self.base_model is None) == (self.scratch is None):
            raise ValueError("set exactly one of encoder.base_model and encoder.scratch")
        return self


class ViewsConfig(_Strict):
    token_deletion: float = Field(0.0, ge=0, lt=1, description="Probability of dropping each token from a view.")
    span_crop: tuple[float, float] | None = Field(
        None, description="Crop each view to a random contiguous span of this fraction range, e.g. [0.5, 1.0]."
    )


class ObjectiveConfig(_Strict):
    contrastive_weight: float = Field(1.0, ge=0, description="Weight of InfoNCE over two views (SimCSE).")
    mlm_weight: float = Field(0.0, ge=0, description="Weight of masked-token modelling.")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked for MLM.")
    views: ViewsConfig = Field(default_factory=ViewsConfig, description="How the two contrastive views differ.")

    @model_validator(mode="after")
    def _some_objective(self) -> "ObjectiveConfig":
        if self.contrastive_weight == 0 and self.mlm_weight == 0:
            raise ValueError("at least one of contrastive_weight and mlm_weight must be > 0")
        return self


class OptimConfig(_Strict):
    max_steps: int = Field(1000, ge=1, description="Optimiser steps in the run.")
    batch_size: int = Field(32, ge=2, description="Texts per micro-batch per process (in-batch negatives).")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    learning_rate: float = Field(3e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps before the cosine decay.")
    clip_norm: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    seed: int = Field(0, description="Seed of every random number generator in the run.")


class CheckpointConfig(_Strict):
    every_steps: int = Field(100, ge=1, description="Write a checkpoint every this many steps.")
    keep: int = Field(3, ge=1, description="Checkpoints kept on disk (the newest).")


class MonitorConfig(_Strict):
    eval_every_steps: int = Field(50, ge=1, description="Evaluate on the validation set every this many steps.")
    validation_sample: int = Field(256, ge=16, description="Validation texts used for the collapse checks.")
    min_dimension_std: float = Field(1e-3, ge=0, description="Collapse: mean per-dimension std below this.")
    min_effective_rank: float = Field(2.0, ge=1, description="Collapse: effective rank of embeddings below this.")


class ExportConfig(_Strict):
    model: str = Field("minilm", description="Model of the repository the trained encoder becomes a version of.")
    repository: Path = Field(Path("model_repository"), description="The Triton model repository.")
    gate_threshold: float | None = Field(
        None, description="Refuse export unless the primary metric reaches this (null = no gate)."
    )
    eval_file: Path | None = Field(
        None, description="Labeled JSONL {query, document} for recall@10/MRR@10; the primary metric is then MRR@10."
    )


class TrainConfig(_Strict):
    run_name: str = Field(description="Name of the run; its files go to output_dir/run_name.")
    output_dir: Path = Field(Path("runs"), description="Where runs keep checkpoints, metrics and plots.")
    corpus: CorpusConfig
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name


def load_config(path: Path) -> TrainConfig:
    """Read and validate a YAML run configuration; errors name the field."""
    return TrainConfig.model_validate(yaml.safe_load(path.read_text()))
