"""The gateway's settings: environment variables with the prefix ``EMBEDSERVE_``.

Built once at the edge (``service.__main__`` or a test) and passed inward; nothing reads the
environment at import time. Every field is documented where it is declared and listed in the README.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What a key may do: embed (/v1/embeddings, /v1/models, TEI's /embed, /tokenize, /info), search (read
# collections), write (create, upsert, delete, re-index collections), admin (/v1/rollouts, /readyz detail). The
# admin key holds every scope.
Scope = Literal["embed", "search", "write", "admin"]
READ_SCOPES: frozenset[Scope] = frozenset({"embed", "search"})
# OpenTelemetry's sampler names (OTEL_TRACES_SAMPLER) that the SDK implements itself.
Sampler = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]


class ApiKey(BaseModel):
    """A client key and what it may do; a plain string in EMBEDSERVE_API_KEYS is a key that reads only."""

    key: SecretStr
    scopes: frozenset[Scope] = READ_SCOPES


class Settings(BaseSettings):
    # validate_by_name: Settings(otlp_endpoint=...) works for the settings that also read OTEL_* variables.
    model_config = SettingsConfigDict(env_prefix="EMBEDSERVE_", extra="ignore", validate_by_name=True)

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, description="Port the HTTP server listens on.")
    model_repository: Path = Field(
        Path("model_repository"),
        description="Triton-layout model repository: <model>/config.pbtxt and one folder per version.",
    )
    default_model: str = Field("minilm", description="Model used when a request omits 'model'.")
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description='JSON map of extra names to served models, e.g. {"text-embedding-3-small": "minilm"}.',
    )
    stable_versions: dict[str, int] = Field(
        default_factory=dict,
        description="JSON map model -> version served when a request does not pin one; "
        "a model missing here serves its highest verified version.",
    )
    backend: Literal["onnx", "triton"] = Field(
        "onnx", description="Inference backend: in-process ONNX Runtime, or a Triton server."
    )
    triton_url: str = Field("127.0.0.1:8011", description="host:port of Triton's gRPC endpoint (backend=triton).")
    triton_timeout_s: float = Field(10.0, description="Timeout of one Triton inference call.")
    triton_tls: bool = Field(
        False, description="Talk to Triton's gRPC endpoint over TLS (Triton's --grpc-use-ssl); off = plaintext."
    )
    triton_tls_ca_file: Path | None = Field(
        None, description="PEM root certificates that sign Triton's server certificate; unset = the system's roots."
    )
    triton_tls_cert_file: Path | None = Field(
        None, description="PEM client certificate chain, when Triton asks for one (mutual TLS); with its key file."
    )
    triton_tls_key_file: Path | None = Field(None, description="PEM private key of the client certificate (mTLS).")
    triton_model_control: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="Triton's --model-control-mode (backend=triton). explicit: when the gateway hot-loads a new "
        "version, or a version leaves the repository, it asks Triton to load the model again through the repository "
        "API (Triton re-reads the model's config and versions); none/poll: Triton finds versions itself (poll) or "
        "at its start (none), and /readyz says until when a new one is not served.",
    )
    triton_batches_in_flight: int = Field(
        4,
        ge=1,
        description="Batches of one version this gateway process sends to Triton at once (backend=triton): while one "
        "crosses the network or waits in Triton's queue, the others keep the GPU busy. Triton runs them at the same "
        "time only with enough model instances (instance_group count) or merges them in its dynamic batcher. The "
        "in-process ONNX backend always runs one batch at a time per version.",
    )
    triton_max_batch_tokens: int = Field(
        8192,
        ge=1,
        description="Most tokens in one batch sent to Triton, padding included (rows x longest row); "
        "EMBEDSERVE_MAX_BATCH_TOKENS is the in-process ONNX backend's budget. GPUs gain from large batches.",
    )
    inference_threads: int = Field(
        0,
        ge=0,
        description="CPU threads in-process inference may use, shared by every loaded version; 0 = the "
        "container's CPU quota (cgroup), else the CPUs this process may run on.",
    )
    inference_parallel_batches: int = Field(
        0,
        ge=0,
        description="Batches of one version in-process CPU inference runs at once, each on its share of the "
        "threads; 0 = one per thread (under load, one-thread batches side by side beat one batch on every thread; "
        "a lone batch still gets every thread). Above 1 a version's graph is opened twice (its weights twice in "
        "memory); 1 = one batch at a time on every thread.",
    )
    model_rescan_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between scans of the model repository for new, removed or changed versions "
        "(hot-loading; POST /v1/admin/models/reload scans at once); 0 = only at start and on that call.",
    )
    inference_spinning: Literal["auto", "on", "off"] = Field(
        "off",
        description="Whether ONNX Runtime's threads busy-wait for work during a batch (never between batches): off "
        "keeps tail latency when other processes share the cores; on or auto (on with one version loaded only) "
        "gain a few percent on cores the gateway has to itself.",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where in-process inference runs: cpu, or cuda (ONNX Runtime's CUDA execution provider; needs "
        "the onnxruntime-gpu build).",
    )
    truncate: bool = Field(
        True,
        description="Truncate inputs longer than the model's token limit; when false they get a 400.",
    )
    max_inputs_per_request: int = Field(2048, description="Most inputs one embeddings request may carry.")
    max_input_chars: int = Field(
        32_768, description="Most characters in one input; longer inputs get a 400 before tokenisation."
    )
    max_batch_size: int = Field(32, description="Most inputs in one inference batch.")
    max_batch_tokens: int = Field(
        512,
        description="Most tokens in one inference batch of the in-process ONNX backend, padding included (rows x "
        "longest row): it bounds a batch's latency. On CPU a padded graph's throughput peaked around 500 padded "
        "tokens per batch. At c=32 batches hold ~16 short inputs whatever the budget (one batch runs while the "
        "next fills), so a larger one changes only deeper queues' batches (see README, Benchmark). Triton's "
        "batches have their own budget, EMBEDSERVE_TRITON_MAX_BATCH_TOKENS.",
    )
    max_wait_ms: float = Field(
        0.0,
        description="Longest a queued input waits for its batch to fill while the backend is idle; 0 = run at "
        "once (batches still fill while the previous one runs).",
    )
    max_queue_inputs: int = Field(
        512,
        ge=1,
        description="Most interactive inputs waiting per model version (~2 s of CPU work for MiniLM); beyond it "
        "requests get 429 with Retry-After, before any work is done for them.",
    )
    bulk_min_inputs: int = Field(
        64,
        ge=1,
        description="Requests with more inputs than this go to the bulk lane (document batches, collection "
        "upserts, re-index batches); smaller ones are interactive.",
    )
    max_bulk_queue_inputs: int = Field(
        8192, ge=1, description="Most bulk inputs waiting per model version; beyond it bulk requests get 429."
    )
    bulk_share: float = Field(
        0.15,
        ge=0.01,
        le=1.0,
        description="Share of the inference time the bulk lane gets while interactive inputs wait too (alone it "
        "gets all).",
    )
    bulk_max_batch_tokens: int = Field(
        192,
        ge=1,
        description="Most tokens in one bulk batch of the in-process ONNX backend: small, so an interactive input "
        "waits behind one short batch at most (Triton's batches use EMBEDSERVE_TRITON_MAX_BATCH_TOKENS).",
    )
    request_timeout_s: float = Field(30.0, description="Deadline of one embedding request; past it, 504.")
    shutdown_drain_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, seconds the gateway keeps serving while /readyz answers 503, so load balancers "
        "stop sending before it stops; 0 = stop at once (in-flight requests still finish).",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="Largest request body accepted (2,048 inputs of ~4,000 characters); a larger one gets 413 "
        "before it is all read into memory.",
    )
    cache_enabled: bool = Field(True, description="Cache embeddings (in-process LRU, and Redis when configured).")
    cache_memory_bytes: int = Field(
        256 * 1024 * 1024,
        description="Memory budget of the in-process LRU cache (keys, vectors and the map's own entries); "
        "0 turns that layer off.",
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, description="Time to live of cache entries in Redis.")
    redis_url: str | None = Field(
        None, description="Redis for the shared cache (and rollout state), e.g. redis://127.0.0.1:6379/0; unset = none."
    )
    redis_prefix: str = Field("embedserve:", description="Prefix of every Redis key this gateway writes.")
    redis_timeout_ms: float = Field(100.0, description="Timeout of one Redis call; slower counts as a failure.")
    redis_failure_threshold: int = Field(3, description="Redis failures in a row that open the circuit breaker.")
    redis_retry_after_s: float = Field(5.0, description="How long an open circuit skips Redis before probing it.")
    log_level: str = Field("INFO", description="Log level of the JSON logs.")

    # Tracing (service/telemetry/tracing.py). Each also reads OpenTelemetry's standard variable, named second;
    # the EMBEDSERVE_ one wins when both are set.
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "EMBEDSERVE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
        description="OTLP/gRPC endpoint that receives the traces, e.g. http://otel-collector:4317 (else "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT); unset = no exporter (spans are "
        "no-ops; an incoming traceparent still reaches the logs).",
    )
    otlp_protocol: Literal["grpc"] = Field(
        "grpc",
        validation_alias=AliasChoices(
            "EMBEDSERVE_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"
        ),
        description="OTLP transport (else OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL): "
        "grpc only; http/protobuf refuses to start rather than send gRPC to an HTTP receiver.",
    )
    otel_sdk_disabled: bool = Field(
        False,
        validation_alias=AliasChoices("EMBEDSERVE_OTEL_SDK_DISABLED", "OTEL_SDK_DISABLED"),
        description="true turns tracing off, whatever else is set (else OTEL_SDK_DISABLED).",
    )
    otel_service_name: str | None = Field(
        None,
        validation_alias=AliasChoices("EMBEDSERVE_OTEL_SERVICE_NAME", "OTEL_SERVICE_NAME"),
        description="service.name of the exported traces (else OTEL_SERVICE_NAME); unset = service.name in "
        "OTEL_RESOURCE_ATTRIBUTES, else embedserve.",
    )
    otel_traces_sampler: Sampler = Field(
        "parentbased_traceidratio",
        validation_alias=AliasChoices("EMBEDSERVE_OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER"),
        description="Which traces are recorded (else OTEL_TRACES_SAMPLER), OpenTelemetry's names: parentbased_* "
        "follow a caller's traceparent and decide by the rest only for new traces; traceidratio records "
        "otel_sample_ratio of them.",
    )
    otel_sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("EMBEDSERVE_OTEL_SAMPLE_RATIO", "OTEL_TRACES_SAMPLER_ARG"),
        description="Share of traces the traceidratio samplers record (else OTEL_TRACES_SAMPLER_ARG); with the "
        "default sampler a request whose traceparent says sampled (or not) follows it.",
    )

    # Access and rollouts (service/edge/auth.py, service/rollouts/store.py).
    admin_api_key: SecretStr | None = Field(
        None, description="Key of the admin routes (/v1/rollouts), sent as a Bearer token; unset = admin API off."
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description='JSON list of client keys, each a string (scopes embed and search) or {"key": ..., "scopes": '
        '[...]} with scopes among embed, search, write, admin, e.g. ["k1", {"key": "k2", "scopes": ["embed", '
        '"search", "write"]}]; when set, every data route needs a key as a Bearer token, with its route\'s scope.',
    )
    allow_anonymous_writes: bool = Field(
        False,
        description="Without client keys, let anyone create, fill, delete and re-index collections (a warning "
        "is logged at start); off = those routes answer 403 until a key with the write scope is set.",
    )
    rollout_refresh_s: float = Field(
        1.0, gt=0, description="Seconds between two reads of the rollout states from Redis by each replica."
    )

    # Release triggers and budgets (service/releases): what lets `python -m trainer release` start a release.
    release_max_per_window: int = Field(
        1, ge=0, description="Releases that may start within release_window_s, every model together; 0 = none."
    )
    release_max_training_hours: float = Field(
        24.0,
        ge=0,
        description="Training hours the releases started within release_window_s may use together; a release "
        "is refused once they are spent, and one running stops training when it reaches what is left.",
    )
    release_window_s: float = Field(
        7 * 86400.0, gt=0, description="The sliding window of the release budget, in seconds (default a week)."
    )
    release_max_duration_s: float = Field(
        86400.0,
        gt=0,
        description="A release that reported no outcome blocks another of its model for at most this long "
        "(a crashed release that is never resumed).",
    )
    release_max_model_age_s: float = Field(
        30 * 86400.0,
        gt=0,
        description="Staleness trigger: a release is due when the stable version was exported longer ago.",
    )
    release_drift_mmd: float = Field(
        0.1, ge=0, description="Drift trigger: the stable version's embedserve_drift_mmd above this ..."
    )
    release_drift_intervals: int = Field(
        4, ge=1, description="... for this many drift recomputations in a row (drift_interval_s apart) on a replica."
    )

    # Drift monitoring (service/telemetry/drift.py).
    drift_interval_s: float = Field(
        15.0, gt=0, description="Seconds between two recomputations of the drift gauges (MMD, mean cosine distance)."
    )
    drift_sample_size: int = Field(
        512, ge=2, description="Served embeddings kept per version (a uniform reservoir sample) to score drift on."
    )
    drift_min_samples: int = Field(
        64, ge=2, description="Served embeddings a version needs in its sample before it gets drift scores."
    )
    drift_text_sample_size: int = Field(
        256,
        ge=0,
        description="Recent distinct request texts kept per model, in memory only, for the rollout analysis's "
        "neighbourhood agreement; 0 keeps none.",
    )

    # Vector search (service/vectors/store.py).
    milvus_uri: str = Field(
        "data/milvus.db",
        description="Milvus to store collections in: a local file path ending in .db runs Milvus Lite in-process; "
        "http://host:19530 is a Milvus standalone or cluster.",
    )
    milvus_token: str = Field("", description="Milvus token (user:password or API key); empty = none.")
    vector_index: str = Field(
        "HNSW", description="Milvus index type of the dense vectors (HNSW, IVF_FLAT, FLAT, AUTOINDEX, ...)."
    )
    vector_index_params: dict[str, int | float | str] = Field(
        default_factory=lambda: dict[str, int | float | str]({"M": 16, "efConstruction": 200}),
        description='JSON map of build parameters of vector_index, e.g. {"M": 16, "efConstruction": 200}.',
    )
    vector_search_ef: int = Field(
        128, description="HNSW search breadth (ef); raised to top_k when a search asks for more hits."
    )
    vector_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = Field(
        "Strong", description="Milvus consistency level of new collections; Strong = a search sees every prior write."
    )
    keyword_analyzer: Literal["english_stop", "standard"] = Field(
        "english_stop",
        description="How new collections (and the new version of a re-indexed one) analyse text for keyword search: "
        "english_stop = standard tokenizer, lower case, English stop words, BM25 k1 1.2 b 0.75; standard = Milvus's "
        "default analyser (what collections created before this setting have). Fixed per collection at creation.",
    )
    reindex_batch_size: int = Field(256, description="Items re-embedded per batch while a collection is re-indexed.")
    reindex_grace_s: int = Field(
        300, description="Seconds the previous version's collection is kept after a re-index moves the alias."
    )
    vector_lease_s: float = Field(
        10.0,
        gt=0,
        description="With Redis: seconds a replica's hold on a collection (a write, a catalog change) and its lease on "
        "a re-index it drives last without renewal (renewed every third of it); a replica that dies holding one "
        "holds the others up that long.",
    )

    @model_validator(mode="after")
    def _triton_tls_complete(self) -> "Settings":
        if (self.triton_tls_cert_file is None) != (self.triton_tls_key_file is None):
            raise ValueError(
                "EMBEDSERVE_TRITON_TLS_CERT_FILE and EMBEDSERVE_TRITON_TLS_KEY_FILE go together (mutual TLS): set both "
                "or neither"
            )
        files = [self.triton_tls_ca_file, self.triton_tls_cert_file, self.triton_tls_key_file]
        if any(files) and not self.triton_tls:
            raise ValueError("EMBEDSERVE_TRITON_TLS_* files are set but EMBEDSERVE_TRITON_TLS is off: set it to true")
        missing = [str(path) for path in files if path is not None and not path.is_file()]
        if missing:
            raise ValueError(f"Triton TLS file(s) not found: {', '.join(missing)}")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _plain_keys_read(cls, entries: Any) -> Any:
        if isinstance(entries, list):
            return [{"key": entry} if isinstance(entry, str | SecretStr) else entry for entry in entries]
        return entries


def load_settings() -> Settings:
    """Read settings from the environment (call at the edge, never at import time)."""
    return Settings()
