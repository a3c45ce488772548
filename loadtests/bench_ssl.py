"""make bench-ssl: does self-supervised adaptation pay off on text nobody here wrote?

Dev set: the man pages installed on this machine (query = the one-line NAME description, relevant
document = the rest of the page). The MiniLM base is adapted with contrastive self-supervision on
the page texts alone (passages; never the queries) twice, with the same steps, batch, learning rate and
seed: once with the trainer's default objective (dropout twins of the truncated text, temperature 0.1), once
with the previous default (the same at temperature 0.05, SimCSE's); base and both adapted encoders are
evaluated in the same run on recall@10 and MRR@10 over every page. Then a deliberately bad run (the
default at learning rate 1e-3) goes through the export gate (the one publish() runs: against the MiniLM
base, on a self-supervised dev set of the runs' held-out passages), and so does the default run. Writes
loadtests/results/bench_ssl.json (scores, whether the default beats the previous one, gate decisions and
intervals), and exits 1 (saying why) when the default run does not beat the base or the gate does not
refuse the bad run. Where there are too few man pages it measures nothing, writes nothing and exits 0.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loadtests.manpages import MAN_ROOT, load_man_pages
from service.models.manifest import GateRecord
from service.models.tokenization import TextTokenizer
from trainer.config import TrainConfig
from trainer.encoder import SentenceEncoder, load_base, packaged_minilm
from trainer.release.evaluate import LabeledPair, retrieval_metrics
from trainer.release.export import embed_with_torch
from trainer.release.gate import candidate_embedder
from trainer.release.publish import gate_candidate, load_trained, parent_version
from trainer.run_inputs import load_corpus
from trainer.train import read_metrics, train

RESULTS = Path(__file__).parent / "results" / "bench_ssl.json"
EVAL_MAX_TOKENS = 256
MIN_PAGES = 100
ADAPTED_LR = 2e-5
BAD_LR = 1e-3
VALIDATION_FRACTION = 0.1
# The objective the default replaced, measured beside it (span crops, whole-document views and hard-negative
# batches lost to it: README, "Does self-supervision pay off?").
PREVIOUS_DEFAULT: dict[str, Any] = {"temperature": 0.05}


def passages(text: str, chars: int = 700) -> list[str]:
    """Word-aligned pieces of about ``chars`` characters."""
    words, pieces, current = text.split(), [], []
    length = 0
    for word in words:
        current.append(word)
        length += len(word) + 1
        if length >= chars:
            pieces.append(" ".join(current))
            current, length = [], 0
    if length > chars // 3:
        pieces.append(" ".join(current))
    return pieces


def evaluate(encoder: SentenceEncoder, pairs: list[LabeledPair]) -> dict[str, float]:
    encoder.max_seq_length = EVAL_MAX_TOKENS
    tokenizer = TextTokenizer(packaged_minilm().tokenizer_file, EVAL_MAX_TOKENS)
    with torch.no_grad():
        return retrieval_metrics(lambda texts: embed_with_torch(encoder.eval(), tokenizer, texts), pairs)


def shortfalls(
    base: dict[str, float], adapted: dict[str, float], names: tuple[str, str] = ("base", "adapted")
) -> list[str]:
    """Why ``adapted`` does not beat ``base`` (named ``names``); empty when it does (MRR@10 higher, recall@10 not
    lower)."""
    reasons = []
    if adapted["mrr@10"] <= base["mrr@10"]:
        reasons.append(f"MRR@10 did not rise ({base['mrr@10']:.4f} {names[0]}, {adapted['mrr@10']:.4f} {names[1]})")
    if adapted["recall@10"] < base["recall@10"]:
        reasons.append(f"recall@10 fell ({base['recall@10']:.4f} {names[0]}, {adapted['recall@10']:.4f} {names[1]})")
    return reasons


def run_config(
    work: Path, corpus_file: Path, name: str, steps: int, learning_rate: float, objective: dict[str, Any] | None = None
) -> TrainConfig:
    """A run of the trainer's default objective, or of it with the ``objective`` settings given."""
    return TrainConfig.model_validate(
        {
            "run_name": name,
            "output_dir": str(work / "runs"),
            # A tenth held out: the export gate's dev set is cut from these passages (never trained on).
            "corpus": {"path": str(corpus_file), "validation_fraction": VALIDATION_FRACTION},
            "encoder": {"base_model": "minilm", "max_seq_length": 128},
            "objective": objective or {},
            "optim": {
                "max_steps": steps,
                "batch_size": 32,
                "learning_rate": learning_rate,
                "warmup_steps": max(1, steps // 10),
            },
            "checkpoint": {"every_steps": steps, "keep": 1},
            "monitor": {"eval_every_steps": max(1, steps // 3), "validation_sample": 128},
            "export": {"model": "manpages", "repository": str(work / "repository")},
        }
    )


def export_gate(checkpoint: Path) -> GateRecord:
    """The gate publish() runs before it writes a version: the run's encoder against its parent — here the MiniLM
    base, as the run's repository holds no version — on the self-supervised dev set of its held-out passages."""
    trained = load_trained(checkpoint)
    config = trained.config
    corpus = load_corpus(config)
    parent = parent_version(config.export.repository, config.export.model, config.encoder.base_model)
    with candidate_embedder(trained.encoder, trained.tokenizer_dir) as embed:
        return gate_candidate(embed, config, corpus.validation, config.export.repository, config.export.model, parent)


def describe(gate: GateRecord) -> str:
    if gate.interval is None or gate.parent_scores is None:
        return gate.decision
    low, high = gate.interval
    return (
        f"{gate.decision}: MRR@10 {gate.candidate['mrr@10']:.4f} vs {gate.parent} {gate.parent_scores['mrr@10']:.4f}, "
        f"95 % interval of the difference [{low:+.4f}, {high:+.4f}]"
    )


@dataclass(frozen=True)
class Adaptation:
    checkpoint: Path
    steps: int
    scores: dict[str, float]
    record: dict[str, Any]  # what the report says of the run: its objective, time, throughput and losses


def adapt(config: TrainConfig, pairs: list[LabeledPair]) -> Adaptation:
    """Train ``config`` and evaluate its encoder on the man pages."""
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    metrics = read_metrics(result.run_dir)
    scores = evaluate(load_trained(result.last_checkpoint).encoder, pairs)
    record = {
        "views": config.objective.views.model_dump(mode="json"),
        "steps": result.steps,
        "learning_rate": config.optim.learning_rate,
        "batch_size": config.optim.batch_size,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(metrics[-1]["tokens_per_s"], 1),
        "first_loss": metrics[0]["loss"],
        "last_loss": metrics[-1]["loss"],
    }
    return Adaptation(result.last_checkpoint, result.steps, scores, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1500, help="man pages in the dev set")
    parser.add_argument("--steps", type=int, default=60, help="adaptation steps")
    parser.add_argument(
        "--bad-steps", type=int, help="steps of the deliberately bad run (learning rate 1e-3; default: --steps)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--man-root", type=Path, default=MAN_ROOT, help="where the man pages are")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pages = load_man_pages(args.pages, root=args.man_root)
    if len(pages) < MIN_PAGES:
        # Nothing measured, nothing written: the committed results of a machine that has the pages stay.
        print(
            f"bench-ssl skipped: only {len(pages)} man pages with a description under /usr/share/man "
            f"(it needs {MIN_PAGES}; install man pages to run it). {args.output} was left as it was."
        )
        return
    pairs = [LabeledPair(query=page.description, document=page.body) for page in pages]
    corpus = [piece for page in pages for piece in passages(page.body)]
    print(f"{len(pages)} man pages, {len(corpus)} passages for adaptation (queries never seen)", flush=True)

    started = time.perf_counter()
    base = evaluate(load_base(packaged_minilm()), pairs)
    print(f"base:    recall@10 {base['recall@10']:.4f}  MRR@10 {base['mrr@10']:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as work:
        corpus_file = Path(work) / "passages.txt"
        corpus_file.write_text("\n".join(corpus))
        previous = adapt(
            run_config(Path(work), corpus_file, "previous", args.steps, ADAPTED_LR, PREVIOUS_DEFAULT), pairs
        )
        print(f"previous default: {describe_scores(previous.scores)}", flush=True)
        adapted = adapt(run_config(Path(work), corpus_file, "manpages", args.steps, ADAPTED_LR), pairs)
        print(f"default: {describe_scores(adapted.scores)}", flush=True)
        gate_started = time.perf_counter()
        adapted_gate = export_gate(adapted.checkpoint)
        gate_seconds = time.perf_counter() - gate_started
        print(f"default: gate {describe(adapted_gate)}", flush=True)

        # A deliberately bad run: the default objective at learning rate 1e-3. The export gate must refuse it.
        bad = adapt(run_config(Path(work), corpus_file, "manpages-lr1e-3", args.bad_steps or args.steps, BAD_LR), pairs)
        bad_gate = export_gate(bad.checkpoint)
        print(f"lr 1e-3: {describe_scores(bad.scores)}; gate {describe(bad_gate)}", flush=True)

    beats_base = shortfalls(base, adapted.scores)
    previous_shortfalls = shortfalls(previous.scores, adapted.scores, ("previous default", "default"))
    reasons = list(beats_base)
    if bad_gate.decision != "refused":
        reasons.append(f"the export gate did not refuse the learning-rate-1e-3 run ({describe(bad_gate)})")
    report: dict[str, Any] = {
        "dev_set": {"source": "/usr/share/man (man1, man8)", "pages": len(pages), "adaptation_passages": len(corpus)},
        "adaptation": {
            "objective": "the default: InfoNCE over dropout twins at temperature 0.1, in-batch negatives, MiniLM base"
        }
        | adapted.record,
        "previous_default": {"objective": "the same at temperature 0.05 (the default before)"}
        | previous.record
        | {"metrics": previous.scores},
        "base": base,
        "adapted": adapted.scores,
        "improvement": {
            "recall@10": adapted.scores["recall@10"] - base["recall@10"],
            "mrr@10": adapted.scores["mrr@10"] - base["mrr@10"],
        },
        "default_over_previous": {
            "recall@10": adapted.scores["recall@10"] - previous.scores["recall@10"],
            "mrr@10": adapted.scores["mrr@10"] - previous.scores["mrr@10"],
        },
        "gate": {
            "what": "publish()'s export gate against the parent, here the MiniLM base (the run's repository holds no "
            "version): self-supervised dev set (one sentence -> the rest of its passage) from the run's held-out "
            "passages; paired bootstrap, 95 % interval of the MRR@10 difference; passed when its lower bound > 0",
            "adapted": adapted_gate.model_dump(mode="json"),
            "adapted_gate_seconds": round(gate_seconds, 1),
            "bad_lr_1e-3": bad_gate.model_dump(mode="json"),
        },
        "bad_run": {"learning_rate": BAD_LR, "steps": bad.steps, "metrics": bad.scores},
        "bad_run_refused": bad_gate.decision == "refused",
        "adapted_beats_base": not beats_base,
        "default_beats_previous": not previous_shortfalls,
        "previous_shortfalls": previous_shortfalls,
        "shortfalls": reasons,
        "total_seconds": round(time.perf_counter() - started, 1),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["improvement"]), "adapted beats base:", report["adapted_beats_base"])
    print(json.dumps(report["default_over_previous"]), "the default beats the previous one:", not previous_shortfalls)
    print(f"written to {args.output}")
    if reasons:
        print("error: " + "; ".join(reasons), file=sys.stderr)
        sys.exit(1)


def describe_scores(scores: dict[str, float]) -> str:
    return f"recall@10 {scores['recall@10']:.4f}  MRR@10 {scores['mrr@10']:.4f}"


if __name__ == "__main__":
    main()
