"""What loadtests/locustfile.py needs besides Locust: generated texts, the dimensions a correct answer has,
a few plain HTTP calls made outside the measured requests, and the samples file the runner reads."""

import json
import random
import string
import time
import urllib.error
import urllib.request
from typing import Any

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
        self.headers: dict[str, str] = {}
        self.loaded_at = 0.0

    def load(self, host: str, headers: dict[str, str]) -> None:
        self.host, self.headers, self.loaded_at = host, headers, time.monotonic()
        try:
            listing = get_json(f"{host}/v1/models", headers)
        except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
            print(f"loadtest: cannot read {host}/v1/models ({error}); embedding checks will fail")
            return
        for model in listing.get("data", []):
            for version in model.get("versions", []):
                if version.get("dimension"):
                    self.dimensions[(model["id"], str(version["version"]))] = int(version["dimension"])

    def dimension(self, model: str, version: str) -> int | None:
        stale = time.monotonic() - self.loaded_at > self.REFRESH_S
        if (model, version) not in self.dimensions and self.host and stale:
            self.load(self.host, self.headers)  # a version that appeared during the test
        return self.dimensions.get((model, version))


EXPECTED = Expectations()


def get_json(url: str, headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        body: dict[str, Any] = json.load(response)
        return body


def send_json(method: str, url: str, headers: dict[str, str], body: dict[str, Any]) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={**headers, "content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


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
