"""``embedserve rollout ...``: show and steer canary rollouts (``/v1/rollouts``, the admin key).

    embedserve rollout list
    embedserve rollout status|show MODEL [--json]
    embedserve rollout start MODEL CANARY_VERSION [--steps 5,10,25,50,100] [--analysis] [--shadow-percent P]
    embedserve rollout promote MODEL [--wait]
    embedserve rollout rollback|pause|resume MODEL
    embedserve rollout weight MODEL PERCENT

Every change takes ``--reason`` (kept in the rollout's history) and ``--revision`` (act only if the rollout is still
at that revision: two operators never undo each other's change unseen).
"""

import argparse

from client.calls import DEFAULT_STEPS
from client.cli_common import Target, Verbs, print_json
from client.gateway import Gateway, GatewayError
from client.protocol import Rollout

ACTIONS = {
    "promote": "promote the canary: the model's collections are re-indexed to it, then it is the stable version",
    "rollback": "send all traffic back to the stable version",
    "pause": "hold the canary's weight (the analysis stops stepping)",
    "resume": "let a paused rollout go on",
}


def add_parser(nouns: Verbs) -> None:
    verbs = nouns.add_parser("rollout", help="show and steer canary rollouts (admin key)").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    verbs.add_parser("list", help="every model's rollout, one a line").set_defaults(run=run_list)
    for verb in ("status", "show"):
        show = verbs.add_parser(verb, help="one model's rollout, with its history and last judgement")
        show.add_argument("model")
        show.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
        show.set_defaults(run=run_show)

    start = verbs.add_parser("start", help="start a canary of a verified version")
    start.add_argument("model")
    start.add_argument("canary_version", type=int)
    start.add_argument(
        "--steps",
        type=_steps,
        default=list(DEFAULT_STEPS),
        help="canary weights in percent, climbing, comma-separated (default: %(default)s)",
    )
    start.add_argument("--shadow-percent", type=float, default=0.0, help="percent of requests mirrored to the canary")
    start.add_argument(
        "--analysis",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let the analysis loop step, promote and roll back (default: off, the operator does)",
    )
    _add_change_options(start)
    start.set_defaults(run=run_start)

    for action, description in ACTIONS.items():
        command = verbs.add_parser(action, help=description)
        command.add_argument("model")
        if action == "promote":
            command.add_argument("--wait", action="store_true", help="watch until the promotion has ended")
        _add_change_options(command)
        command.set_defaults(run=run_action)

    weight = verbs.add_parser("weight", help="set the canary's weight (percent of callers)")
    weight.add_argument("model")
    weight.add_argument("weight", type=int)
    _add_change_options(weight)
    weight.set_defaults(run=run_weight)


def _add_change_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--reason", help="why; kept in the rollout's history")
    command.add_argument("--revision", type=int, help="act only if the rollout is still at this revision")
    command.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")


def run_list(args: argparse.Namespace, target: Target) -> int:
    with target.admin_gateway() as gateway:
        for state in gateway.rollouts():
            print(headline(state))
    return 0


def run_show(args: argparse.Namespace, target: Target) -> int:
    with target.admin_gateway() as gateway:
        state = gateway.rollout(args.model)
    if state is None:
        raise GatewayError(
            f"{args.model} has no rollout; start one with: embedserve rollout start {args.model} VERSION", status=404
        )
    _print(state, args.json)
    return 0


def run_start(args: argparse.Namespace, target: Target) -> int:
    with target.admin_gateway() as gateway:
        state = gateway.start_rollout(
            args.model,
            args.canary_version,
            steps=args.steps,
            analysis=args.analysis,
            shadow_percent=args.shadow_percent,
            reason=args.reason,
            revision=args.revision,
        )
    _print(state, args.json)
    return 0


def run_action(args: argparse.Namespace, target: Target) -> int:
    with target.admin_gateway() as gateway:
        act = {
            "promote": gateway.promote,
            "rollback": gateway.rollback,
            "pause": gateway.pause,
            "resume": gateway.resume,
        }[args.verb]
        state = act(args.model, args.reason, revision=args.revision)
        if getattr(args, "wait", False):
            state = _wait_promoted(gateway, state)
    _print(state, args.json)
    return 1 if state.phase == "failed" else 0  # a promotion watched to its end can fail


def run_weight(args: argparse.Namespace, target: Target) -> int:
    with target.admin_gateway() as gateway:
        state = gateway.set_weight(args.model, args.weight, args.reason, revision=args.revision)
    _print(state, args.json)
    return 0


def _wait_promoted(gateway: Gateway, state: Rollout) -> Rollout:
    seen = [state.phase]

    def show(current: Rollout) -> None:
        if current.phase != seen[-1]:
            seen.append(current.phase)
            print(f"{current.model}: {current.phase}", flush=True)

    return gateway.wait_rollout(state.model, progress=show)


def _print(state: Rollout, as_json: bool) -> None:
    if as_json:
        print_json(state)
    else:
        print(describe(state))


def headline(state: Rollout) -> str:
    """One line: the phase, the versions and the canary's share."""
    if state.canary_version is None:
        serving = f"stable {state.stable_version}, no canary"
    elif state.ended:
        serving = f"stable {state.stable_version}, canary {state.canary_version} at 0%"
    else:
        steps = ",".join(str(step) for step in state.steps)
        shadow = f", shadow {state.shadow_percent:g}%" if state.shadow_percent else ""
        serving = (
            f"stable {state.stable_version}, canary {state.canary_version} at {state.weight}% (steps {steps}{shadow})"
        )
    analysis = "analysis on" if state.analysis.enabled else "analysis off"
    return f"{state.model}: {state.phase.replace('_', ' ')} - {serving}; {analysis}; revision {state.revision}"


def describe(state: Rollout) -> str:
    """The rollout as an operator reads it: the headline, the last judgement, the history (newest last)."""
    lines = [headline(state)]
    judgement = state.last_judgement
    if judgement is not None:
        lines.append(
            f"  last judgement {judgement.at:%Y-%m-%d %H:%M:%S}: {judgement.result} - {judgement.reason} "
            f"({judgement.canary_requests} canary requests)"
        )
        if state.analysis.enabled:
            lines.append(f"  in a row: {state.passes} passed, {state.failures} failed, {state.waits} could not judge")
    lines.append("  history:")
    for decision in state.history:
        lines.append(
            f"    {decision.at:%Y-%m-%d %H:%M:%S}  {decision.actor:<12} {decision.action:<10} "
            f"{decision.from_weight:>3}% -> {decision.to_weight:>3}%  {decision.reason}"
        )
    return "\n".join(lines)


def _steps(text: str) -> list[int]:
    try:
        return [int(step) for step in text.split(",") if step.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of percents: {text!r}") from None
