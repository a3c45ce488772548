"""Triton python-backend model: runs the version's ``model.onnx`` with ONNX Runtime.

Laid into each version folder of a python-backend Triton repository as ``model.py``, next to the
same ``model.onnx`` the ONNX backend serves. It runs inside Triton's python stub, never in the
gateway, so it imports only what that environment has: triton_python_backend_utils, numpy and
onnxruntime (numpy < 2 there: the stub's numpy 2 support returns empty tensors).

Inputs ``input_ids`` and ``attention_mask`` (INT64 [batch, seq]); output ``embedding``
(FP32 [batch, dim]), already pooled and L2-normalised by the graph.

At load, each instance checks that its ``model.onnx`` is the one the ``manifest.json`` beside it names,
and that manifest the one the model's config names for this version, so the digest the gateway reads from
the config is the content Triton runs. A version whose files do not match is never run: it loads, logs
why in Triton's log, and answers every request with an error that starts with REFUSED (the gateway turns
it into a 503 that says so). It does not fail its load: Triton loads a model's versions all or nothing,
so one changed old version would take every version of the model down.
"""

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
# service.models.manifest.TRITON_SHA256_PREFIX and service.backends.triton.REFUSED (Triton's python stub has no
# `service` to import them from).
SHA256_PREFIX = "embedserve_sha256_v"
REFUSED = "embedserve refused this version's files"
_CHUNK = 1 << 20


def version_digest(files: dict[str, Any]) -> str:
    """``Manifest.sha256`` of a manifest's ``files``: sha256 over the sorted per-file digests."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\0{files[path]['sha256']}\n".encode())
    return digest.hexdigest()


def content_problem(version_dir: Path, claimed: str | None) -> str | None:
    """Why the files of ``version_dir`` are not the version its config names, or None when they are.

    model.onnx must have the size and sha256 the manifest.json beside it lists, and that manifest's digest
    must be ``claimed`` (the config's; a config that names none is left to the gateway, which refuses it)."""
    manifest_path = version_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"{MANIFEST_FILE} is missing; rebuild this repository with `python -m trainer triton-repository`"
    files = json.loads(manifest_path.read_text()).get("files", {})
    expected = files.get(ONNX_FILE)
    onnx_path = version_dir / ONNX_FILE
    if expected is None or not onnx_path.is_file():
        return f"{ONNX_FILE} is missing, or not listed in {MANIFEST_FILE}"
    digest = hashlib.sha256()
    with onnx_path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if onnx_path.stat().st_size != expected["size"] or digest.hexdigest() != expected["sha256"]:
        return f"{ONNX_FILE} does not match its sha256 in {MANIFEST_FILE}: the file was changed after export"
    if claimed is not None and version_digest(files) != claimed:
        return f"{MANIFEST_FILE} has sha256 {version_digest(files)}, but config.pbtxt names {claimed} for this version"
    return None


def choose_providers(instance_kind: str, device_id: int, available: list[str]) -> tuple[list[Any], str | None]:
    """ONNX Runtime providers for one Triton model instance, and why it fell back to the CPU (or None).

    A KIND_GPU instance runs on CUDA (its own device) when ONNX Runtime offers the CUDA provider, and
    on the CPU otherwise; every other kind (KIND_CPU, KIND_MODEL) runs on the CPU."""
    if instance_kind != "GPU":
        return ["CPUExecutionProvider"], None
    if "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], None
    return ["CPUExecutionProvider"], (
        f"KIND_GPU instance on device {device_id} runs on the CPU: this onnxruntime offers no "
        f"CUDAExecutionProvider (only {', '.join(available)}); install onnxruntime-gpu in Triton's model environment"
    )


class TritonPythonModel:
    """The python backend's model contract: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        parameters = json.loads(args["model_config"]).get("parameters", {})
        claimed = parameters.get(SHA256_PREFIX + args["model_version"], {}).get("string_value")
        problem = content_problem(version_dir, claimed)
        self._refusal: str | None = None
        if problem:
            self._refusal = f"{REFUSED}: {args['model_name']} version {args['model_version']}: {problem}"
            pb_utils.Logger.log_error(self._refusal)
            return
        model_path = version_dir / ONNX_FILE
        providers, fallback = choose_providers(
            args.get("model_instance_kind", "CPU"),
            int(args.get("model_instance_device_id", 0)),
            ort.get_available_providers(),
        )
        if fallback:
            pb_utils.Logger.log_warn(f"{args['model_name']} version {args['model_version']}: {fallback}")
        self._session = ort.InferenceSession(str(model_path), providers=providers)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer every request, in order; a bad request fails alone, not the batch it came in."""
        if self._refusal:
            return [_error(self._refusal) for _ in requests]
        responses: list[Any] = [None] * len(requests)
        # Requests of equal sequence length are stacked into one run; different lengths run apart,
        # so no padding is added and every row gets exactly the vector it would get alone.
        groups: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = defaultdict(list)
        for index, request in enumerate(requests):
            input_ids, attention_mask = (
                pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in INPUT_NAMES
            )
            if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
                responses[index] = _error(
                    f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                    "must share one [batch, seq] shape"
                )
                continue
            groups[input_ids.shape[1]].append((index, input_ids, attention_mask))

        for members in groups.values():
            try:
                (vectors,) = self._session.run(
                    [OUTPUT_NAME],
                    {
                        "input_ids": np.concatenate([ids for _, ids, _ in members]),
                        "attention_mask": np.concatenate([mask for _, _, mask in members]),
                    },
                )
            except Exception as error:  # ONNX Runtime raises several unrelated types; each request gets the text.
                for index, _, _ in members:
                    responses[index] = _error(f"onnxruntime failed: {error}")
                continue
            start = 0
            for index, ids, _ in members:
                rows = np.ascontiguousarray(vectors[start : start + len(ids)], dtype=np.float32)
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, rows)])
                start += len(ids)
        return responses


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
