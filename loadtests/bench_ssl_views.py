"""make bench-ssl-views: which contrastive views teach most, on whole documents nobody here wrote?

The same dev set as ``make bench-ssl`` (man pages: query = the NAME line's description, relevant document = the
rest of the page), but the MiniLM base is adapted on the **whole pages** as documents, once per view objective,
with the same steps, batch, learning rate and seed: prefix views (the document truncated to the model's length,
then span-cropped: the default), independent crops from anywhere in the page, inverse cloze (a sentence against
the rest of its page), and mixes. Base and every adapted encoder are evaluated in the same run over every page.
Writes ``loadtests/results/bench_ssl_views.json``: per objective, recall@10, MRR@10, training seconds and the
first and last loss. Measures; it has no pass/fail verdict (the defaults follow what it shows).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loadtests.bench_ssl import ADAPTED_LR, MIN_PAGES, evaluate
from loadtests.manpages import MAN_ROOT, load_man_pages
from trainer.config import TrainConfig
from trainer.encoder import load_base, packaged_minilm
from trainer.release.evaluate import LabeledPair
from trainer.release.publish import load_trained
from trainer.train import read_metrics, train

RESULTS = Path(__file__).parent / "results" / "bench_ssl_views.json"
# The view settings compared; token deletion and span crop as bench-ssl's own run uses them.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "prefix": {"span_crop": [0.3, 0.7], "token_deletion": 0.05},
    "crop+inverse_cloze": {"mix": {"crop": 0.5, "inverse_cloze": 0.5}, "token_deletion": 0.05},
    "prefix+inverse_cloze": {
        "mix": {"prefix": 0.5, "inverse_cloze": 0.5},
        "span_crop": [0.3, 0.7],
        "token_deletion": 0.05,
    },
    "crop": {"mix": {"crop": 1.0}, "token_deletion": 0.05},
}


def views_config(work: Path, corpus_file: Path, name: str, views: dict[str, Any], steps: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "run_name": name.replace("+", "-"),
            "output_dir": str(work),
            "corpus": {"path": str(corpus_file), "validation_fraction": 0.02},
            "encoder": {"base_model": "minilm", "max_seq_length": 128},
            "objective": {"contrastive_weight": 1.0, "temperature": 0.05, "views": views},
            "optim": {
                "max_steps": steps,
                "batch_size": 32,
                "learning_rate": ADAPTED_LR,
                "warmup_steps": max(1, steps // 10),
            },
            "checkpoint": {"every_steps": steps, "keep": 1},
            "monitor": {"eval_every_steps": steps, "validation_sample": 64},
            "export": {"gate": {"enabled": False}},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1500, help="man pages: the dev set and the training documents")
    parser.add_argument("--steps", type=int, default=60, help="adaptation steps per objective")
    parser.add_argument(
        "--objectives", default=",".join(OBJECTIVES), help="comma-separated, of: " + ", ".join(OBJECTIVES)
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--man-root", type=Path, default=MAN_ROOT)
    args = parser.parse_args()
    names = args.objectives.split(",")
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown objectives {unknown}; choose from {', '.join(OBJECTIVES)}")
    pages = load_man_pages(args.pages, root=args.man_root)
    if len(pages) < MIN_PAGES:
        print(
            f"bench-ssl-views skipped: only {len(pages)} man pages (it needs {MIN_PAGES}); {args.output} left as it was"
        )
        return
    pairs = [LabeledPair(query=page.description, document=page.body) for page in pages]
    report: dict[str, Any] = {"pages": len(pages), "steps": args.steps, "batch_size": 32, "learning_rate": ADAPTED_LR}
    report["base"] = evaluate(load_base(packaged_minilm()), pairs)
    print(f"base: {report['base']}", flush=True)
    report["objectives"] = {}
    with tempfile.TemporaryDirectory() as work:
        corpus_file = Path(work) / "pages.jsonl"
        corpus_file.write_text("".join(json.dumps({"text": page.body}) + "\n" for page in pages))
        for name in names:
            config = views_config(Path(work), corpus_file, name, OBJECTIVES[name], args.steps)
            started = time.perf_counter()
            result = train(config)
            seconds = time.perf_counter() - started
            metrics = read_metrics(result.run_dir)
            scores = evaluate(load_trained(result.last_checkpoint).encoder, pairs)
            report["objectives"][name] = {
                "views": OBJECTIVES[name],
                **scores,
                "train_seconds": round(seconds, 1),
                "first_loss": metrics[0]["loss"],
                "last_loss": metrics[-1]["loss"],
            }
            print(f"{name}: {report['objectives'][name]}", flush=True)
    report |= {"torch": torch.__version__, "python": sys.version.split()[0]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
