"""``embedserve collections ...``: create, fill, search, re-index, inspect, delete and evaluate vector collections.

embedserve collections list
embedserve collections create NAME --model MODEL[@VERSION] [--field NAME:TYPE ...]
embedserve collections upsert NAME FILE.jsonl [--batch-size N] [--progress]
embedserve collections search NAME QUERY [--mode dense|keyword|hybrid] [--top-k K] [--filter JSON]
embedserve collections reindex NAME [--version V] [--wait] [--progress]
embedserve collections status NAME [--wait]
embedserve collections delete NAME
embedserve collections evaluate NAME --pairs FILE.jsonl [...]
"""

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.async_gateway import AsyncGateway
from client.calls import MAX_ITEMS_PER_REQUEST
from client.cli_common import Target, UsageError, Verbs, add_progress_flag, print_json, progress_bar
from client.evaluate import ALPHAS, RRF_KS, evaluate, fusion_grid, read_pairs, table
from client.gateway import Gateway
from client.protocol import Collection, SearchResult
from service.vectors.fusion import MAX_CANDIDATES

FIELD_TYPES = ("string", "int", "float", "bool", "string_list")


def add_parser(nouns: Verbs) -> None:
    verbs = nouns.add_parser("collections", help="vector collections: create, upsert, search, re-index").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    verbs.add_parser("list", help="every collection, one a line").set_defaults(run=run_list)

    status = verbs.add_parser("status", help="a collection's model version, items and re-index progress")
    status.add_argument("name")
    status.add_argument("--wait", action="store_true", help="watch a running re-index until it ends")
    add_progress_flag(status)
    status.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    status.set_defaults(run=run_status)

    create = verbs.add_parser("create", help="create a collection on a model")
    create.add_argument("name")
    create.add_argument("--model", required=True, help="a model name (its default version) or name@version")
    create.add_argument(
        "--field",
        dest="fields",
        action="append",
        default=[],
        metavar="NAME:TYPE",
        help=f"a metadata field to store and filter on; TYPE is one of {', '.join(FIELD_TYPES)} (repeatable)",
    )
    create.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    create.set_defaults(run=run_create)

    upsert = verbs.add_parser("upsert", help="embed and store the items of a JSON-lines file")
    upsert.add_argument("name")
    upsert.add_argument("file", type=Path, help='JSON lines {"id": ..., "text": ..., "metadata": {...}} (optional)')
    upsert.add_argument(
        "--batch-size", type=int, default=MAX_ITEMS_PER_REQUEST, help=f"items a request (1..{MAX_ITEMS_PER_REQUEST})"
    )
    add_progress_flag(upsert)
    upsert.set_defaults(run=run_upsert)

    search = verbs.add_parser("search", help="the items most similar to a query")
    search.add_argument("name")
    search.add_argument("query")
    search.add_argument("--mode", choices=("dense", "keyword", "hybrid"), default="dense")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument(
        "--filter", type=_json_object, help='a structured filter, e.g. \'{"field": "year", "gt": 2020}\''
    )
    search.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    search.set_defaults(run=run_search)

    reindex = verbs.add_parser("reindex", help="re-embed a collection with another version of its model")
    reindex.add_argument("name")
    reindex.add_argument("--version", type=int, help="the version to move to (default: the model's default version)")
    reindex.add_argument("--wait", action="store_true", help="watch it until it ends")
    add_progress_flag(reindex)
    reindex.set_defaults(run=run_reindex)

    delete = verbs.add_parser("delete", help="delete a collection and its items")
    delete.add_argument("name")
    delete.set_defaults(run=run_delete)

    add_evaluate(verbs)


def run_list(args: argparse.Namespace, target: Target) -> int:
    with target.gateway() as gateway:
        found = gateway.collections()
    for collection in found:
        print(headline(collection))
    if not found:
        print("no collections; create one with: embedserve collections create NAME --model MODEL", file=sys.stderr)
    return 0


def run_status(args: argparse.Namespace, target: Target) -> int:
    with target.gateway() as gateway:
        collection = gateway.collection(args.name)
        if args.wait and collection.state == "reindexing":
            collection = watch_reindex(gateway, collection, args.progress)
    if args.json:
        print_json(collection)
    else:
        print(describe(collection))
    return 0


def run_create(args: argparse.Namespace, target: Target) -> int:
    fields = dict(_field(spec) for spec in args.fields)
    with target.gateway() as gateway:
        collection = gateway.create_collection(args.name, args.model, fields=fields)
    if args.json:
        print_json(collection)
    else:
        print(describe(collection))
    return 0


def run_upsert(args: argparse.Namespace, target: Target) -> int:
    if not 1 <= args.batch_size <= MAX_ITEMS_PER_REQUEST:
        raise UsageError(f"--batch-size must be between 1 and {MAX_ITEMS_PER_REQUEST}, the upsert route's limit.")
    total = sum(1 for _ in read_items(args.file))  # every line checked before the first is sent
    started = time.perf_counter()
    with target.gateway() as gateway:
        with progress_bar(args.progress, total, f"upsert {args.name}") as bar:
            stored = gateway.upsert(args.name, read_items(args.file), batch_size=args.batch_size, progress=bar.update)
        collection = gateway.collection(args.name)
    elapsed = time.perf_counter() - started
    print(
        f"upserted {stored} items into {args.name} ({collection.model_version}) in {elapsed:.1f} s; "
        f"it holds {collection.items if collection.items is not None else 'an unknown number of'} items"
    )
    return 0


