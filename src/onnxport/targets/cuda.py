"""ONNX Runtime with the CUDA provider: fp16 compute and GroupQueryAttention. No GPU here: the
graph is checked against the CUDA provider's contrib-op table (ONNX Runtime 1.2x) and loaded on
the CPU provider."""

from __future__ import annotations

from pathlib import Path

from onnxport.targets import INFO, WARNING, Finding, Target, register_target
from onnxport.targets.cpu import ort_runs
from onnxport.targets.rules import contrib_ops, graphs

#: com.microsoft ops onnxport writes that ONNX Runtime's CUDA provider implements
CUDA_CONTRIB = frozenset({"GroupQueryAttention", "MatMulNBits", "RotaryEmbedding", "SkipSimplifiedLayerNormalization",
                "SimplifiedLayerNormalization", "SkipLayerNormalization", "GatherBlockQuantized", "MultiHeadAttention",
                "FastGelu", "BiasGelu", "QuickGelu"})


@register_target
class Cuda(Target):
    name = "cuda"
    summary = "ONNX Runtime, CUDA provider: fp16 compute, GroupQueryAttention"

    def __init__(self):
        self.preset = {"dtype": "fp16", "attention": "gqa"}

    def check(self, bundle: Path, manifest):
        findings = ort_runs(bundle, manifest)
        for g, model in graphs(bundle, manifest):
            findings += contrib_ops(g, model, WARNING, "not in the CUDA provider's table here: it may fall back to "
                                                       "the CPU", allowed=CUDA_CONTRIB)
        if all((g.precision or {}).get("compute") != "float16" for g in manifest.graphs):
            findings.append(Finding(INFO, "fp32 graph: on a GPU, --dtype fp16 halves memory and is usually faster"))
        return findings, ["onnxruntime CPUExecutionProvider load + run (no GPU here)",
                          "CUDA provider contrib-op table (onnxruntime 1.2x)"]
