"""The machine's compute floor for a model: how many inputs a second its matrix multiplications allow.

FLOPs are counted from the ONNX graph itself (shapes inferred at a given sequence length, 2·M·K·N for every
MatMul, the attention products included); the speed is ONNX Runtime's own MatMul on the model's weight
shapes (rows = a batch's tokens), with the thread count the gateway uses, timed in this run. The floor is
what the model could do if nothing but those multiplications ran, at their measured speed, on real tokens
only (padding counts as waste): a ceiling no server on this machine can beat, so each throughput is also
reported as a share of it.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

# Rows below this are attention products (tokens × tokens per head), not weight multiplications.
_MIN_WEIGHT_ROWS = 128


@dataclass(frozen=True)
class GraphFlops:
    per_token: float  # FLOPs per token at ``tokens`` tokens per input (attention grows with the length)
    weight_shapes: dict[tuple[int, int], float]  # (K, N) of each weight multiplication -> its FLOPs per token


@dataclass(frozen=True)
class ComputeFloor:
    matmul_gflops: float  # the model's weight multiplications, their FLOP mix, at the measured speed
    flops_per_token: float
    tokens_per_input: float

    @property
    def inputs_per_s(self) -> float:
        return self.matmul_gflops * 1e9 / (self.flops_per_token * self.tokens_per_input)


def graph_flops(onnx_path: Path, tokens: int) -> GraphFlops:
    """FLOPs per token of every MatMul in the graph for one input of ``tokens`` tokens."""
    model = onnx.load(str(onnx_path))
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = 1, tokens
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes: dict[str, list[int]] = {init.name: list(init.dims) for init in inferred.graph.initializer}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[info.name] = [d.dim_value for d in info.type.tensor_type.shape.dim]
    initializers = {init.name for init in inferred.graph.initializer}
    total = 0.0
    weights: dict[tuple[int, int], float] = {}
    for node in inferred.graph.node:
        if node.op_type != "MatMul":
            continue
        inner = shapes[node.input[0]][-1]
        flops = 2.0 * float(np.prod(shapes[node.output[0]])) * inner
        total += flops
        if node.input[1] in initializers:
            k, n = shapes[node.input[1]][-2:]
            weights[(k, n)] = weights.get((k, n), 0.0) + flops / tokens
    if total == 0:
        raise ValueError(f"{onnx_path} has no MatMul to count; count an unfused graph (export --no-optimize)")
    return GraphFlops(per_token=total / tokens, weight_shapes=dict(weights))


def matmul_gflops(k: int, n: int, rows: int, threads: int, seconds: float = 1.0) -> float:
    """ONNX Runtime's MatMul speed for [rows, k] × [k, n] with ``threads`` intra-op threads."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((rows, k), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"x": x})
        runs += 1
    return 2.0 * rows * k * n * runs / (time.perf_counter() - started) / 1e9


def compute_floor(onnx_path: Path, tokens_per_input: float, batch: int, threads: int) -> ComputeFloor:
    """The floor for inputs of ``tokens_per_input`` real tokens, GEMM rows of a ``batch``-input batch."""
    flops = graph_flops(onnx_path, max(1, round(tokens_per_input)))
    rows = max(1, round(batch * tokens_per_input))
    weight_flops = sum(flops.weight_shapes.values())
    # Seconds per token if every weight multiplication ran at its own measured speed; the attention products
    # (a few % of the FLOPs at these lengths) are taken at the weights' average speed.
    seconds = sum(f / (matmul_gflops(k, n, rows, threads) * 1e9) for (k, n), f in flops.weight_shapes.items())
    gflops = weight_flops / seconds / 1e9
    return ComputeFloor(matmul_gflops=gflops, flops_per_token=flops.per_token, tokens_per_input=tokens_per_input)
