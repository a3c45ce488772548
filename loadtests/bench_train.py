"""make bench-train: training throughput and model FLOPs utilisation at sequence length 128 on real text.

Continues all-MiniLM-L6-v2 with InfoNCE over two views plus 0.1 × masked-token modelling, at
``max_seq_length`` 128, on real text: this machine's man pages (``loadtests/manpages.py``: text nobody
here wrote), else the packaged sample text. ``precision: auto`` (bf16 autocast on CUDA, fp32 on CPU),
fused AdamW on CUDA, ``--compile`` for torch.compile. Run by ``make bench-train`` under ``torchrun``, so
the loop runs under DDP exactly as on a GPU node (NCCL on CUDA, gloo on CPU).

``--warmup-steps`` steps first (compilation, allocator, caches), then ``--steps`` timed steps, the device
synchronised at both ends and read once in between (the loop's own cadence: no per-step sync). Reported:
tokens/s (real, non-padding tokens through a training pass: both views and the MLM pass), texts/s, and
MFU = model FLOPs per second / the device's peak (``loadtests/train_flops.py`` says how both are
counted; on CPU the peak is measured in the same run). The checkpoint is then exported, ONNX parity
check and all, into a throw-away repository. Writes ``loadtests/results/bench_train_<cuda|cpu>.json``.
CI never runs it; on a CPU-only machine it runs the same path, slowly (``--steps 3 --batch-size 8``).
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loadtests.manpages import MAN_ROOT, load_man_pages
from loadtests.train_flops import TrainingFlops, cuda_peak, measured_cpu_peak
from trainer.config import TrainConfig
from trainer.data.sample_text import paragraphs, sentences
from trainer.distributed import init_topology, shutdown
from trainer.encoder import PretrainingModel
from trainer.release.publish import publish
from trainer.train import Trainer

RESULTS = Path(__file__).parent / "results"
SEQUENCE_LENGTH = 128


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"


def real_text(pages: int, man_root: Path) -> tuple[list[str], str]:
    """Documents to train on and where they come from: man pages when the machine has them."""
    found = load_man_pages(pages, man_root)
    if found:
        return [f"{page.description}. {page.body}" for page in found], f"{len(found)} man pages ({man_root})"
    return [*paragraphs(), *sentences()], "the packaged sample text (no man pages on this machine)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(work: Path, corpus_file: Path, args: argparse.Namespace) -> TrainConfig:
    steps = args.warmup_steps + args.steps
    return TrainConfig.model_validate(
        {
            "run_name": "bench-train",
            "output_dir": str(work),
            "corpus": {"path": str(corpus_file), "validation_fraction": 0.05},
            "encoder": {"base_model": "minilm", "max_seq_length": SEQUENCE_LENGTH},
            "objective": {"contrastive_weight": 1.0, "mlm_weight": 0.1, "temperature": 0.05},
            "optim": {
                "max_steps": steps,
                "batch_size": args.batch_size,
                "learning_rate": 2e-5,
                "warmup_steps": max(1, steps // 10),
            },
            "precision": "auto",
            "torch_compile": args.compile,
            "checkpoint": {"every_steps": steps, "keep": 1},
            # The gate off: this bench measures speed and checks parity; bench-ssl runs the gate.
            "export": {"model": "bench", "repository": str(work / "model_repository"), "gate": {"enabled": False}},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed optimiser steps")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pages", type=int, default=600, help="man pages to read (at most)")
    parser.add_argument("--man-root", type=Path, default=MAN_ROOT)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--output", type=Path, default=None, help="default: results/bench_train_<device>.json")
    args = parser.parse_args()
    topology = init_topology()
    kind = topology.device.type
    output = args.output or RESULTS / f"bench_train_{kind}.json"
    texts, source = real_text(args.pages, args.man_root)

    with tempfile.TemporaryDirectory() as work:
        corpus_file = Path(work) / "corpus.txt"
        corpus_file.write_text("\n".join(text.replace("\n", " ") for text in texts))
        config = bench_config(Path(work), corpus_file, args)
        trainer = Trainer(config, topology)
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        assert isinstance(model, PretrainingModel)
        counter = TrainingFlops(model)
        peak, peak_source = cuda_peak(device_name()), "vendor datasheet, dense bf16"
        if kind == "cpu":
            peak = measured_cpu_peak(counter.shape.gemm_shapes(args.batch_size * SEQUENCE_LENGTH // 2))
            peak_source = "measured: best fp32 torch.mm at the model's GEMM shapes, this run"
        if kind == "cuda":
            torch.cuda.reset_peak_memory_stats()

        for _ in range(args.warmup_steps):
            trainer.advance()
        warmup = trainer.take_metrics()  # a sync: the timed steps start on an idle device
        counter.reset()
        started = time.perf_counter()
        for _ in range(args.steps):
            trainer.advance()
        timed = trainer.take_metrics()
        synchronize(topology.device)
        seconds = time.perf_counter() - started
        flops, tokens = float(counter.flops), float(counter.tokens)
        checkpoint = trainer.save()
        if topology.is_main:
            started = time.perf_counter()
            version_dir = publish(checkpoint)
            export_seconds = time.perf_counter() - started
            manifest = json.loads((version_dir / "manifest.json").read_text())
    shutdown(topology)
    if not topology.is_main:
        return

    report: dict[str, Any] = {
        "device": kind,
        "device_name": device_name(),
        "precision": "bf16 autocast" if trainer.use_bf16 else "fp32",
        "optimizer": "AdamW, fused" if trainer.optimizer.defaults.get("fused") else "AdamW, torch default",
        "torch_compile": args.compile,
        "launcher": f"torchrun, {topology.world_size} process(es) (DDP)",
        "text": source,
        "max_seq_length": SEQUENCE_LENGTH,
        "objective": "InfoNCE (two views) + 0.1 x masked-token modelling (masked rows decoded only), MiniLM base",
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "timed_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 4),
        "texts_per_s": round(args.batch_size * args.steps * topology.world_size / seconds, 1),
        "tokens_per_s": round(tokens * topology.world_size / seconds, 1),
        "tokens_counted": "real (non-padding) tokens through a training pass: two views + the MLM pass per text",
        "model_tflops_per_s": round(flops / seconds / 1e12, 4),
        "peak_tflops_per_s": round(peak / 1e12, 4) if peak else None,
        "peak_source": peak_source if peak else f"unknown device {device_name()!r}: no MFU",
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "warmup_loss": warmup["loss"],
        "timed_loss": timed["loss"],
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if kind == "cuda" else None,
        "export_seconds": round(export_seconds, 1),
        "exported_version": version_dir.name,
        "export_evaluation": manifest["evaluation"],
        "torch": torch.__version__,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
