"""python -m trainer — build, train, evaluate and export encoder versions."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from service.telemetry.logs import configure_logging

log = logging.getLogger("trainer")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="embedserve trainer")
    commands = parser.add_subparsers(dest="command", required=True)

    boot = commands.add_parser(
        "bootstrap", help="export the packaged all-MiniLM-L6-v2 as version 1 of a model unless it has one"
    )
    boot.add_argument("--repository", type=Path, default=Path("model_repository"))
    boot.add_argument("--model", default="minilm")

    prepare = commands.add_parser(
        "prepare",
        help="stream the corpus into the run's tokenised shards (train does it too when they are missing or stale)",
    )
    prepare.add_argument("--config", type=Path, required=True)

    train = commands.add_parser("train", help="self-supervised pretraining from a YAML run configuration")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument("--resume", type=Path, help="a checkpoint of this run to continue from exactly")
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the world size, global batch or objective differ from the checkpoint's",
    )

    evaluate = commands.add_parser("evaluate", help="alignment, uniformity, effective rank, recall@10, MRR@10")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a training checkpoint")
    source.add_argument("--version-dir", type=Path, help="an exported version, e.g. model_repository/minilm/1")
    evaluate.add_argument("--pairs", type=Path, help='labeled JSONL {"query", "document"} for retrieval metrics')
    evaluate.add_argument("--texts", type=Path, help="texts (one per line) for representation metrics")

    export = commands.add_parser("export", help="export a checkpoint as the next version of a model")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--model", help="model name (default: the run's export.model)")
    export.add_argument("--repository", type=Path, help="model repository (default: the run's export.repository)")
    export.add_argument("--force", action="store_true", help="export even if the evaluation gate fails (recorded)")
    # The model's config.pbtxt keeps what it says unless a flag changes it (a new model starts on 1 GPU instance).
    export.add_argument(
        "--triton-instance-kind", choices=["gpu", "cpu"], help="instance_group kind in config.pbtxt (default: kept)"
    )
    export.add_argument("--triton-instances", type=int, help="Triton model instances, per GPU on gpu (default: kept)")
    export.add_argument(
        "--tensorrt",
        action=argparse.BooleanOptionalAction,
        help="add (or, with --no-tensorrt, remove) the TensorRT FP16 accelerator on gpu instances (default: kept)",
    )

    chain = commands.add_parser(
        "release",
        help="train, gate against stable, export, have the gateway serve it, canary it to promotion; resumable",
        description="One release from the corpus to a promoted version (see trainer/release/chain.py). Exit 0: "
        "promoted (or, with --trigger auto, nothing due); 3: refused by the release budget; 1: anything else. "
        "Running it again after a crash resumes the unfinished release. The admin key is EMBEDSERVE_ADMIN_API_KEY.",
    )
    chain.add_argument("--config", type=Path, required=True)
    chain.add_argument("--gateway", default=os.environ.get("EMBEDSERVE_URL", "http://127.0.0.1:8000"))
    chain.add_argument(
        "--trigger",
        choices=["manual", "schedule", "drift", "staleness", "auto"],
        default="manual",
        help="what starts it (counted by the gateway); auto: only if the gateway says staleness or drift is due",
    )
    chain.add_argument("--state-dir", type=Path, default=Path("releases"), help="where releases keep their state")
    chain.add_argument("--report", type=Path, help="write the JSON report here too (default: the release's folder)")
    chain.add_argument("--restart", action="store_true", help="abandon the unfinished release and start a new one")

    release_watch = commands.add_parser(
        "release-watch",
        help="start the release Job from a CronJob's template when a release is due (from a small CPU-only pod)",
        description="Decide whether a release of the config's model is due (the gateway's staleness or drift signal, "
        "or its running release whose Job is gone) and, when it is and no release Job runs, create one from the "
        "--job-template CronJob's template, as kubectl create job --from=cronjob/NAME does (trainer/release/watch.py). "
        "Prints the decision as JSON; exit 0 whatever it is, 1 on an error. The admin key is EMBEDSERVE_ADMIN_API_KEY.",
    )
    release_watch.add_argument("--config", type=Path, required=True, help="the release's run config (its model)")
    release_watch.add_argument("--gateway", default=os.environ.get("EMBEDSERVE_URL", "http://127.0.0.1:8000"))
    release_watch.add_argument("--job-template", required=True, help="the (suspended) CronJob whose Job releases")
    release_watch.add_argument("--kube-api", help="Kubernetes API URL (default: the pod's own cluster)")
    release_watch.add_argument("--namespace", help="namespace of the CronJob (default: the pod's own)")

    quantize = commands.add_parser("quantize", help="write the INT8 (per-channel) twin of a version as a new version")
    quantize.add_argument("--version-dir", type=Path, required=True, help="e.g. model_repository/minilm/1")

    python_repo = commands.add_parser(
        "triton-repository", help="write a python-backend copy of the verified versions for a CPU-only Triton"
    )
    python_repo.add_argument("--source", type=Path, default=Path("model_repository"))
    python_repo.add_argument("--target", type=Path, default=Path(".triton/repository"))
    python_repo.add_argument(
        "--instance-kind", choices=["cpu", "gpu"], default="cpu", help="gpu: model.py runs ONNX Runtime on CUDA"
    )
    python_repo.add_argument("--instances", type=int, default=1, help="Triton model instances (per GPU on gpu)")

    digests = commands.add_parser(
        "triton-config",
        help="name the sha256 of every version in each model's config.pbtxt (repositories exported before they did)",
    )
    digests.add_argument("--repository", type=Path, default=Path("model_repository"))

    args = parser.parse_args()
    configure_logging("INFO")
    try:
        run(args)
    except Exception as error:  # the CLI's edge: one clear line, not a traceback, for what a user can fix
        from trainer.checkpoint import CorruptCheckpoint
        from trainer.monitor import CollapseDetected
        from trainer.release.export import ExportRefused
        from trainer.train import NonFiniteLoss

        if isinstance(error, CorruptCheckpoint | ExportRefused | CollapseDetected | NonFiniteLoss | ValueError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise


def run(args: argparse.Namespace) -> None:
    if args.command == "bootstrap":
        from trainer.release.bootstrap import bootstrap

        written = bootstrap(args.repository, args.model)
        log.info("bootstrap done", extra={"written": str(written) if written else None})
    elif args.command == "prepare":
        from trainer.config import load_config
        from trainer.run_inputs import dataset_summary, load_corpus

        corpus = load_corpus(load_config(args.config), progress=True)
        print(json.dumps({"folder": str(corpus.folder), **dataset_summary(corpus)}, indent=2))
    elif args.command == "train":
        from trainer.config import load_config
        from trainer.train import train

        result = train(load_config(args.config), resume=args.resume, allow_config_change=args.allow_config_change)
        log.info("training done", extra={"steps": result.steps, "checkpoint": str(result.last_checkpoint)})
    elif args.command == "evaluate":
        print(json.dumps(evaluate_command(args), indent=2))
    elif args.command == "export":
        from trainer.release.publish import publish
        from trainer.release.triton_config import TritonChanges

        triton = TritonChanges(args.triton_instance_kind, args.triton_instances, tensorrt=args.tensorrt)
        written = publish(args.checkpoint, args.model, args.repository, force=args.force, triton=triton)
        log.info("exported", extra={"version_dir": str(written)})
    elif args.command == "release":
        sys.exit(release_command(args))
    elif args.command == "release-watch":
        sys.exit(release_watch_command(args))
    elif args.command == "quantize":
        from trainer.data.sample_text import sentences
        from trainer.release.quantize import quantize_version

        written = quantize_version(args.version_dir, list(sentences()[:256]))
        log.info("quantized", extra={"version_dir": str(written)})
    elif args.command == "triton-repository":
        from trainer.release.triton_config import TritonOptions, write_python_repository

        options = TritonOptions(args.instance_kind, args.instances)
        copied = write_python_repository(args.source, args.target, options)
        log.info("python-backend repository written", extra={"versions": copied})
    elif args.command == "triton-config":
        from trainer.release.triton_config import write_digests

        log.info("triton configs written", extra={"models": write_digests(args.repository)})


def release_command(args: argparse.Namespace) -> int:
    from client.gateway import Gateway
    from trainer.config import load_config
    from trainer.release.release_state import exit_code, report
    from trainer.release.resume import ReleaseBusy, release

    config = load_config(args.config)
    # retries=0: a 429 from the release budget is a verdict, not a moment's overload to wait out.
    gateway = Gateway(args.gateway, os.environ.get("EMBEDSERVE_ADMIN_API_KEY"), retries=0)
    try:
        state = release(config, args.config.read_text(), gateway, args.state_dir, args.trigger, args.restart)
    except ReleaseBusy as busy:
        print(f"error: {busy}", file=sys.stderr)
        return 1
    finally:
        gateway.close()
    document = json.dumps(report(state), indent=2) + "\n"
    if state.outcome == "not_due":  # nothing happened: the last release's report stays where it is
        print(document, end="")
        return exit_code(state)
    if state.release_id != "-":
        (args.state_dir / state.model / state.release_id / "report.json").write_text(document)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(document)
    print(document, end="")
    return exit_code(state)


def release_watch_command(args: argparse.Namespace) -> int:
    import httpx

    from client.gateway import Gateway, GatewayError
    from trainer.config import load_config
    from trainer.release.kube import Cluster
    from trainer.release.watch import watch

    model = load_config(args.config).export.model
    try:
        cluster = Cluster.in_cluster(args.kube_api, args.namespace)
        with Gateway(args.gateway, os.environ.get("EMBEDSERVE_ADMIN_API_KEY")) as gateway:
            decision = watch(model, gateway, cluster, args.job_template)
    except (RuntimeError, GatewayError, httpx.HTTPError) as error:  # refusals, unreachable peers: said plainly
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(decision.model_dump_json())
    return 0


def evaluate_command(args: argparse.Namespace) -> dict[str, object]:
    from trainer.data.sample_text import sentences
    from trainer.release.evaluate import evaluate, load_pairs

    texts = [t for t in args.texts.read_text().splitlines() if t.strip()] if args.texts else list(sentences()[:512])
    pairs = load_pairs(args.pairs) if args.pairs else None
    if args.checkpoint:
        from trainer.release.publish import evaluate_encoder, load_trained

        result = evaluate_encoder(load_trained(args.checkpoint), texts, args.pairs)
    else:
        from service.models.manifest import verify_version
        from service.models.tokenization import TextTokenizer
        from trainer.release.export import embed_with_onnx

        manifest = verify_version(args.version_dir)
        tokenizer = TextTokenizer(args.version_dir / "tokenizer.json", manifest.max_seq_length)
        result = evaluate(
            lambda batch: embed_with_onnx(args.version_dir / "model.onnx", tokenizer, batch), texts, pairs
        )
    return {"primary_metric": result.primary_metric, "primary": result.primary, "metrics": result.metrics}


if __name__ == "__main__":
    main()
