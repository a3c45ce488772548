"""The training run's configuration: a YAML file validated by these models; every field documented.

Example (``examples/run.yaml``)::

    run_name: support-tickets
    corpus: {path: data/tickets.jsonl, text_field: body}
    encoder: {base_model: minilm}
    objective: {contrastive_weight: 1.0, mlm_weight: 0.0, temperature: 0.1}
    optim: {max_steps: 500, batch_size: 32, learning_rate: 3.0e-5}
    export: {model: minilm, gate: {dev_pairs: 1000}}
"""

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo


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
    workers: int = Field(
        2,
        ge=0,
        description="DataLoader worker processes cutting views from the prepared shards ahead of each step "
        "(0 = in the training process); batches come in pinned memory on CUDA.",
    )


class ScratchEncoderConfig(_Strict):
    vocab_size: int = Field(8000, ge=100, description="WordPiece vocabulary size, trained on the corpus.")
    hidden_size: int = Field(256, ge=8, description="Width of the transformer (and of the embeddings).")
    layers: int = Field(4, ge=1, description="Transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    max_seq_length: int = Field(128, ge=8, description="Longest input in tokens.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ScratchEncoderConfig":
        if self.hidden_size % self.heads:
            divisors = [d for d in range(1, min(self.hidden_size, 64) + 1) if self.hidden_size % d == 0]
            raise ValueError(
                f"heads ({self.heads}) must divide hidden_size ({self.hidden_size}): set heads to one of "
                f"{', '.join(map(str, divisors))}, or hidden_size to a multiple of {self.heads}"
            )
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
        if self.base_model is not None and self.scratch is not None:
            raise ValueError(
                "set exactly one of encoder.base_model and encoder.scratch: base_model defaults to minilm, so to "
                "train from scratch write 'base_model: null' beside scratch; to continue a base model, remove scratch"
            )
        if self.base_model is None and self.scratch is None:
            raise ValueError(
                "set exactly one of encoder.base_model and encoder.scratch: give base_model (minilm or a folder) "
                "to continue a base model, or scratch: {hidden_size: ..., layers: ..., heads: ...} to start anew"
            )
        return self


class ViewMixConfig(_Strict):
    prefix: float | None = Field(
        None,
        ge=0,
        description="Weight of prefix views: the document truncated to the model's length, then span_crop "
        "(the views of earlier versions). null = 1 when crop and inverse_cloze are both 0, else 0.",
    )
    crop: float = Field(
        0.0,
        ge=0,
        description="Weight of independent crops (Contriever): two windows of crop_length drawn independently "
        "from anywhere in the whole, untruncated document.",
    )
    inverse_cloze: float = Field(
        0.0,
        ge=0,
        description="Weight of inverse cloze (ICT): one sentence (or the first line, when the text has several) "
        "against the rest of its document around it.",
    )

    def weights(self) -> dict[str, float]:
        """Each view kind's weight, the null prefix resolved; kinds of weight 0 left out."""
        prefix = self.prefix if self.prefix is not None else float(self.crop == 0 and self.inverse_cloze == 0)
        weights = {"prefix": prefix, "crop": self.crop, "inverse_cloze": self.inverse_cloze}
        return {kind: weight for kind, weight in weights.items() if weight > 0}

    @model_validator(mode="after")
    def _some_kind(self) -> "ViewMixConfig":
        if not self.weights():
            raise ValueError("objective.views.mix: give at least one of prefix, crop and inverse_cloze a weight > 0")
        return self


class ViewsConfig(_Strict):
    mix: ViewMixConfig = Field(
        default_factory=ViewMixConfig,
        description="Which views each text gets, drawn per text in proportion to these weights, "
        "e.g. {crop: 0.5, inverse_cloze: 0.5}.",
    )
    token_deletion: float = Field(0.0, ge=0, lt=1, description="Probability of dropping each token from a view.")
    span_crop: tuple[float, float] | None = Field(
        None,
        description="Prefix views: crop each to a random contiguous span of this fraction range, e.g. [0.5, 1.0].",
    )
    crop_length: tuple[float, float] = Field(
        (0.1, 0.5),
        description="Crop views: each window's length range, as shares of the document's tokens when both are "
        "<= 1, else in tokens; always at most what fits the model.",
    )
    inverse_cloze_keep: float = Field(
        0.1, ge=0, le=1, description="Inverse cloze: probability that the query sentence stays in its context view."
    )

    @model_validator(mode="after")
    def _crop_length_range(self) -> "ViewsConfig":
        low, high = self.crop_length
        shares = 0 < low <= high <= 1
        tokens = 1 <= low <= high and low.is_integer() and high.is_integer()
        if not (shares or tokens):
            raise ValueError(
                f"objective.views.crop_length {list(self.crop_length)}: give [low, high] with low <= high, either "
                "shares of the document in (0, 1] (e.g. [0.1, 0.5]) or whole token counts (e.g. [16, 128])"
            )
        return self


class ObjectiveConfig(_Strict):
    contrastive_weight: float = Field(1.0, ge=0, description="Weight of InfoNCE over two views (SimCSE).")
    mlm_weight: float = Field(0.0, ge=0, description="Weight of masked-token modelling.")
    temperature: float = Field(
        0.1,
        gt=0,
        description="InfoNCE temperature. 0.1 by measurement (README, make bench-ssl): against 0.05 (SimCSE's), "
        "+1.5 points MRR@10 on the man-page set at the same steps and time.",
    )
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked for MLM.")
    views: ViewsConfig = Field(default_factory=ViewsConfig, description="How the two contrastive views differ.")
    contrastive_batch: int | None = Field(
        None,
        ge=2,
        description=(
            "Texts scored together by InfoNCE, over all processes: each text's negatives are the other "
            "contrastive_batch − 1. A multiple of optim.batch_size × processes: each process reads "
            "contrastive_batch / (batch_size × processes) micro-batches into one. Null = one micro-batch per "
            "process (batch_size × processes). Every process scores its texts against every process's views."
        ),
    )
    grad_cache_chunk: int | None = Field(
        None,
        ge=1,
        description=(
            "GradCache: embed the contrastive batch in chunks of this many texts, first without a graph, then "
            "again with one to back-propagate the cached embedding gradients. Memory: the activations of one "
            "chunk plus the embeddings of the whole batch (2 × batch × dimension floats), at the cost of a "
            "second forward. Null = one forward of the whole per-process batch, with its activations."
        ),
    )
    false_negative_threshold: float | None = Field(
        None,
        gt=-1,
        le=1,
        description=(
            "Drop from InfoNCE's denominator the in-batch pairs whose cosine under the initial encoder (the base "
            "model, or the scratch initialisation) exceeds this: near-duplicates are not negatives. Costs one "
            "no-grad forward of a frozen copy per batch. Null = off; texts of one document are always masked."
        ),
    )

    @model_validator(mode="after")
    def _some_objective(self) -> "ObjectiveConfig":
        if self.contrastive_weight == 0 and self.mlm_weight == 0:
            raise ValueError("at least one of contrastive_weight and mlm_weight must be > 0")
        return self


class OptimConfig(_Strict):
    max_steps: int = Field(1000, ge=1, description="Optimiser steps in the run.")
    batch_size: int = Field(32, ge=2, description="Texts per micro-batch per process (in-batch negatives).")
    grad_accumulation: int = Field(
        1, ge=1, description="Micro-batches per optimiser step; the effective batch is batch_size × this × processes."
    )
    learning_rate: float = Field(3e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps before the cosine decay.")
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="Clip the global gradient norm of every trained parameter (encoder and MLM head) to this.",
    )
    seed: int = Field(0, description="Seed of every random number generator in the run.")


class CheckpointConfig(_Strict):
    every_steps: int = Field(100, ge=1, description="Write a checkpoint every this many steps.")
    keep: int = Field(3, ge=1, description="Checkpoints kept on disk (the newest); older ones are deleted.")


class MonitorConfig(_Strict):
    eval_every_steps: int = Field(50, ge=1, description="Evaluate on the validation set every this many steps.")
    log_every_steps: int = Field(
        10,
        ge=1,
        description="Read the loss and gradient norm from the device (their means since the last row), check on every "
        "process that they are finite and write a metrics row every this many steps, and at every evaluation and "
        "checkpoint step and the last one; other steps never wait for the device.",
    )
    validation_sample: int = Field(256, ge=16, description="Validation texts used for the collapse checks.")
    min_dimension_std: float = Field(
        1e-3, ge=0, description="Collapse guard: stop the run when the mean per-dimension std falls below this."
    )
    min_effective_rank: float = Field(
        2.0, ge=1, description="Collapse guard: stop the run when the effective rank of embeddings falls below this."
    )


class ExportGateConfig(_Strict):
    enabled: bool = Field(
        True,
        description="Refuse export unless the candidate beats its parent version on the dev set: the lower bound "
        "of the paired-bootstrap 95 % interval of the MRR@10 difference (candidate − parent) must be > 0. "
        "false = export without comparing (the manifest says gate off).",
    )
    dev_pairs: int = Field(
        1000,
        ge=10,
        description="Self-supervised dev set (no export.eval_file): at most this many (sentence → rest of its "
        "document) pairs cut from held-out corpus documents (the validation split, never trained on).",
    )
    resamples: int = Field(2000, ge=100, description="Paired-bootstrap resamples of the dev set's queries.")
    seed: int = Field(0, description="Seed of the dev set's query sentences and of the bootstrap.")


# The ONNX graph a version is written as (trainer.release.export).
ExportGraph = Literal["unpadded", "fused", "traced"]


class ExportConfig(_Strict):
    model: str = Field("minilm", description="Model of the repository the trained encoder becomes a version of.")
    repository: Path = Field(Path("model_repository"), description="The Triton model repository.")
    graph: ExportGraph = Field(
        "unpadded",
        description="The version's ONNX graph. unpadded: weight products on real tokens only (BERT encoders; "
        "others get fused); fused: padded, with ONNX Runtime's fused attention; traced: as torch traces it.",
    )
    gate: ExportGateConfig = Field(
        default_factory=ExportGateConfig,
        description="The export gate: the candidate against its parent, on export.eval_file or a self-supervised "
        "dev set.",
    )
    eval_file: Path | None = Field(
        None,
        description="Labeled JSONL {query, document}: the gate's dev set instead of the self-supervised one "
        "(MRR@10, recall@10).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_absolute_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and "gate_threshold" in data:
            raise ValueError(
                "export.gate_threshold was removed: the gate no longer reads an absolute threshold, it compares the "
                "candidate with its parent version (export.gate, see the README); delete the key"
            )
        return data


class ReleaseGateConfig(_Strict):
    min_delta: float = Field(
        0.0,
        description="The release's gate against the stable version: the lower bound of the 95 % interval of the "
        "MRR@10 difference (trained − stable, on export.eval_file or the self-supervised dev set) must exceed "
        "this (negative: a loss this large is tolerated); otherwise the release stops and nothing is exported.",
    )


class CanaryConfig(_Strict):
    steps: list[int] = Field(
        default_factory=lambda: [5, 25, 50, 100], description="Canary weights in percent the rollout climbs."
    )
    shadow_percent: float = Field(0.0, ge=0, le=100, description="Percent of stable requests mirrored to the canary.")
    analysis: dict[str, Any] = Field(
        default_factory=dict,
        description="The rollout analysis settings (interval_s, passes_to_step, failures_to_rollback, "
        "max_wait_intervals, thresholds: see PUT /v1/rollouts); analysis is always enabled for a release.",
    )
    timeout_s: float = Field(
        6 * 3600.0, gt=0, description="A canary still undecided after this long is rolled back by the release."
    )


class ReleaseConfig(_Strict):
    gate: ReleaseGateConfig = Field(default_factory=ReleaseGateConfig, description="The gate against stable.")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="The canary rollout the release starts.")
    serve_timeout_s: float = Field(
        600.0, gt=0, description="How long the gateway may take to serve the exported version (hot-loading)."
    )
    poll_s: float = Field(5.0, gt=0, description="Seconds between two looks at the gateway while waiting.")


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking (and registry) store, e.g. sqlite:///runs/mlflow.db, file:./mlruns or "
        "http://mlflow:5000 (needs pip install 'embedserve[mlflow]'); null = no tracking.",
    )
    experiment: str = Field("embedserve", description="MLflow experiment the run is logged under (made if missing).")
    registered_model: str | None = Field(
        None, description="MLflow registered model exported versions are registered as (null = the exported model)."
    )


