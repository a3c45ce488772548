"""What a training run is built from: its prepared corpus (prepared first when missing or stale), its encoder
(a base model continued, or a scratch one), the folder of its tokenizer, and its optimiser's settings."""

import math
from pathlib import Path
from typing import Any

import torch

from service.models.tokenization import TextTokenizer
from trainer.config import TrainConfig
from trainer.data.prepare import PreparedCorpus, open_current, open_prepared, prepare_corpus
from trainer.distributed import Topology, barrier
from trainer.encoder import BaseModelFolder, SentenceEncoder, from_scratch, load_base, packaged_minilm


def tokenizer_source(config: TrainConfig) -> tuple[Path, int | None]:
    """The folder of the run's tokenizer, and the vocabulary size to train one there (scratch encoders)."""
    if config.encoder.base_model is not None:
        return resolve_base(config.encoder.base_model).path, None
    assert config.encoder.scratch is not None  # the config validator guarantees one of the two
    return config.run_dir / "tokenizer", config.encoder.scratch.vocab_size


def load_corpus(config: TrainConfig, topology: Topology | None = None, progress: bool = False) -> PreparedCorpus:
    """The run's prepared corpus (``run_dir/corpus``), prepared first by rank 0 when it is missing or stale
    (its corpus files, settings or tokenizer changed) while the other ranks wait; a clear error when it is
    too small to train on."""
    folder = config.run_dir / "corpus"
    tokenizer_dir, vocab_size = tokenizer_source(config)
    if (topology is None or topology.is_main) and open_current(config.corpus, folder, tokenizer_dir) is None:
        prepare_corpus(config.corpus, folder, tokenizer_dir, vocab_size, progress=progress)
    if topology is not None:
        barrier(topology)  # the other ranks open the folder only once rank 0 has renamed it into place
    corpus = open_prepared(folder)
    assert corpus is not None
    return corpus


def dataset_summary(corpus: PreparedCorpus) -> dict[str, Any]:
    """What preparation did to the corpus, in counts only (never text): for logs, summary and manifest."""
    report = corpus.report
    return {
        "dataset_fingerprint": corpus.fingerprint,
        "documents_read": report.documents_read,
        "empty_or_short_dropped": report.empty_or_short_dropped,
        "duplicates_dropped": report.duplicates_dropped,
        "kept": report.kept,
        "train": len(corpus.train),
        "validation": len(corpus.validation),
        "pii_replaced": dict(report.pii_replaced),
    }


def resolve_base(base_model: str) -> BaseModelFolder:
    if base_model == "minilm":
        return packaged_minilm()
    folder = BaseModelFolder(Path(base_model))
    if not (folder.path / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {folder.path} has no config.json (a Hugging Face layout)")
    return folder


def build_encoder(config: TrainConfig, corpus: PreparedCorpus) -> tuple[SentenceEncoder, Path]:
    """The encoder to train and the folder holding its tokenizer files (the prepared corpus's tokenizer: a
    scratch one is trained by the prepare step)."""
    encoder_config = config.encoder
    if encoder_config.base_model is not None:
        encoder = load_base(resolve_base(encoder_config.base_model))
        if encoder_config.max_seq_length:
            encoder.max_seq_length = encoder_config.max_seq_length
        return encoder, corpus.tokenizer_dir
    scratch = encoder_config.scratch
    assert scratch is not None  # the config validator guarantees one of the two
    vocab_size = TextTokenizer(corpus.tokenizer_dir / "tokenizer.json", scratch.max_seq_length).vocab_size
    encoder = from_scratch(
        vocab_size, scratch.hidden_size, scratch.layers, scratch.heads, scratch.max_seq_length, seed=config.optim.seed
    )
    return encoder, corpus.tokenizer_dir


def fused_adamw(device: torch.device) -> bool | None:
    """AdamW's ``fused`` for ``device``: True on CUDA (one kernel updates every parameter instead of several
    launches per tensor), None elsewhere (torch's default implementation)."""
    return True if device.type == "cuda" else None


def warmup_cosine(warmup_steps: int, max_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
