"""The training loop: self-supervised pretraining of a sentence encoder on unlabeled text.

Objectives: InfoNCE over two views of each text with in-batch negatives (SimCSE dropout twins,
optionally with token deletion / span cropping), masked-token modelling, or a weighted sum.
AdamW (fused on CUDA) with warm-up then cosine decay, gradient clipping and accumulation, bf16
autocast on CUDA, optional torch.compile, DDP under torchrun. Steps never wait for the device: loss
and gradient norm are read, and checked, at metrics rows only. Checkpoints every N steps restore
the run exactly (weights, optimiser, scheduler, scaler, every RNG, data position). A non-finite
loss or a collapsing encoder stops the run with the reason; the last good checkpoint stays.
"""

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from service.models.tokenization import TextTokenizer, pad_batch
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.contrastive import micro_batches_per_contrastive_batch
from trainer.data.loader import Batch, ContrastiveBatches, batch_stream
from trainer.data.order import BatchOrder, DataPosition
from trainer.distributed import Topology, all_ranks_agree, gather_to_all, init_topology, rank_seed, shutdown
from trainer.encoder import MaskedLmHead, PretrainingModel
from trainer.metrics_window import MetricsWindow, NonFiniteStep
from trainer.monitor import check_collapse
from trainer.plots import plot_metrics
from trainer.rng import restore_rng, rng_state, seed_everything
from trainer.run_inputs import build_encoder, dataset_summary, fused_adamw, load_corpus, warmup_cosine
from trainer.step_loss import StepLoss
from trainer.tracking import RunTracker, start_tracking

log = logging.getLogger(__name__)


class TrainingTimeSpent(Exception):
    """The run reached its time limit (a release's training budget); the checkpoint of the step it stopped at
    is written."""


class NonFiniteLoss(Exception):
    pass


