"""How a version's ONNX graph is opened on the CPU, the same way by the gateway and by the export checks.

Parity, INT8 agreement and reference statistics are measured on the session the gateway will run, so a
version's recorded figures are those of what it serves.
"""

from pathlib import Path

import onnxruntime as ort

# Session-level fusions a CPU session leaves out: ONNX Runtime's CPU SkipLayerNormalization kernel ran slower
# than the Add and LayerNormalization it replaces on MiniLM (1.32, one thread: 169 ms vs 42 ms over the same
# batches; the whole graph ~10 % slower). A CUDA session keeps every fusion.
CPU_DISABLED_FUSIONS = ["SkipLayerNormFusion"]


def cpu_session(path: Path, threads: int = 0, spinning: bool = True) -> ort.InferenceSession:
    """``path`` on ONNX Runtime's CPU provider with ``threads`` intra-op threads (0: ONNX Runtime's choice)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads wait for work by busy-looping: right for one session, CPU burnt against another. They
    # spin only while a run is going (between its operators), never between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=CPU_DISABLED_FUSIONS
    )
