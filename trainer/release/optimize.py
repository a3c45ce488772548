"""ONNX Runtime's transformer optimiser applied to an exported graph: fused attention, skip-layer-norm,
bias-GELU and embedding layer-norm.

Skip-layer-norm fusion is left out: ONNX Runtime's CPU kernel for it measured slower than the LayerNorm
and Add it replaces (``make bench`` profile, ONNX Runtime 1.32), while a CUDA session fuses it by itself at
load. Only the portable fusions run here (``opt_level=0``): the graph still loads on any ONNX Runtime build and
execution provider, CPU or CUDA (the fused operators are ONNX Runtime's contrib ops, which Triton's ONNX
Runtime backend has too); the hardware-specific rewrites stay with each session at load time. What was fused
is recorded in the version's manifest, and the parity check against torch runs on the optimised graph.
"""

import logging
import warnings
from pathlib import Path

import onnxruntime as ort
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from service.models.manifest import GraphOptimization

log = logging.getLogger(__name__)

# The fusions that matter for speed; the optimiser reports others (all zero for BERT-style encoders).
REPORTED_FUSIONS = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu")


def optimize_graph(path: Path, num_heads: int, hidden_size: int) -> GraphOptimization:
    """Rewrite the BERT-style graph at ``path`` in place with the fused operators; returns what was fused."""
    fusions = FusionOptions("bert")
    fusions.enable_skip_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(
            str(path),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,
            use_gpu=False,
            optimization_options=fusions,
        )
    counts = optimized.get_fused_operator_statistics()
    fused = {name: int(counts[name]) for name in REPORTED_FUSIONS if counts.get(name)}
    optimized.save_model_to_file(str(path))
    if not fused.get("Attention"):
        # Still a valid graph, only slower: say so rather than refuse the export.
        log.warning("no attention fused; the graph is exported unfused", extra={"fused": fused})
    log.info("onnx graph optimised", extra={"fused": fused})
    return GraphOptimization(tool="onnxruntime.transformers.optimizer", onnxruntime=ort.__version__, fused=fused)