METRICS_FILE = "metrics.jsonl"  # one JSON row per logged step (monitor.log_every_steps), in each run's folder


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, step by step."""
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    last_checkpoint: Path
    steps: int
    final_loss: float


class Trainer:
    def __init__(self, config: TrainConfig, topology: Topology, tracker: RunTracker | None = None) -> None:
        self.config = config
        self.topology = topology
        self.tracker = tracker or RunTracker()
        seed_everything(config.optim.seed)  # the run seed while building: every rank starts from the same weights
        self.corpus = load_corpus(config, topology, progress=topology.is_main)
        if topology.is_main:
            log.info("corpus prepared", extra=dataset_summary(self.corpus))
        self.encoder, self.tokenizer_dir = build_encoder(config, self.corpus)
        self.tokenizer = TextTokenizer(self.tokenizer_dir / "tokenizer.json", self.encoder.max_seq_length)
        self.encoder.to(topology.device)
        self.mlm_head = MaskedLmHead(self.encoder).to(topology.device) if config.objective.mlm_weight > 0 else None
        if config.torch_compile:
            if config.objective.grad_cache_chunk is not None:
                # GradCache replays each chunk's dropout from a restored RNG state: compiled dropout must draw
                # from torch's generator as eager dropout does, not from inductor's own.
                inductor_config.fallback_random = True
            # In place (nn.Module.compile): parameter names, state dicts, checkpoints and export stay as they are.
            self.encoder.transformer.compile()
        self.model: nn.Module = PretrainingModel(self.encoder, self.mlm_head)
        if topology.distributed:
            self.model = DistributedDataParallel(
                self.model, device_ids=[topology.local_rank] if topology.device.type == "cuda" else None
            )
        # The head's decoder is the encoder's word embeddings (tied): listed once, with the encoder's.
        self.trained_parameters = list(self.encoder.parameters()) + (
            [p for n, p in self.mlm_head.named_parameters() if not n.startswith("word_embeddings")]
            if self.mlm_head
            else []
        )
        self.optimizer = torch.optim.AdamW(
            self.trained_parameters,
            lr=config.optim.learning_rate,
            weight_decay=config.optim.weight_decay,
            fused=fused_adamw(topology.device),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.optim.warmup_steps, config.optim.max_steps)
        )
        self.use_bf16 = config.precision == "bf16" or (config.precision == "auto" and topology.device.type == "cuda")
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one shape everywhere.
        self.scaler = torch.amp.GradScaler(enabled=False)
        # Each rank its own streams (dropout, views, masking), so no two draw the same masks.
        self.seed = rank_seed(config.optim.seed, topology.rank)
        seed_everything(self.seed)
        self.batch_order = BatchOrder(
            len(self.corpus.train),
            config.optim.batch_size,
            seed=config.optim.seed,
            rank=topology.rank,
            world_size=topology.world_size,
        )
        self.batches = ContrastiveBatches(
            self.corpus.train,
            self.batch_order,
            micro_batches_per_contrastive_batch(
                config.objective.contrastive_batch, config.optim.batch_size, topology.world_size
            ),
            config.objective.views if config.objective.contrastive_weight > 0 else None,
            self.encoder.max_seq_length,
            self.tokenizer.pad_id,
            config.optim.seed,
        )
        self.step_loss = StepLoss(
            config, self.corpus, self.model, self.encoder, self.mlm_head, self.tokenizer, topology.device, self.use_bf16
        )
        self.position = DataPosition()
        self._batch_stream: Iterator[Batch] | None = None  # from self.position; started on first use
        self.step = 0
        self.run_dir = config.run_dir
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / "summary.json"
        self.tokens_seen = 0
        self.started = time.perf_counter()
        self.window = MetricsWindow(topology.device)  # loss and gradient norm since the last metrics row

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The run's state, every rank's RNG streams included: a collective, called on every rank."""
        return {
            "step": self.step,
            "position": self.position.to_dict(),
            "encoder": self.encoder.state_dict(),
            "mlm_head": self.mlm_head.state_dict() if self.mlm_head else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": gather_to_all(rng_state(), self.topology),  # indexed by rank
            "world_size": self.topology.world_size,
            "global_batch": self.global_batch,
            "config": self.config.model_dump(mode="json"),
            "dataset_fingerprint": self.corpus.fingerprint,
            "dataset": dataset_summary(self.corpus),
            "tokenizer_dir": str(self.tokenizer_dir),
            "tracking": self.tracker.reference(),
        }

    @property
    def global_batch(self) -> int:
        """Texts per optimiser step, over every process."""
        optim = self.config.optim
        return optim.batch_size * optim.grad_accumulation * self.topology.world_size

    def restore(self, state: dict[str, Any], allow_config_change: bool = False) -> None:
        """Continue from a checkpoint's state: this rank takes its own RNG streams back. A checkpoint of another
        dataset is refused; one of another world size, global batch or objective too, unless
        ``allow_config_change``."""
        if state["dataset_fingerprint"] != self.corpus.fingerprint:
            raise ValueError("the checkpoint was trained on another dataset (fingerprints differ); resume refused")
        changes = self._config_changes(state)
        if changes and not allow_config_change:
            raise ValueError(
                f"the checkpoint was trained with another {'; '.join(changes)}: resume refused "
                "(pass --allow-config-change to continue anyway)"
            )
        if changes and self.topology.is_main:
            log.warning("resuming with a changed configuration", extra={"changes": changes})
        self.encoder.load_state_dict(state["encoder"])
        if self.mlm_head and state["mlm_head"]:
            self.mlm_head.load_state_dict(state["mlm_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        saved_rng = state["rng"]
        if self.topology.rank < len(saved_rng):
            restore_rng(saved_rng[self.topology.rank])
        # else: a rank the checkpointed run did not have keeps its fresh streams (allowed world-size change)
        self.position = DataPosition.from_dict(state["position"])
        if self.position.batch >= self.batch_order.batches_per_epoch:  # fewer batches per epoch now (allowed)
            self.position = DataPosition(self.position.epoch + 1, 0)
        self._batch_stream = None  # batches from the restored position on
        self.step = int(state["step"])

    def _config_changes(self, state: dict[str, Any]) -> list[str]:
        """What differs between the checkpointed run and this one among world size, global batch, objective."""
        changes = []
        if state["world_size"] != self.topology.world_size:
            changes.append(f"world size ({state['world_size']} processes, now {self.topology.world_size})")
        if state["global_batch"] != self.global_batch:
            changes.append(f"global batch ({state['global_batch']} texts per step, now {self.global_batch})")
        # Read through today's schema: an objective option added since then takes its default on both sides.
        saved_objective = self.config.objective.model_validate(state["config"]["objective"]).model_dump(mode="json")
        objective = self.config.objective.model_dump(mode="json")
        differing = sorted(
            key for key in objective.keys() | saved_objective.keys() if objective.get(key) != saved_objective.get(key)
        )
        if differing:
            changes.append(f"objective ({', '.join(differing)} differ)")
        return changes

    # -- data ----------------------------------------------------------------------------------
    def next_contrastive_batch(self) -> Batch:
        """This process's share of the next contrastive batch, in a seeded per-epoch order, on the device: cut
        from the shards by ``corpus.workers`` DataLoader processes while the previous steps train."""
        if self._batch_stream is None:
            device = self.topology.device
            self._batch_stream = batch_stream(
                self.batches, self.position, self.config.corpus.workers, pin_memory=device.type == "cuda"
            )
        batch = next(self._batch_stream).to(self.topology.device)
        self.position = batch.after
        return batch

    def _embed(self, token_ids: list[list[int]]) -> torch.Tensor:
        batch = pad_batch(token_ids, self.tokenizer.pad_id)
        device = self.topology.device
        vectors: torch.Tensor = self.encoder(
            torch.from_numpy(batch.input_ids).to(device), torch.from_numpy(batch.attention_mask).to(device)
        )
        return vectors

    # -- loop ----------------------------------------------------------------------------------
    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """DDP's no_sync() on a non-final micro-batch: gradients accumulate locally and are all-reduced once, in
        the last micro-batch's backward (the result is the same, with one all-reduce per step instead of N)."""
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def advance(self) -> None:
        """One optimiser step over ``optim.grad_accumulation`` micro-batches, without waiting for the device: its
        loss and gradient norm go to ``self.window``, which ``take_metrics`` reads and checks.

        Each micro-batch's loss is divided by the number of micro-batches, so the accumulated gradient
        is that of their mean."""
        optim = self.config.optim
        self.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.topology.device)
        cached = self.config.objective.grad_cache_chunk is not None and self.config.objective.contrastive_weight > 0
        for index in range(optim.grad_accumulation):
            # DDP all-reduces once per step (on the last micro-batch); GradCache's own per-chunk skipping nests inside.
            with self._gradient_sync(last=index == optim.grad_accumulation - 1):
                batch = self.next_contrastive_batch()
                if cached:  # backward inside, chunk by chunk
                    loss = self.step_loss.cached_backward(batch, 1 / optim.grad_accumulation)
                else:
                    loss = self.step_loss.loss(batch) / optim.grad_accumulation
                    loss.backward()  # type: ignore[no-untyped-call]
                step_loss = step_loss + loss.detach()
                self.tokens_seen += batch.tokens
        # Every trained parameter, the MLM head's included, under one global norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters, optim.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.window.add(self.step, step_loss, grad_norm)

    def take_metrics(self) -> dict[str, Any]:
        """The metrics row of the steps since the last one (mean loss and gradient norm), read from the device.

        A collective, called at the same steps on every process: raises NonFiniteLoss on every process when
        any had a non-finite loss or gradient norm since the last row, naming the first such step."""
        means = self.window.read()
        if not all_ranks_agree(means.first_non_finite is None, self.topology):
            self._stop_on_non_finite(gather_to_all(means.first_non_finite, self.topology))
        return {
            "step": self.step,
            "loss": means.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": means.grad_norm,
            "tokens_per_s": self.tokens_seen * self.topology.world_size / (time.perf_counter() - self.started),
        }

    def _stop_on_non_finite(self, reports: list[NonFiniteStep | None]) -> None:
        """Raise NonFiniteLoss naming the earliest non-finite step of any rank (``reports``, indexed by rank); at the
        same step a rank whose loss was not finite is named before one whose gradient norm alone was not (under DDP
        one rank's NaN loss makes every rank's all-reduced gradients NaN)."""
        rank, first = min(
            ((rank, report) for rank, report in enumerate(reports) if report is not None),
            key=lambda r: (r[1].step, math.isfinite(r[1].loss)),
        )
        what = (
            f"loss became {first.loss}" if not math.isfinite(first.loss) else f"gradient norm became {first.grad_norm}"
        )
        where = f" on rank {rank}" if self.topology.distributed else ""
        raise NonFiniteLoss(
            f"{what} at step {first.step}{where}; the run stopped and the last good checkpoint in "
            f"{self.run_dir / 'checkpoints'} is kept. Lower the learning rate or check the data."
        )

    def train_step(self) -> dict[str, Any]:
        """One optimiser step and its metrics record (``advance`` then ``take_metrics``: waits for the device)."""
        self.advance()
        return self.take_metrics()

    def run(self, time_limit_s: float | None = None) -> TrainResult:
        """Train to max_steps; with ``time_limit_s``, stop at the first checkpoint written past that many seconds
        (TrainingTimeSpent).

        Metrics rows (and the finite check) come every ``monitor.log_every_steps`` steps and at every evaluation
        and checkpoint step, before the evaluation and the checkpoint: a non-finite state is never checkpointed."""
        optim, monitor = self.config.optim, self.config.monitor
        main = self.topology.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._keep_metrics_up_to_step()
            self._write_summary()
            self.tracker.set_tag("dataset_fingerprint", self.corpus.fingerprint)
        progress = tqdm(total=optim.max_steps, initial=self.step, disable=not main, desc=self.config.run_name)
        last_checkpoint = self.run_dir / "checkpoints"
        loss_value = float("nan")
        self.tokens_seen, self.started = 0, time.perf_counter()
        while self.step < optim.max_steps:
            self.advance()
            progress.update(1)
            last = self.step == optim.max_steps
            evaluate = self.step % monitor.eval_every_steps == 0 or last
            checkpoint = self.step % self.config.checkpoint.every_steps == 0 or last
            if not (evaluate or checkpoint or self.step % monitor.log_every_steps == 0):
                continue
            record = self.take_metrics()
            loss_value = record["loss"]
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if evaluate:
                record.update(self.monitor())
            if main:
                with self.metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                self.tracker.log_step(record)
            if checkpoint:
                last_checkpoint = self.save()
                # Collective: every rank stops at the same checkpoint when any of them is past the limit.
                spent = time_limit_s is not None and time.perf_counter() - self.started > time_limit_s
                if self.step < optim.max_steps and not all_ranks_agree(not spent, self.topology):
                    raise TrainingTimeSpent(
                        f"training stopped at step {self.step} of {optim.max_steps}: its time limit of "
                        f"{(time_limit_s or 0) / 3600:.3f} h is spent; its checkpoint is kept"
                    )
        progress.close()
        if main:
            curves = plot_metrics(read_metrics(self.run_dir), self.run_dir / "curves.png")
            self._write_summary({"steps": self.step, "final_loss": loss_value, "last_checkpoint": str(last_checkpoint)})
            self.tracker.finish([curves, self.summary_path])
        return TrainResult(self.run_dir, last_checkpoint, self.step, loss_value)

    def _keep_metrics_up_to_step(self) -> None:
        """Drop metrics rows past the step the run starts from: a resumed run writes those steps again."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            step = _metrics_step(line)
            if step is not None and step <= self.step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _write_summary(self, result: dict[str, Any] | None = None) -> None:
        summary = {"run_name": self.config.run_name, "dataset": dataset_summary(self.corpus), "result": result}
        self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    def monitor(self) -> dict[str, float]:
        """Collapse checks on a validation sample; raises CollapseDetected with the explanation."""
        sample = self.corpus.validation[: self.config.monitor.validation_sample]
        if len(sample) < 2:
            return {}
        self.encoder.eval()
        token_ids = self.tokenizer.encode(sample, truncate=True)
        with torch.no_grad():
            vectors = torch.cat([self._embed(token_ids[i : i + 64]).float() for i in range(0, len(sample), 64)])
            self.encoder.train()  # a second dropout pass gives each text a positive view for alignment
            twins = torch.cat([self._embed(token_ids[i : i + 64]).float() for i in range(0, len(sample), 64)])
        self.encoder.train()
        report = check_collapse(vectors.cpu(), twins.cpu(), self.config.monitor)
        return {f"val_{name}": value for name, value in report.items()}

    def save(self) -> Path:
        """Write the step's checkpoint (rank 0 writes it; a collective: every rank's RNG streams go in it)."""
        path = self.run_dir / "checkpoints"
        state = self.state()
        if self.topology.is_main:
            path = save_checkpoint(path, self.step, state, self.config.checkpoint.keep)
            log.info("checkpoint written", extra={"step": self.step, "path": str(path)})
        return path


def _metrics_step(line: str) -> int | None:
    """The step of one metrics.jsonl row; None for a blank or torn line (a run killed mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def train(
    config: TrainConfig,
    resume: Path | None = None,
    time_limit_s: float | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Run (or resume) the training described by ``config``, for at most about ``time_limit_s`` seconds; tracked in
    MLflow when ``tracking.mlflow_uri`` is set. A resume with another world size, global batch or objective than
    the checkpoint's is refused unless ``allow_config_change``.

    A resumed run continues the MLflow run its checkpoint names; a run that raises is marked FAILED there."""
    topology = init_topology()
    failed = True
    try:
        state = load_checkpoint(resume) if resume is not None else None
        tracker = start_tracking(config, topology.is_main, state.get("tracking") if state else None)
        try:
            trainer = Trainer(config, topology, tracker)
            if state is not None:
                trainer.restore(state, allow_config_change)
                log.info("resumed", extra={"step": trainer.step, "checkpoint": str(resume)})
            result = trainer.run(time_limit_s)
            failed = False
            return result
        except BaseException as error:
            tracker.fail(error)
            raise
    finally:
        shutdown(topology, after_error=failed)
