"""What every ``embedserve`` command shares: where the gateway is and which keys to send (read once, in ``main``),
the usage error, progress bars on standard error, JSON output."""

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from pydantic import BaseModel
from tqdm import tqdm

from client.gateway import Gateway

DEFAULT_URL = "http://127.0.0.1:8000"
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """The command line, or a file it names, is not what the command takes (exit code 2); the message says how."""


@dataclass(frozen=True)
class Target:
    """The gateway the commands talk to and the keys they send, from the command line and the environment."""

    url: str
    timeout_s: float
    api_key: str | None  # EMBEDSERVE_API_KEY: collections (search scope to read, write to change)
    admin_api_key: str | None  # EMBEDSERVE_ADMIN_API_KEY, else EMBEDSERVE_API_KEY: rollouts, model reloads

    @classmethod
    def of(cls, args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> "Target":
        api_key = environ.get("EMBEDSERVE_API_KEY") or None
        return cls(
            url=args.url,
            timeout_s=args.timeout_s,
            api_key=api_key,
            admin_api_key=environ.get("EMBEDSERVE_ADMIN_API_KEY") or api_key,
        )

    def gateway(self) -> Gateway:
        return Gateway(self.url, self.api_key, self.timeout_s)

    def admin_gateway(self) -> Gateway:
        if self.admin_api_key is None:
            raise UsageError(
                "this command needs the gateway's admin API key: set EMBEDSERVE_ADMIN_API_KEY (or EMBEDSERVE_API_KEY "
                "to a key with the admin scope)."
            )
        return Gateway(self.url, self.admin_api_key, self.timeout_s)


def add_progress_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on standard error (default: only when it is a terminal)",
    )


def progress_bar(forced: bool | None, total: int | None, description: str) -> "tqdm[Any]":
    """A bar on standard error: shown when ``forced``, hidden when False, and when None only on a terminal."""
    # tqdm's own disable=None hides the bar when its file is not a terminal.
    disable = None if forced is None else not forced
    return tqdm(total=total, desc=description, unit="item", file=sys.stderr, disable=disable, dynamic_ncols=True)


def print_json(value: BaseModel | list[Any] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        print(value.model_dump_json(indent=2))
    else:
        print(json.dumps(value, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON")
