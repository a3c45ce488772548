"""python -m service serve | rollout ... — run the gateway, or drive its rollout admin API."""

import argparse

import uvicorn

from service import rollout_cli
from service.app import create_app
from service.logs import configure_logging
from service.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description="embedserve gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the HTTP API on EMBEDSERVE_HOST:EMBEDSERVE_PORT")
    rollout_cli.add_parser(commands)
    args = parser.parse_args()
    if args.command == "rollout":
        raise SystemExit(rollout_cli.run(args))
    if args.command == "serve":
        settings = load_settings()
        configure_logging(settings.log_level)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
