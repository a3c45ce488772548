"""Triton Inference Server backend: token ids go over gRPC to the version's model, vectors come back.

One channel for every request (connections reused); every call has a timeout; every version is
addressed explicitly (``model_version``), so two versions are served side by side during a canary.
A batch larger than the version's ``max_batch_size`` in Triton (read from Triton's model config) is
sent as several requests and the rows put back in order. Triton's own error text never reaches a
client: it is logged (it names models and tensors, never request text), and the client gets a 503
that says what is unavailable.

Content: a version is addressed by name and number, so the gateway also checks that Triton's copy is
the one it verified. The model config Triton loaded names each version's sha256 (a parameter the trainer
writes, see ``service.models.manifest.TRITON_SHA256_PREFIX``); a version whose digest is missing or not
its verified manifest's is refused: /readyz says why and how to fix it, requests pinned to it get a 503.
"""

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from service.backends.contract import READY, Availability
from service.errors import ServiceUnavailable
from service.models.manifest import triton_sha256_key
from service.models.store import ModelVersion
from service.models.tokenization import TokenBatch

log = logging.getLogger(__name__)

# The tensors of every version's Triton model config (trainer/release/triton_config.py writes them).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT = "embedding"

# How the python backend's model.py (triton_python_model.py) starts the error of a version whose files it refused.
REFUSED = "embedserve refused this version's files"

# gRPC statuses (as tritonclient spells them) that get a message of their own.
_DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
_NOT_FOUND = "StatusCode.NOT_FOUND"


@dataclass(frozen=True)
class TritonTls:
    """TLS to Triton's gRPC endpoint: the roots that sign its certificate (None: the system's), and a client
    certificate and key when Triton asks for one (mutual TLS)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def _path(file: Path | None) -> str | None:
    return None if file is None else str(file)


@dataclass(frozen=True)
class _TritonVersion:
    """What Triton's model config says about one version."""

    max_batch_size: int  # rows one request may carry; 0 = no limit
    sha256: str | None  # the digest the config names for this version


