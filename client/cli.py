"""embedserve — the gateway from the command line.

    embedserve serve [--host H] [--port P]                 run the gateway (python -m service serve)
    embedserve collections list|status|create|upsert|search|reindex|delete|evaluate ...
    embedserve rollout list|status|show|start|promote|rollback|pause|resume|weight ...
    embedserve models [list|reload]
    embedserve releases [list] | releases signals MODEL      the release ledger and budget; what makes one due

Every command but ``serve`` talks HTTP to the gateway at ``--url`` (default ``$EMBEDSERVE_URL``, else
http://127.0.0.1:8000) through ``client.gateway.Gateway``. Keys: ``$EMBEDSERVE_API_KEY`` for collections and models;
``$EMBEDSERVE_ADMIN_API_KEY`` (else ``$EMBEDSERVE_API_KEY``) for rollouts and model reloads. Exit codes: 0 done,
1 the gateway refused or could not be reached (its message on standard error), 2 a mistake on the command line.
"""

import argparse
import os
import sys
from collections.abc import Sequence

from client import cli_collections, cli_rollouts
from client.cli_common import DEFAULT_URL, Target, UsageError, Verbs, print_json
from client.gateway import GatewayError
from client.protocol import Model, ReleaseSignals

# What a refused key means for the one who runs the command (the gateway's message speaks to its operator).
KEY_HINTS = {
    "collections": "embedserve sends $EMBEDSERVE_API_KEY: set it to a key with the search scope (write to change).",
    "models": "embedserve sends $EMBEDSERVE_API_KEY (reload: $EMBEDSERVE_ADMIN_API_KEY): check it.",
    "rollout": "embedserve sends $EMBEDSERVE_ADMIN_API_KEY (else $EMBEDSERVE_API_KEY): set it to the admin key.",
    "releases": "embedserve sends $EMBEDSERVE_ADMIN_API_KEY (else $EMBEDSERVE_API_KEY): set it to the admin key.",
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="embedserve",
        description="The embedserve gateway from the command line.",
        epilog="Keys: EMBEDSERVE_API_KEY (collections), EMBEDSERVE_ADMIN_API_KEY (rollouts, model reloads).",
    )
    root.add_argument(
        "--url", default=os.environ.get("EMBEDSERVE_URL", DEFAULT_URL), help="the gateway's base URL (EMBEDSERVE_URL)"
    )
    root.add_argument("--timeout-s", type=float, default=60.0, help="seconds to wait for each answer")
    nouns = root.add_subparsers(dest="noun", required=True, metavar="COMMAND")
    add_serve(nouns)
    cli_collections.add_parser(nouns)
    cli_rollouts.add_parser(nouns)
    add_models(nouns)
    add_releases(nouns)
    return root


def add_serve(nouns: Verbs) -> None:
    serve = nouns.add_parser(
        "serve",
        help="run the gateway (python -m service serve)",
        description="Runs the gateway in this process, configured by its EMBEDSERVE_* settings (README, Settings).",
    )
    serve.add_argument("--host", help="address to bind (EMBEDSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (EMBEDSERVE_PORT, default 8000)")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace, target: Target) -> int:
    """Become ``python -m service serve``. The client talks HTTP and never imports the gateway (the import contract
    in pyproject.toml), so the gateway replaces this process: same process id, its own signal handling (the drain on
    SIGTERM), its exit code."""
    environ = dict(os.environ)
    if args.host is not None:
        environ["EMBEDSERVE_HOST"] = args.host
    if args.port is not None:
        environ["EMBEDSERVE_PORT"] = str(args.port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "service", "serve"], environ)


def add_models(nouns: Verbs) -> None:
    verbs = nouns.add_parser("models", help="the models and versions the gateway serves or refuses").add_subparsers(
        dest="verb", metavar="VERB"
    )
    listing = verbs.add_parser("list", help="every model's versions: served, refused (and why), default")
    listing.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    verbs.add_parser("reload", help="scan the model repository now (admin key)").add_argument(
        "--json", action="store_true", help="print the gateway's answer as JSON"
    )


def run_models(args: argparse.Namespace, target: Target) -> int:
    if args.verb == "reload":
        with target.admin_gateway() as gateway:
            report = gateway.reload_models()
        if args.json:
            print_json(report)
        else:
            print(f"loaded: {', '.join(report.loaded) or 'none'}; unloaded: {', '.join(report.unloaded) or 'none'}")
            for failure in [*report.refused, *report.failed]:
                print(f"not served: {failure.version}: {failure.reason}")
        return 0
    with target.gateway() as gateway:
        models = gateway.models()
    if getattr(args, "json", False):
        print_json(models)
    else:
        print("\n".join(model_lines(model) for model in models))
    return 0


def add_releases(nouns: Verbs) -> None:
    releases = nouns.add_parser("releases", help="the release ledger: budget, releases, what makes one due (admin)")
    releases.set_defaults(run=run_releases)
    verbs = releases.add_subparsers(dest="verb", metavar="VERB")
    verbs.add_parser("list", help="the budget's window, what it used, every release").add_argument(
        "--json", action="store_true", help="print the gateway's answer as JSON"
    )
    signals = verbs.add_parser("signals", help="whether a release of MODEL is due (staleness, drift), and why")
    signals.add_argument("model")
    signals.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")


def run_releases(args: argparse.Namespace, target: Target) -> int:
    with target.admin_gateway() as gateway:
        answer = gateway.release_signals(args.model) if args.verb == "signals" else gateway.releases()
    if getattr(args, "json", False):
        print_json(answer)
    elif isinstance(answer, ReleaseSignals):
        age = "-" if answer.stable_age_s is None else f"{answer.stable_age_s / 86400:.1f} d"
        print(
            f"{answer.model}: stable {answer.stable_version}, exported {age} ago (max {answer.max_age_s / 86400:g} d)"
        )
        print(
            f"drift MMD {answer.drift_mmd}, above {answer.drift_threshold} for {answer.drift_streak} of "
            f"{answer.drift_intervals} recomputations; running release: {answer.release_running or 'none'}"
        )
        print(f"due: {', '.join(answer.due) or 'nothing'}")
    else:
        print(
            f"window {answer.window_s / 3600:g} h: {answer.started_in_window} of {answer.max_per_window} releases "
            f"started, {answer.training_hours_in_window:.2f} of {answer.max_training_hours:g} training hours used"
        )
        for release in answer.releases:
            print(
                f"  {release.release_id}  {release.model}  {release.trigger}  {release.started_at:%Y-%m-%d %H:%M}  "
                f"{release.outcome or 'running: ' + release.stage}  v{release.version or '-'}"
            )
    return 0


def model_lines(model: Model) -> str:
    lines = [f"{model.id}: default version {model.default_version}"]
    for version in model.versions:
        default = ", default" if version.is_default else ""
        detail = f": {version.reason}" if version.reason else f", {version.dimension} dims, {version.precision}"
        lines.append(f"  {version.version}  {version.state}{default}{detail}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    target = Target.of(args)
    run = getattr(args, "run", run_models)  # `embedserve models` alone lists them
    try:
        code: int = run(args, target)
    except UsageError as error:
        print(f"{error}", file=sys.stderr)
        return 2
    except GatewayError as error:
        print(f"{error}", file=sys.stderr)
        if error.status in (401, 403):
            print(KEY_HINTS[args.noun], file=sys.stderr)
        return 1
    except TimeoutError as error:
        print(f"{error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
