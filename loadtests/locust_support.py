"""What loadtests/locustfile.py needs besides Locust: generated texts, the dimensions a correct answer has (read
through embedserve's client, outside the measured requests), and the samples file the runner reads."""

import json
import random
import string
import time
from typing import Any

from client.gateway import Gateway, GatewayError

VOCABULARY = (
    "model vector search index query cache latency batch token version canary stable rollout gateway "
    "replica shard region cluster request response embedding sentence paragraph document retrieval "
    "ranking metric dashboard alert budget error queue worker memory network storage backup restore "
    "customer order invoice product price shipping return review rating support ticket account login "
    "the a of and to in for on with by from at as is was are be this that it new old fast slow"
)
WORDS = VOCABULARY.split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def unique(rng: random.Random, text: str) -> str:
    # A nonce word makes the text new to the cache without changing its length much.
    return f"{text} {''.join(rng.choices(string.ascii_lowercase, k=8))}"


class Expectations:
    """What a correct answer looks like: each (model, version)'s dimension, read from ``GET /v1/models``."""

    REFRESH_S = 5.0

    def __init__(self) -> None:
        self.dimensions: dict[tuple[str, str], int] = {}
        self.host = ""
        self.api_key: str | None = None
        self.loaded_at = 0.0

    def load(self, host: str, api_key: str | None) -> None:
        self.host, self.api_key, self.loaded_at = host, api_key, time.monotonic()
        try:
            with Gateway(host, api_key, timeout_s=10) as gateway:
                models = gateway.models()
        except GatewayError as error:
            print(f"loadtest: cannot read {host}/v1/models ({error}); embedding checks will fail")
            return
        for model in models:
            for version in model.versions:
                if version.dimension:
                    self.dimensions[(model.id, str(version.version))] = version.dimension

    def dimension(self, model: str, version: str) -> int | None:
        stale = time.monotonic() - self.loaded_at > self.REFRESH_S
        if (model, version) not in self.dimensions and self.host and stale:
            self.load(self.host, self.api_key)  # a version that appeared during the test
        return self.dimensions.get((model, version))


EXPECTED = Expectations()


class SampleWriter:
    """One JSON line per request: the runner's verdict and plot are computed from these."""

    def __init__(self) -> None:
        self.file: Any = None

    def open(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed on quitting

    def write(self, name: str, response_time_ms: float, ok: bool, status: int) -> None:
        if self.file is None:
            return
        group, _, version = name.rpartition(" v")
        line = {"t": time.time(), "group": group, "version": version, "ms": response_time_ms, "ok": ok}
        self.file.write(json.dumps({**line, "status": status}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


SAMPLES = SampleWriter()
