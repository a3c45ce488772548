"""Triton python-backend model: runs the version's ``model.onnx`` with ONNX Runtime.

Laid into each version folder of a python-backend Triton repository as ``model.py``, next to the
same ``model.onnx`` the ONNX backend serves. It runs inside Triton's python stub, never in the
gateway, so it imports only what that environment has: triton_python_backend_utils, numpy and
onnxruntime (numpy < 2 there: the stub's numpy 2 support returns empty tensors).

Inputs ``input_ids`` and ``attention_mask`` (INT64 [batch, seq]); output ``embedding``
(FP32 [batch, dim]), already pooled and L2-normalised by the graph.
"""

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"


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
        model_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
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
