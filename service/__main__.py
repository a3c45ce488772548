"""python -m service serve — run the gateway (``embedserve serve`` does the same; ``embedserve rollout ...`` drives
its rollout admin API over HTTP, see client/cli.py)."""

import argparse
import logging
import signal
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.settings import load_settings
from service.telemetry.logs import configure_logging

log = logging.getLogger("service")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description="embedserve gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the HTTP API on EMBEDSERVE_HOST:EMBEDSERVE_PORT")
    args = parser.parse_args()
    if args.command == "serve":
        settings = load_settings()
        configure_logging(settings.log_level)
        app = create_app(settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
        DrainingServer(config, app, settings.shutdown_drain_s).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT marks the app draining (/readyz answers 503) and the
    server stops only ``drain_s`` later: meanwhile load balancers take the replica out of rotation while it
    still answers what they send. A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._stop: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_s <= 0 or self._stop is not None:
            if self._stop is not None:
                self._stop.cancel()  # stopping now: the drain's own stop must not force-exit later
            super().handle_exit(sig, frame)
            return
        self._app.state.draining = True
        # The timer first: this runs in a signal handler, and a log write it interrupted could make logging raise.
        self._stop = threading.Timer(self._drain_s, super().handle_exit, args=(sig, frame))
        self._stop.daemon = True
        self._stop.start()
        log.info("draining before shutdown", extra={"signal": signal.Signals(sig).name, "drain_s": self._drain_s})


if __name__ == "__main__":
    main()