class TrainConfig(_Strict):
    run_name: str = Field(description="Name of the run; its files go to output_dir/run_name.")
    output_dir: Path = Field(Path("runs"), description="Where runs keep checkpoints, metrics and plots.")
    corpus: CorpusConfig = Field(description="The unlabeled text to train on and how it is prepared.")
    encoder: EncoderConfig = Field(
        default_factory=EncoderConfig, description="The encoder to train: a base model to continue, or a new one."
    )
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="The self-supervised losses and their weights."
    )
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="Optimiser, schedule, batch size and length of the run."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = autocast everywhere."
    )
    torch_compile: bool = Field(
        False,
        description="Compile the encoder's transformer with torch.compile for training (pays off on a GPU after a "
        "minute or more of compilation; checkpoints and export are unchanged).",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="How often checkpoints are written and how many are kept."
    )
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="Validation evaluation and the collapse guard's thresholds."
    )
    export: ExportConfig = Field(
        default_factory=ExportConfig,
        description="Where `python -m trainer export` writes the version, and its gate against the parent.",
    )
    release: ReleaseConfig = Field(
        default_factory=ReleaseConfig,
        description="What `python -m trainer release` does after training: its gate against stable and its canary.",
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking in MLflow: the run's params, metrics and plots; exported versions registered.",
    )

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names each bad field and how to fix it."""


def load_config(path: Path) -> TrainConfig:
    """Read and validate a YAML run configuration; ConfigError names every bad field and how to fix it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of settings (run_name: ..., corpus: ...), got {type(raw).__name__}"
        )
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        problems = [_explain(problem) for problem in error.errors()]
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems)) from None