def run_search(args: argparse.Namespace, target: Target) -> int:
    with target.gateway() as gateway:
        result = gateway.search(args.name, args.query, args.mode, args.top_k, filter=args.filter)
    if args.json:
        print_json(result)
    else:
        print(hits_table(result))
    return 0


def run_reindex(args: argparse.Namespace, target: Target) -> int:
    with target.gateway() as gateway:
        collection = gateway.reindex(args.name, args.version)
        if not args.wait:
            print(describe(collection))
            print(f"watch it with: embedserve collections status {args.name} --wait")
            return 0
        collection = watch_reindex(gateway, collection, args.progress)
    print(describe(collection))
    return 0


def run_delete(args: argparse.Namespace, target: Target) -> int:
    with target.gateway() as gateway:
        gateway.delete_collection(args.name)
    print(f"deleted collection {args.name}")
    return 0


def watch_reindex(gateway: Gateway, collection: Collection, progress: bool | None) -> Collection:
    """Follow the running re-index of ``collection`` with a bar of items copied, until it ends."""
    reindex = collection.reindex
    assert reindex is not None
    description = f"reindex {collection.name} to {collection.model}@{reindex.version}"
    with progress_bar(progress, reindex.total, description) as bar:

        def show(state: Collection) -> None:
            if state.reindex is not None:
                bar.total = state.reindex.total
                bar.update(state.reindex.copied - bar.n)
            elif bar.total is not None:
                bar.update(bar.total - bar.n)

        return gateway.wait_reindexed(collection.name, version=reindex.version, progress=show)


# ── evaluate ────────────────────────────────────────────────────────────────


def add_evaluate(verbs: Verbs) -> None:
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
    command.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace, target: Target) -> int:
    if args.candidates is not None and not 1 <= args.candidates <= MAX_CANDIDATES:
        raise UsageError(f"--candidates must be between 1 and {MAX_CANDIDATES}.")
    try:
        grid = fusion_grid(args.rrf_k, args.alphas)
        queries = read_pairs(args.pairs)
    except (ValueError, OSError) as error:  # PairsError and pydantic's bounds on k and alpha among them
        raise UsageError(str(error)) from None

    async def report() -> dict[str, Any]:
        async with AsyncGateway(target.url, target.api_key, target.timeout_s) as gateway:
            return await evaluate(gateway, args.name, queries, args.candidates, grid, max(1, args.concurrency))

    result = asyncio.run(report())
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


# ── reading and printing ────────────────────────────────────────────────────


def read_items(path: Path) -> Iterator[dict[str, Any]]:
    """The items of a JSON-lines file, ``{"id": str, "text": str, "metadata": {...}}`` (metadata optional), read
    lazily; blank lines are skipped. Raises UsageError naming the line that is not an item."""
    try:
        lines = path.open(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    with lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}:{number}: not JSON") from None
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("id"), str)
                or not item["id"]
                or not isinstance(item.get("text"), str)
                or not isinstance(item.get("metadata", {}), dict)
                or not item.keys() <= {"id", "text", "metadata"}
            ):
                raise UsageError(
                    f'{path}:{number}: expected {{"id": "<item id>", "text": "<text>"}} with an optional '
                    '"metadata": {...} and nothing else'
                )
            yield item


def headline(collection: Collection) -> str:
    items = "? items" if collection.items is None else f"{collection.items} items"
    return f"{collection.name}: {collection.model_version}, {items}, {collection.state.replace('_', ' ')}"


def describe(collection: Collection) -> str:
    """The collection as a person reads it: a headline, its settings, a re-index's progress or failure."""
    hybrid = collection.hybrid
    fields = ", ".join(f"{name} ({kind})" for name, kind in collection.fields.items()) or "none"
    lines = [
        headline(collection),
        f"  dimension {collection.dimension}, keyword analyser {collection.keyword_analyzer}, fields: {fields}",
        f"  hybrid default: {hybrid.fusion.label}, {hybrid.candidates} candidates a leg",
    ]
    reindex = collection.reindex
    if reindex is not None:
        lines.append(
            f"  re-index to version {reindex.version}: {reindex.state}, {reindex.copied}/{reindex.total} items "
            f"({reindex.progress:.0%})" + (f"; {reindex.error}" if reindex.error else "")
        )
    return "\n".join(lines)


def hits_table(result: SearchResult) -> str:
    count = f"{len(result.hits)} hit{'' if len(result.hits) == 1 else 's'}"
    lines = [f"{count} from {result.model}, best first:"]
    for hit in result.hits:
        text = (hit.text or "").replace("\n", " ")
        lines.append(f"  {hit.score:8.4f}  {hit.id}  {text[:100]}{'…' if len(text) > 100 else ''}")
    return "\n".join(lines)


def _field(spec: str) -> tuple[str, str]:
    name, _, kind = spec.partition(":")
    if not name or kind not in FIELD_TYPES:
        raise UsageError(f"--field {spec!r}: expected NAME:TYPE with TYPE one of {', '.join(FIELD_TYPES)}.")
    return name, kind


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


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