class TritonBackend:
    name = "triton"

    def __init__(
        self,
        url: str,
        timeout_s: float,
        batches_in_flight: int,
        ready_timeout_s: float = 1.0,
        explicit_loading: bool = False,
        tls: TritonTls | None = None,
    ) -> None:
        self.url = url
        self.batches_in_flight = batches_in_flight
        self._explicit_loading = explicit_loading  # Triton in --model-control-mode=explicit: load through its API
        self._timeout_s = timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._client = (
            triton_grpc.InferenceServerClient(url=url)
            if tls is None
            else triton_grpc.InferenceServerClient(
                url=url,
                ssl=True,
                root_certificates=_path(tls.ca_file),
                certificate_chain=_path(tls.cert_file),
                private_key=_path(tls.key_file),
            )
        )
        # (model, version) -> its model config in Triton; read on first use, again by every availability check.
        self._configs: dict[tuple[str, int], _TritonVersion] = {}
        # (model, version) -> its last known availability: a change is logged once, not at every probe.
        self._known: dict[tuple[str, int], Availability] = {}

    async def start(self, versions: list[ModelVersion]) -> None:
        # Triton may come up after the gateway: not being ready yet is reported by /readyz, not fatal.
        for version in versions:
            await self.availability(version)

    async def load(self, version: ModelVersion) -> None:
        """In explicit mode, have Triton load the version's model again (it re-reads the config and the version
        folders, keeps serving the loaded versions meanwhile); otherwise Triton loads what its repository holds
        (poll mode) or held at its start. Either way /readyz says when Triton serves the version."""
        if self._explicit_loading:
            await self._load_model(version)
        await self.availability(version)

    async def unload(self, version: ModelVersion) -> None:
        self._configs.pop((version.model, version.version), None)
        self._known.pop((version.model, version.version), None)
        if self._explicit_loading:
            await self._load_model(version)  # Triton drops the versions whose folders are gone

    async def _load_model(self, version: ModelVersion) -> None:
        try:
            await self._client.load_model(version.model, client_timeout=self._timeout_s)
            log.info("triton model loaded", extra={"model": version.model, "version": version.version})
        except InferenceServerException as error:
            self._log_error("triton could not load the model", version, error)

    async def availability(self, version: ModelVersion) -> Availability:
        key = (version.model, version.version)
        try:
            loaded = bool(
                await self._client.is_model_ready(
                    version.model, str(version.version), client_timeout=self._ready_timeout_s
                )
            )
        except InferenceServerException:
            loaded = False
        if not loaded:
            # Triton may come back with another config: read it again then.
            self._configs.pop(key, None)
            return await self._note(version, Availability("not_loaded", f"not loaded in Triton at {self.url}"))
        try:
            self._configs[key] = await self._read_config(version)
        except InferenceServerException as error:
            self._log_error("reading the triton model config failed", version, error)
            return await self._note(version, Availability("not_loaded", "Triton did not return its model config"))
        return await self._note(version, self._judge(version, self._configs[key]))

    def _judge(self, version: ModelVersion, config: _TritonVersion) -> Availability:
        """READY when Triton's config names the sha256 of the manifest this gateway verified for ``version``."""
        expected = version.manifest.sha256
        if config.sha256 == expected:
            return READY
        reload = f"then reload {version.model} in Triton (or restart it)"
        if config.sha256 is None:
            return Availability(
                "content_mismatch",
                f"Triton's config of {version.model} names no sha256 for version {version.version} "
                f"(parameter {triton_sha256_key(version.version)}), so its content cannot be matched to the verified "
                "manifest: run `python -m trainer triton-config --repository <Triton's model repository>` (or rebuild "
                f"a python-backend copy with `python -m trainer triton-repository`), {reload}",
            )
        return Availability(
            "content_mismatch",
            f"Triton serves other content as {version.name}: its config names sha256 {config.sha256}, the manifest "
            f"this gateway verified has {expected}; give Triton and the gateway the same model repository (an "
            f"exported version is never changed: export a new one instead), {reload}",
        )

    async def _note(self, version: ModelVersion, availability: Availability) -> Availability:
        """Log a change of ``version``'s availability (with Triton's reason for a failed load); return it."""
        key = (version.model, version.version)
        previous = self._known.get(key)
        self._known[key] = availability
        if previous == availability:
            return availability
        labels = {"model": version.model, "version": version.version, "triton_url": self.url}
        if availability.state == "content_mismatch":
            config = self._configs.get(key)
            log.error(
                "triton version refused",
                extra={
                    **labels,
                    "reason": availability.reason,
                    "expected_sha256": version.manifest.sha256,
                    "triton_sha256": config.sha256 if config else None,
                },
            )
        elif availability.state == "not_loaded":
            log.warning("version not loaded in triton", extra={**labels, **await self._load_state(version)})
        else:
            log.info("version ready in triton", extra={**labels, "sha256": version.manifest.sha256})
        return availability

    async def _load_state(self, version: ModelVersion) -> dict[str, str]:
        """Triton's own state and reason for ``version`` (e.g. why its load failed), for the log only."""
        try:
            index = await self._client.get_model_repository_index(client_timeout=self._ready_timeout_s)
        except InferenceServerException:
            return {}
        for entry in index.models:
            if entry.name == version.model and entry.version == str(version.version):
                return {"triton_state": entry.state, "triton_reason": entry.reason}
        return {"triton_state": "absent from its repository"}

    async def embed(self, version: ModelVersion, batch: TokenBatch) -> np.ndarray:
        rows = int(batch.input_ids.shape[0])
        try:
            config = await self._config(version)
            if not self._judge(version, config).ready:
                raise _other_content(version)
            step = config.max_batch_size or max(rows, 1)
            chunks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
            parts = await asyncio.gather(
                *(self._infer(version, batch.input_ids[a:b], batch.attention_mask[a:b]) for a, b in chunks)
            )
        except InferenceServerException as error:
            self._configs.pop((version.model, version.version), None)
            self._log_error("triton inference failed", version, error, rows=rows)
            if REFUSED in (error.message() or ""):
                raise _other_content(version) from None
            if error.status() == _DEADLINE_EXCEEDED:
                raise ServiceUnavailable(
                    f"the inference server did not answer for {version.name} within {self._timeout_s:g} s; "
                    "retry later (see /readyz)."
                ) from None
            if error.status() == _NOT_FOUND:
                raise ServiceUnavailable(f"the inference server has not loaded {version.name} (see /readyz).") from None
            raise ServiceUnavailable(
                f"the inference server is unavailable for {version.name}; retry later (see /readyz)."
            ) from None
        return np.concatenate(parts)

    async def _config(self, version: ModelVersion) -> _TritonVersion:
        key = (version.model, version.version)
        if key not in self._configs:
            self._configs[key] = await self._read_config(version)
            await self._note(version, self._judge(version, self._configs[key]))
        return self._configs[key]

    async def _read_config(self, version: ModelVersion) -> _TritonVersion:
        response = await self._client.get_model_config(
            version.model, str(version.version), client_timeout=self._ready_timeout_s
        )
        parameters = response.config.parameters
        key = triton_sha256_key(version.version)
        return _TritonVersion(
            max_batch_size=int(response.config.max_batch_size),
            sha256=parameters[key].string_value if key in parameters else None,
        )

    async def _infer(self, version: ModelVersion, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        inputs = [
            InferInput(INPUT_IDS, list(input_ids.shape), "INT64"),
            InferInput(ATTENTION_MASK, list(attention_mask.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(input_ids)
        inputs[1].set_data_from_numpy(attention_mask)
        result = await self._client.infer(
            version.model,
            inputs,
            model_version=str(version.version),
            outputs=[InferRequestedOutput(OUTPUT)],
            client_timeout=self._timeout_s,
        )
        vectors = result.as_numpy(OUTPUT)
        if vectors is None or vectors.shape != (len(input_ids), version.dimension):
            log.error("triton returned a malformed output", extra={"model": version.model, "version": version.version})
            raise ServiceUnavailable(f"the inference server answered {version.name} with a malformed output.")
        return np.asarray(vectors, dtype=np.float32)

    def _log_error(self, message: str, version: ModelVersion, error: InferenceServerException, **extra: int) -> None:
        log.error(
            message,
            extra={
                "model": version.model,
                "version": version.version,
                "triton_status": error.status(),
                "triton_message": error.message(),
                **extra,
            },
        )

    async def close(self) -> None:
        await self._client.close()


def _other_content(version: ModelVersion) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"{version.name} is not served: the inference server holds other content under that version; "
        "pin another version, or retry once an operator has fixed it (see /readyz)."
    )