def _explain(problem: Any) -> str:
    location = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        section, key = problem["loc"][:-1], problem["loc"][-1]
        model = _model_at(section)
        known = ", ".join(model.model_fields) if model else "?"
        where = ".".join(map(str, section)) or "the top level"
        return (
            f"{location}: unknown key '{key}' in {where} (a misspelling?); its keys are: {known}. "
            "See 'Training configuration reference' in the README."
        )
    message = str(problem["msg"]).removeprefix("Value error, ")
    return f"{location or 'config'}: {message}"


def _model_at(section: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = TrainConfig
    for name in section:
        field = model.model_fields.get(str(name)) if model else None
        model = _section_model(field.annotation) if field else None
    return model


# -- the README's configuration reference, generated from the models so it cannot drift -------------


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (also through ``X | None``), or None for a plain value."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return " \\| ".join(f"`{arg}`" for arg in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {Path: "path", str: "string", int: "int", float: "float", bool: "bool"}.get(annotation, str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "(section defaults)"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def reference_rows(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, meaning) of every field of ``model`` and of its sections, in order."""
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        rows.append((dotted, _type_name(field.annotation), _default(field), field.description or ""))
        section = _section_model(field.annotation)
        if section is not None:
            rows.extend(reference_rows(section, f"{dotted}."))
    return rows


def reference_table() -> str:
    """The README's "Training configuration reference" table (markdown)."""
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {kind} | {default} | {meaning} |" for name, kind, default, meaning in reference_rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")
