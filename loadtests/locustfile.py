"""Locust scenarios against a running gateway; every response is checked and named by its model version.

User classes (weights = their share of simulated users):
- ``ShortTextUser`` (6): ``POST /v1/embeddings`` with 1-8 sentences; a configurable share repeats texts
  from a small hot set (cache hits), the rest are new; a routing key in ``x-routing-key`` per request.
- ``LongTextUser`` (2): the same with one paragraph of 120-300 words.
- ``CollectionUser`` (2): searches (dense, keyword, hybrid) and upserts on one collection, created at
  the start of the test if missing.

Each request is named ``<group> v<version>`` from its ``x-model-version`` response header (``v?`` when
none came back), so Locust's tables, the HTML report and the runner's verdict split by model version.
``StagedLoad`` ramps users through warm-up, peak and cool-down within ``--run-time``.

Run it through the runner (``python -m loadtests.loadtest``, ``make loadtest``), or directly:
``locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --model minilm -u 16 -t 60s``.
"""

import base64
import random
import time
from typing import Any, ClassVar

from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

from client.gateway import Gateway, GatewayError
from loadtests.locust_support import EXPECTED, SAMPLES, WORDS, sentence, unique

GROUP_SHORT = "embeddings short"
GROUP_LONG = "embeddings long"
GROUP_SEARCH = "collection search"
GROUP_UPSERT = "collection upsert"
UNVERSIONED = "?"
HOT_TEXTS = 32
UPSERT_ID_SPACE = 2000  # upserts replace items in a bounded id space, so the collection stays small
SEED_ITEMS = 64


