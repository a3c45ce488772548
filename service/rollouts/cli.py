"""python -m service rollout ... — the rollout admin API (/v1/rollouts) from the command line, over HTTP.

The gateway is ``--url`` (default http://127.0.0.1:8000); the admin key is ``EMBEDSERVE_ADMIN_API_KEY``.
"""

import argparse
import json
import os
import sys
from typing import Any

import httpx

ACTIONS = ("promote", "rollback", "pause", "resume")


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``rollout`` and its subcommands to the ``python -m service`` parser."""
    parser = commands.add_parser("rollout", help="show and steer canary rollouts of a running gateway")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the gateway")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="every model's rollout")
    verbs.add_parser("show", help="one model's rollout, with its history").add_argument("model")
    begin = verbs.add_parser("start", help="start a canary of a verified version")
    begin.add_argument("model")
    begin.add_argument("canary_version", type=int)
    begin.add_argument("--steps", default="5,10,25,50,100", help="canary weights in percent, comma-separated")
    begin.add_argument("--shadow-percent", type=float, default=0.0, help="percent of requests mirrored to the canary")
    begin.add_argument("--analysis", action="store_true", help="let the analysis loop step, promote and roll back")
    begin.add_argument("--reason")
    for action in ACTIONS:
        verb = verbs.add_parser(action, help=f"{action} the model's rollout")
        verb.add_argument("model")
        verb.add_argument("--reason")
    weight = verbs.add_parser("weight", help="set the canary's weight (percent)")
    weight.add_argument("model")
    weight.add_argument("weight", type=int)
    weight.add_argument("--reason")


def request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """The HTTP method, path and JSON body of a parsed ``rollout`` command."""
    reason = {"reason": args.reason} if getattr(args, "reason", None) else {}
    if args.verb == "list":
        return "GET", "/v1/rollouts", None
    if args.verb == "show":
        return "GET", f"/v1/rollouts/{args.model}", None
    if args.verb == "start":
        body = {
            "canary_version": args.canary_version,
            "steps": [int(step) for step in args.steps.split(",") if step.strip()],
            "shadow_percent": args.shadow_percent,
            "analysis": {"enabled": args.analysis},
            **reason,
        }
        return "PUT", f"/v1/rollouts/{args.model}", body
    if args.verb == "weight":
        return "POST", f"/v1/rollouts/{args.model}/weight", {"weight": args.weight, **reason}
    return "POST", f"/v1/rollouts/{args.model}/{args.verb}", reason


def run(args: argparse.Namespace) -> int:
    """Send the command to the gateway and print its JSON answer; 0 on success, 1 on an error answer."""
    key = os.environ.get("EMBEDSERVE_ADMIN_API_KEY")
    if not key:
        print("set EMBEDSERVE_ADMIN_API_KEY to the gateway's admin API key.", file=sys.stderr)
        return 2
    method, path, body = request(args)
    try:
        response = httpx.request(
            method, f"{args.url.rstrip('/')}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
    except httpx.TransportError as error:
        print(f"cannot reach the gateway at {args.url}: {error}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
    except ValueError:
        answer = {"status": response.status_code, "body": response.text}
    print(json.dumps(answer, indent=2), file=sys.stdout if response.is_success else sys.stderr)
    return 0 if response.is_success else 1
