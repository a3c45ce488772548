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


@dataclass(frozen=True)
class GraphFlops:
    per_token: float  # FLOPs per token at ``tokens`` tokens per input (attention grows with the length)
    weight_shapes: dict[tuple[int, int], float]  # (K, N) of each weight multiplication -> its FLOPs per token
    weight_sequence: tuple[tuple[int, int], ...]  # (K, N) of every weight multiplication, in graph order


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
    sequence: list[tuple[int, int]] = []
    for node in inferred.graph.node:
        if node.op_type != "MatMul":
            continue
        inner = shapes[node.input[0]][-1]
        flops = 2.0 * float(np.prod(shapes[node.output[0]])) * inner
        total += flops
        if node.input[1] in initializers:
            k, n = shapes[node.input[1]][-2:]
            weights[(k, n)] = weights.get((k, n), 0.0) + flops / tokens
            sequence.append((k, n))
    if total == 0:
        raise ValueError(f"{onnx_path} has no MatMul to count; count the traced graph (export.graph: traced)")
    return GraphFlops(per_token=total / tokens, weight_shapes=weights, weight_sequence=tuple(sequence))


class GemmProbe:
    """The model's weight multiplications, every one of them in graph order, as one chain of ONNX Runtime MatMuls
    of ``rows`` rows (a batch's tokens) in one session with the gateway's thread count: one pass is the FLOPs of
    one forward pass's weight products, nothing else. ``run`` times a pass, so that a benchmark can interleave
    passes with the runs it compares them to (on a shared machine, what is measured apart is measured in other
    weather). One session, because the idle threads of several would spin against each other."""

    def __init__(self, flops: GraphFlops, rows: int, threads: int) -> None:
        self.flops = flops
        self.threads = threads
        rng = np.random.default_rng(0)
        nodes, weights = [], []
        current = "x"
        for index, (k, n) in enumerate(flops.weight_sequence):
            if index and flops.weight_sequence[index - 1][1] != k:
                raise ValueError(f"weight products {flops.weight_sequence[index - 1]} then {(k, n)} do not chain")
            # Scaled so that values stay near 1 through the chain (no overflow, no denormals).
            weight = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
            weights.append(numpy_helper.from_array(weight, f"w{index}"))
            nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"y{index}"]))
            current = f"y{index}"
        first_k, last_n = flops.weight_sequence[0][0], flops.weight_sequence[-1][1]
        graph = helper.make_graph(
            nodes,
            "weight_products",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, first_k])],
            [helper.make_tensor_value_info(current, TensorProto.FLOAT, [rows, last_n])],
            initializer=weights,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Not spinning, as the gateway's sessions by default: idle threads that spin would take the cores from
        # the graphs whose runs alternate with the probe's passes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._x = rng.standard_normal((rows, first_k), dtype=np.float32)
        self._pass_flops = sum(2.0 * rows * k * n for k, n in flops.weight_sequence)
        self._seconds = 0.0
        self._passes = 0
        for _ in range(2):
            self._session.run(None, {"x": self._x})

    def run(self) -> None:
        started = time.perf_counter()
        self._session.run(None, {"x": self._x})
        self._seconds += time.perf_counter() - started
        self._passes += 1

    @property
    def gflops(self) -> float:
        """FLOP/s of the model's weight products, over the passes run so far."""
        return self._passes * self._pass_flops / self._seconds / 1e9


def compute_floor(
    onnx_path: Path, tokens_per_input: float, batch: int, threads: int, seconds: float = 3.0
) -> ComputeFloor:
    """The floor for inputs of ``tokens_per_input`` real tokens, GEMM rows of a ``batch``-input batch, measured
    on its own for ``seconds``."""
    probe = GemmProbe(graph_flops(onnx_path, max(1, round(tokens_per_input))), round(batch * tokens_per_input), threads)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        probe.run()
    return floor_of(probe, tokens_per_input)


def floor_of(probe: GemmProbe, tokens_per_input: float) -> ComputeFloor:
    """The floor from what ``probe`` measured, for inputs of ``tokens_per_input`` real tokens."""
    return ComputeFloor(
        matmul_gflops=probe.gflops, flops_per_token=probe.flops.per_token, tokens_per_input=tokens_per_input
    )