@events.init_command_line_parser.add_listener
def _arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="Model requested (a name or an alias).")
    parser.add_argument(
        "--cache-hit-share", type=float, default=0.3, help="Share of embedding requests repeating a hot text."
    )
    parser.add_argument(
        "--routing-keys", type=int, default=1000, help="Distinct x-routing-key values sent; 0 = send none."
    )
    parser.add_argument("--collection", default="loadtest", help="Collection searched and upserted into.")
    parser.add_argument("--think-time-s", type=float, default=0.2, help="Longest pause of a user between tasks.")
    parser.add_argument(
        "--api-key", default="", is_secret=True, env_var="EMBEDSERVE_LOADTEST_API_KEY", help="Bearer client key."
    )
    parser.add_argument(
        "--samples-file", default="", include_in_web_ui=False, help="Write one JSON line per request here."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated texts.")


def _options(environment: Environment) -> Any:
    """Locust's parsed command line, this file's options included."""
    assert environment.parsed_options is not None, "run through the locust command line"
    return environment.parsed_options


def _auth_headers(environment: Environment) -> dict[str, str]:
    key = _options(environment).api_key
    return {"authorization": f"Bearer {key}"} if key else {}


def _seed_collection(environment: Environment, host: str) -> None:
    """Create the collection if missing and put some items in it, waiting for Milvus to come up."""
    options = _options(environment)
    rng = random.Random(options.seed)
    items = [
        {"id": f"seed-{i}", "text": sentence(rng, 12), "metadata": {"topic": rng.choice(WORDS)}}
        for i in range(SEED_ITEMS)
    ]
    deadline = time.monotonic() + 30
    with Gateway(host, options.api_key or None) as gateway:
        while True:
            try:
                gateway.create_collection(options.collection, options.model, fields={"topic": "string"})
                gateway.upsert(options.collection, items)
                return
            except GatewayError as error:
                if error.status != 503 or time.monotonic() > deadline:
                    print(f"loadtest: seeding collection {options.collection} failed ({error}); searches will fail")
                    return
            time.sleep(1)  # the gateway connects to Milvus in the background


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    host = (environment.host or "").rstrip("/")
    EXPECTED.load(host, _options(environment).api_key or None)
    if any(user_class.__name__ == "CollectionUser" for user_class in environment.user_classes):
        _seed_collection(environment, host)


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    if environment.parsed_options and environment.parsed_options.samples_file:
        SAMPLES.open(environment.parsed_options.samples_file)


@events.request.add_listener
def _on_request(
    name: str, response_time: float, exception: BaseException | None, response: Any = None, **_: Any
) -> None:
    status = int(getattr(response, "status_code", 0) or 0)
    SAMPLES.write(name, response_time, exception is None, status)


@events.quitting.add_listener
def _on_quitting(**_: Any) -> None:
    SAMPLES.close()


class GatewayUser(FastHttpUser):
    """Shared plumbing: auth, routing keys, version naming, response checks."""

    abstract = True
    rng: random.Random

    def wait_time(self) -> float:
        return between(0.0, _options(self.environment).think_time_s)(self)

    def on_start(self) -> None:
        options = _options(self.environment)
        self.rng = random.Random()
        self.model: str = options.model
        self.routing_keys: int = options.routing_keys
        self.headers: dict[str, str] = _auth_headers(self.environment)

    def request_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.routing_keys > 0:
            headers["x-routing-key"] = f"user-{self.rng.randrange(self.routing_keys)}"
        return headers

    @staticmethod
    def versioned(response: Any, group: str) -> tuple[str, dict[str, Any] | None]:
        """Rename the request ``<group> v<version>``; return the version and the JSON body (None if unreadable)."""
        version = response.headers.get("x-model-version") if response.headers else None
        response.request_meta["name"] = f"{group} v{version or UNVERSIONED}"
        try:
            body = response.json()
        except (ValueError, TypeError):
            body = None
        return version or UNVERSIONED, body if isinstance(body, dict) else None

    def accepted(self, response: Any, group: str) -> tuple[str, str, dict[str, Any]] | None:
        """(model name, version, JSON body) of a 200 whose body names the version its header does; else the
        request is marked failed and None returned."""
        version, body = self.versioned(response, group)
        if response.status_code != 200 or body is None:
            response.failure(f"status {response.status_code}")
            return None
        name = self.check_model(response, body, version)
        return None if name is None else (name, version, body)

    @staticmethod
    def check_model(response: Any, body: dict[str, Any], version: str) -> str | None:
        """The body's ``model`` (name@version) must agree with the ``x-model-version`` header."""
        model = str(body.get("model", ""))
        name, _, body_version = model.rpartition("@")
        if version == UNVERSIONED:
            response.failure("no x-model-version header")
            return None
        if body_version != version:
            response.failure(f"body model {model!r} disagrees with x-model-version {version}")
            return None
        return name


class EmbeddingUser(GatewayUser):
    abstract = True
    group: ClassVar[str]

    def texts(self) -> list[str]:
        raise NotImplementedError

    def embed(self) -> None:
        inputs = self.texts()
        payload = {"model": self.model, "input": inputs, "encoding_format": "base64"}
        with self.client.post(
            "/v1/embeddings", json=payload, headers=self.request_headers(), name=self.group, catch_response=True
        ) as response:
            answer = self.accepted(response, self.group)
            if answer is None:
                return
            name, version, body = answer
            data = body.get("data") or []
            if len(data) != len(inputs):
                response.failure(f"{len(data)} embeddings for {len(inputs)} inputs")
                return
            dimension = EXPECTED.dimension(name, version)
            if dimension is None:
                response.failure(f"{name}@{version} is not listed by /v1/models")
                return
            for item in data:
                if len(base64.b64decode(item["embedding"])) != 4 * dimension:
                    response.failure(f"an embedding is not {dimension}-dimensional")
                    return


class ShortTextUser(EmbeddingUser):
    """Short sentences, several per request; a share of them repeat (cache hits)."""

    weight = 6
    group = GROUP_SHORT

    def on_start(self) -> None:
        super().on_start()
        seed_rng = random.Random(_options(self.environment).seed)
        self.hot = [sentence(seed_rng, seed_rng.randint(5, 15)) for _ in range(HOT_TEXTS)]
        self.hit_share: float = _options(self.environment).cache_hit_share

    def texts(self) -> list[str]:
        count = self.rng.randint(1, 8)
        return [
            self.rng.choice(self.hot)
            if self.rng.random() < self.hit_share
            else unique(self.rng, sentence(self.rng, self.rng.randint(5, 15)))
            for _ in range(count)
        ]

    @task
    def short_texts(self) -> None:
        self.embed()


class LongTextUser(EmbeddingUser):
    """One long paragraph per request (near the model's token limit, where batching and padding matter)."""

    weight = 2
    group = GROUP_LONG

    def texts(self) -> list[str]:
        words = self.rng.randint(120, 300)
        return [unique(self.rng, " ".join(sentence(self.rng, 10) for _ in range(words // 10)))]

    @task
    def long_text(self) -> None:
        self.embed()


class CollectionUser(GatewayUser):
    """Searches (3 of 4 tasks: dense, keyword, hybrid) and upserts of small batches on one collection."""

    weight = 2

    def on_start(self) -> None:
        super().on_start()
        self.collection: str = _options(self.environment).collection

    @task(3)
    def search(self) -> None:
        top_k = 10
        payload = {
            "query": sentence(self.rng, self.rng.randint(3, 8)),
            "top_k": top_k,
            "mode": self.rng.choice(("dense", "dense", "keyword", "hybrid")),
            "output_fields": [],
        }
        url = f"/v1/collections/{self.collection}/search"
        with self.client.post(
            url, json=payload, headers=self.request_headers(), name=GROUP_SEARCH, catch_response=True
        ) as response:
            answer = self.accepted(response, GROUP_SEARCH)
            if answer is None:
                return
            hits = answer[2].get("hits")
            if not isinstance(hits, list) or len(hits) > top_k:
                response.failure("hits missing or more than top_k")
                return
            scores = [hit["score"] for hit in hits]
            if scores != sorted(scores, reverse=True):
                response.failure("hits are not best first")

    @task(1)
    def upsert(self) -> None:
        # Distinct ids: the gateway refuses a request that names one id twice (400).
        ids = self.rng.sample(range(UPSERT_ID_SPACE), self.rng.randint(1, 8))
        items = [
            {
                "id": f"lt-{number}",
                "text": sentence(self.rng, self.rng.randint(8, 30)),
                "metadata": {"topic": self.rng.choice(WORDS)},
            }
            for number in ids
        ]
        url = f"/v1/collections/{self.collection}/items"
        with self.client.post(
            url, json={"items": items}, headers=self.request_headers(), name=GROUP_UPSERT, catch_response=True
        ) as response:
            answer = self.accepted(response, GROUP_UPSERT)
            if answer is not None and answer[2].get("upserted") != len(items):
                response.failure(f"upserted {answer[2].get('upserted')} of {len(items)}")


class StagedLoad(LoadTestShape):
    """Warm-up, ramp, peak and cool-down as shares of ``--run-time`` (default 60 s) and ``--users``."""

    use_common_options = True
    # (end of the stage as a share of the run time, share of --users during it)
    stages: ClassVar[tuple[tuple[float, float], ...]] = ((0.2, 0.25), (0.45, 0.5), (0.8, 1.0), (1.0, 0.5))

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        run_time = float(options.run_time or 60) if options else 60.0
        peak = max(1, int(options.num_users or 1)) if options else 1
        elapsed = time.perf_counter() - self.start_time
        for end, share in self.stages:
            if elapsed < end * run_time:
                return max(1, round(peak * share)), float(peak)
        return None
