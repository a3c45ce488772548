"""embedserve — the gateway from the command line, over HTTP.

    embedserve collections evaluate NAME --pairs FILE.jsonl [--candidates N] [--output REPORT.json] [--json]

The gateway is ``--url`` (default ``$EMBEDSERVE_URL``, else http://127.0.0.1:8000); the API key (the ``search``
scope is enough) is ``$EMBEDSERVE_API_KEY``. Each command is a subcommand of its noun, so more can be added beside.
"""

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from client.evaluate import ALPHAS, RRF_KS, evaluate, fusion_grid, read_pairs, table
from client.http import CollectionsClient, GatewayError
from service.vectors.fusion import MAX_CANDIDATES

DEFAULT_URL = "http://127.0.0.1:8000"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="embedserve", description="The embedserve gateway from the command line.")
    root.add_argument("--url", default=os.environ.get("EMBEDSERVE_URL", DEFAULT_URL), help="the gateway's base URL")
    nouns = root.add_subparsers(dest="noun", required=True)
    collections = nouns.add_parser("collections", help="vector collections").add_subparsers(dest="verb", required=True)
    add_evaluate(collections)
    return root


def add_evaluate(verbs: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    command = verbs.add_parser(
        "evaluate",
        help="recall@1/10, MRR@10, nDCG@10 of dense, keyword and every fusion setting on labelled pairs",
        description="Searches each query's dense and keyword legs once and fuses them locally for every setting "
        "(the same fusion as the hybrid search route); prints a table (or JSON) and suggests the best setting.",
    )
    command.add_argument("name", help="the collection")
    command.add_argument(
        "--pairs", type=Path, required=True, help='JSON lines {"query": ..., "relevant_id": ...} (item ids)'
    )
    command.add_argument(
        "--candidates", type=int, help="depth of each leg (default: the collection's hybrid candidates)"
    )
    command.add_argument("--rrf-k", type=_ints, default=list(RRF_KS), help="RRF k values, comma-separated")
    command.add_argument(
        "--alphas", type=_floats, default=list(ALPHAS), help="weighted-fusion dense weights, comma-separated"
    )
    command.add_argument("--concurrency", type=int, default=4, help="searches in flight at once")
    command.add_argument("--output", type=Path, help="also write the JSON report to this file")
    command.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def run_evaluate(args: argparse.Namespace) -> int:
    if args.candidates is not None and not 1 <= args.candidates <= MAX_CANDIDATES:
        print(f"--candidates must be between 1 and {MAX_CANDIDATES}.", file=sys.stderr)
        return 2
    try:
        grid = fusion_grid(args.rrf_k, args.alphas)
        queries = read_pairs(args.pairs)
    except (ValueError, OSError) as error:  # PairsError and pydantic's bounds on k and alpha among them
        print(f"{error}", file=sys.stderr)
        return 2

    async def report() -> dict[str, object]:
        async with CollectionsClient(args.url, os.environ.get("EMBEDSERVE_API_KEY")) as client:
            return await evaluate(client, args.name, queries, args.candidates, grid, max(1, args.concurrency))

    try:
        result = asyncio.run(report())
    except GatewayError as error:
        print(f"{error}", file=sys.stderr)
        return 1
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.noun == "collections" and args.verb == "evaluate":
        return run_evaluate(args)
    raise AssertionError(f"unhandled command {args.noun} {args.verb}")


if __name__ == "__main__":
    sys.exit(main())
