"""make bench-train: a short real training run on this machine's accelerator, its throughput, and the export.

Continues all-MiniLM-L6-v2 with InfoNCE over two views plus masked-token modelling, on the packaged sample
text, for ``--steps`` optimiser steps, with ``precision: auto`` (bf16 autocast on CUDA, fp32 on CPU). Run by
``make bench-train`` under ``torchrun`` as one process, so the loop runs under DDP exactly as on a GPU node
(NCCL on CUDA, gloo on CPU). The last checkpoint is then exported, ONNX parity check and all, as a version
of a throw-away model repository. Writes ``loadtests/results/bench_train_<cuda|cpu>.json``: the device,
precision, tokens/s, seconds per step, first and last loss, peak GPU memory and the export's seconds.
CI never runs it; on a CPU-only machine it runs the same path, slowly (use ``--steps 10``).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data.sample_text import sentences
from trainer.release.publish import publish
from trainer.train import read_metrics, train

RESULTS = Path(__file__).parent / "results"


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None, help="default: results/bench_train_<device>.json")
    args = parser.parse_args()
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    output = args.output or RESULTS / f"bench_train_{kind}.json"

    with tempfile.TemporaryDirectory() as work:
        corpus_file = Path(work) / "corpus.txt"
        corpus_file.write_text("\n".join(sentences()))
        config = TrainConfig.model_validate(
            {
                "run_name": "bench-train",
                "output_dir": work,
                "corpus": {"path": str(corpus_file), "validation_fraction": 0.05},
                "encoder": {"base_model": "minilm", "max_seq_length": 128},
                "objective": {"contrastive_weight": 1.0, "mlm_weight": 0.1, "temperature": 0.05},
                "optim": {
                    "max_steps": args.steps,
                    "batch_size": args.batch_size,
                    "learning_rate": 2e-5,
                    "warmup_steps": max(1, args.steps // 10),
                },
                "precision": "auto",
                "checkpoint": {"every_steps": args.steps, "keep": 1},
                "monitor": {"eval_every_steps": max(1, args.steps // 4), "validation_sample": 64},
                # The gate off: this bench measures speed and checks parity; bench-ssl runs the gate.
                "export": {
                    "model": "bench",
                    "repository": str(Path(work) / "model_repository"),
                    "gate": {"enabled": False},
                },
            }
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train(config)
        train_seconds = time.perf_counter() - started
        if int(os.environ.get("RANK", "0")) != 0:  # every rank trained; one exports and reports
            return
        metrics = read_metrics(result.run_dir)
        started = time.perf_counter()
        version_dir = publish(result.last_checkpoint)
        export_seconds = time.perf_counter() - started
        manifest = json.loads((version_dir / "manifest.json").read_text())

    report: dict[str, Any] = {
        "device": kind,
        "device_name": device_name(),
        "precision": "bf16 autocast" if kind == "cuda" else "fp32",
        "launcher": "torchrun, 1 process (DDP)",
        "steps": result.steps,
        "batch_size": args.batch_size,
        "max_seq_length": 128,
        "objective": "InfoNCE (two views) + 0.1 x masked-token modelling, MiniLM base",
        "tokens_per_s": round(metrics[-1]["tokens_per_s"], 1),
        "seconds_per_step": round(train_seconds / max(1, result.steps), 4),
        "train_seconds": round(train_seconds, 1),
        "first_loss": metrics[0]["loss"],
        "last_loss": metrics[-1]["loss"],
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
